"""Backward linear relaxation (CROWN / DeepPoly; with parallel slopes: the Wong-Kolter dual network).

``backward_lower(ctx, target, A)`` lower-bounds ``A . f_target(x)`` over the input box by
pushing the coefficient tensor A back through the graph in reverse topological order: affine
ops through their transposed map, activations through their relaxation (using the
pre-activation bounds ``ctx`` provides), and finally concretizing over the input box.
Upper bounds are lower bounds of ``-A``; both are computed in one pass by stacking.
"""
from __future__ import annotations

import torch
from torch import Tensor

from certorch.bounds.context import BoundContext
from certorch.errors import UnsupportedOperationError


def backward_lower(ctx: BoundContext, target: int, A: Tensor, pre_bounds) -> Tensor:
    """Lower bound of ``A . f_target`` with A: (B, S, *shape_target). Returns (B, S).

    ``pre_bounds(i) -> Box`` gives the bounds of node i (the input of an activation).
    """
    graph = ctx.graph
    nodes = graph.ancestors(target)
    # Pre-activation bounds first, in topological order (they may themselves run backward passes).
    acts = {i: pre_bounds(graph.nodes[i].inputs[0]) for i in nodes if graph.nodes[i].is_activation}
    B, S = A.shape[:2]
    coeffs: dict[int, Tensor] = {target: A}
    const = torch.zeros(B, S, dtype=A.dtype, device=A.device)
    lower = None
    for i in reversed(nodes):
        Ai = coeffs.pop(i, None)
        if Ai is None:
            continue
        node = graph.nodes[i]
        if node.is_input:
            c, r = ctx.box.center.flatten(1), ctx.box.radius.flatten(1)
            Af = Ai.flatten(2)
            lower = torch.einsum("bsi,bi->bs", Af, c) - torch.einsum("bsi,bi->bs", Af.abs(), r)
        elif node.is_affine:
            m = ctx.affine_map(i)
            off = m.offset()
            if off is not None:
                const = const + (Ai * off).flatten(2).sum(-1)
            back = m.transpose(Ai.reshape(B * S, *Ai.shape[2:]))
            for j, Aj in zip(node.inputs, back):
                Aj = Aj.reshape(B, S, *Aj.shape[1:])
                coeffs[j] = coeffs[j] + Aj if j in coeffs else Aj
        elif node.is_activation:
            relax = node.op.relaxation
            if getattr(relax, "backward", None) is None:
                raise UnsupportedOperationError(
                    f"backward bound methods do not support {node.op.kind!r} (node {node.name!r}); use method='ibp'"
                )
            box = acts[i]
            A_in, c_add = relax.backward(Ai, box.lower, box.upper, ctx.slope)
            const = const + c_add
            j = node.inputs[0]
            coeffs[j] = coeffs[j] + A_in if j in coeffs else A_in
        else:
            raise UnsupportedOperationError(f"node {node.name!r} ({node.op.kind}) is not supported by backward bounds")
    if lower is None:  # the target does not depend on the input
        lower = torch.zeros_like(const)
    return lower + const


def prepare_pre_bounds(ctx: BoundContext, target: int, pre_bounds) -> None:
    """Compute the bounds of every activation input that ``target`` depends on, in topological
    order, before any coefficient tensor for ``target`` is allocated (keeps peak memory flat)."""
    graph = ctx.graph
    for i in graph.ancestors(target):
        if i != target and graph.nodes[i].is_activation:
            pre_bounds(graph.nodes[i].inputs[0])


def chunk_rows(ctx: BoundContext, target: int, batch: int) -> int:
    """Spec rows per backward pass so that no coefficient tensor exceeds ``ctx.max_elements``."""
    widest = max(ctx.graph.nodes[i].numel for i in ctx.graph.ancestors(target))
    return max(1, ctx.max_elements // (2 * batch * widest))


def backward_bounds(ctx: BoundContext, target: int, C: Tensor, pre_bounds) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of ``C . f_target`` (C: (B, S, *shape)), each (B, S).

    The spec rows are processed in chunks (:func:`chunk_rows`) to bound memory.
    """
    B, S = C.shape[:2]
    prepare_pre_bounds(ctx, target, pre_bounds)
    step = chunk_rows(ctx, target, B)
    lows, ups = [], []
    for s0 in range(0, S, step):
        Cc = C[:, s0 : s0 + step]
        res = backward_lower(ctx, target, torch.cat([Cc, -Cc], dim=1), pre_bounds)
        k = Cc.shape[1]
        lows.append(res[:, :k])
        ups.append(-res[:, k:])
    return torch.cat(lows, 1), torch.cat(ups, 1)
