"""Pre-activation (intermediate) bound providers: IBP, CROWN (backward), zonotope, symbolic."""
from __future__ import annotations

import torch
from torch import Tensor

from certorch.bounds.backward import chunked_bounds
from certorch.bounds.context import BoundContext
from certorch.bounds.forward import symbolic_region, zonotope_box
from certorch.bounds.ibp import ibp_box, ibp_is_exact
from certorch.bounds.patches import Patches
from certorch.domains.box import Box


def pre_bounds(ctx: BoundContext, idx: int) -> Box:
    """Bounds of node ``idx`` by the context's intermediate strategy (cached in ctx.boxes)."""
    if idx in ctx.boxes:
        return ctx.boxes[idx]
    kind = ctx.intermediate
    if idx in ctx.given and idx not in ctx.refine:
        box = ctx.given[idx]
    elif kind == "ibp":
        box = ibp_box(ctx, idx)
    elif kind == "zonotope":
        box = zonotope_box(ctx, idx)
    elif kind == "symbolic":
        box = symbolic_region(ctx, idx).box()
    elif kind == "crown":
        box = crown_box(ctx, idx)
    else:
        raise ValueError(f"unknown intermediate bound strategy {kind!r}")
    box = ctx.known(idx, box)
    ctx.boxes[idx] = box
    return box


def _needs_bounds(ctx: BoundContext, idx: int, lo: Tensor, up: Tensor) -> Tensor:
    """(B, n) neurons of node ``idx`` whose consumers' relaxations tighten with tighter bounds
    (ReLU: the unstable ones; Sigmoid / Tanh: all), asked of the relaxation objects."""
    masks = []
    for j in ctx.graph.users[idx]:
        node = ctx.graph.nodes[j]
        rule = getattr(node.op.relaxation, "needs_bounds", None) if node.is_activation else None
        if rule is not None:
            masks.append(rule(lo, up))
    if not masks:
        return (lo < 0) & (up > 0)
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def crown_box(ctx: BoundContext, idx: int) -> Box:
    """CROWN bounds of node ``idx``, computed only for neurons that IBP leaves unstable
    (union over the batch); IBP-stable neurons keep their IBP bounds (their relaxation is exact
    either way). CROWN bounds are intersected with IBP's.

    On a (C, H, W) map the spec rows are windows (:class:`Patches`): when most channels are
    unstable at the positions that have any, every channel of those positions is bounded (one
    window per position serves all its channels), otherwise only the unstable neurons.
    """
    ibp = ibp_box(ctx, idx)
    if ibp_is_exact(ctx, idx):
        return ibp
    lo, up = ibp.lower.flatten(1), ibp.upper.flatten(1)
    unstable = _needs_bounds(ctx, idx, lo, up).any(dim=0)  # (n,)
    idx_unstable = unstable.nonzero().flatten()
    if idx_unstable.numel() == 0:
        return ibp
    B, n = lo.shape
    shape = tuple(ibp.lower.shape[1:])
    windows = ctx.patches and len(shape) == 3
    rows, units, per_unit, neurons = _spec_plan(shape, windows, unstable, idx_unstable, lo.dtype)
    low_c, up_c = chunked_bounds(ctx, idx, rows, units, lambda i: pre_bounds(ctx, i), True, per_unit, windows,
                                 neurons if ctx.alpha is not None else None)
    l_c = torch.maximum(low_c, lo[:, neurons])
    u_c = torch.minimum(up_c, up[:, neurons])
    lower = lo.index_copy(1, neurons, l_c).view(B, *shape)
    upper = up.index_copy(1, neurons, u_c).view(B, *shape)
    return Box(lower, upper)


def _spec_plan(shape: tuple[int, ...], windows: bool, unstable: Tensor, idx_unstable: Tensor, dtype):
    """How to build one-hot spec rows for the neurons to bound (as :class:`Patches` with ``windows``).

    Returns (rows(s0, s1), number of units, rows per unit, neuron index (units * rows per unit,)
    of each row in the flattened node).
    """
    dev = unstable.device
    if windows:
        C, H, W = shape
        pos = unstable.view(C, H * W).any(0).nonzero().flatten()
        if 2 * idx_unstable.numel() >= pos.numel() * C:
            neurons = (torch.arange(C, device=dev)[None, :] * (H * W) + pos[:, None]).flatten()
            return (lambda s0, s1: Patches.all_channels(pos[s0:s1], shape, dtype)), pos.numel(), C, neurons
        return (lambda s0, s1: Patches.one_hot(idx_unstable[s0:s1], shape, dtype)), idx_unstable.numel(), 1, idx_unstable
    n = unstable.numel()

    def dense_rows(s0: int, s1: int) -> Tensor:
        """(1, s1 - s0, *shape), shared by the batch."""
        k = s1 - s0
        C = torch.zeros(k, n, dtype=dtype, device=dev)
        C[torch.arange(k, device=dev), idx_unstable[s0:s1]] = 1.0
        return C.view(1, k, *shape)

    return dense_rows, idx_unstable.numel(), 1, idx_unstable
