"""Backward linear relaxation (CROWN / DeepPoly; with parallel slopes: the Wong-Kolter dual network).

``backward_lower(ctx, target, A)`` lower-bounds ``A . f_target(x)`` over the input box by
pushing the coefficient tensor A back through the graph in reverse topological order: affine
ops through their transposed map, activations through their relaxation (using the
pre-activation bounds ``ctx`` provides), and finally concretizing over the input box.
Upper bounds are lower bounds of ``-A``; both are computed in one pass by stacking.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from certorch.bounds.context import BoundContext
from certorch.errors import UnsupportedOperationError


def backward_lower(ctx: BoundContext, target: int, A: Tensor, pre_bounds) -> Tensor:
    """Lower bound of ``A . f_target`` with A: (B, S, *shape_target). Returns (B, S).

    A may have a leading dim of 1 instead of B when the spec is the same for every example
    (CROWN's one-hot intermediate specs): it then stays un-batched through the affine maps
    until the first activation's per-example relaxation broadcasts it to B, which saves a
    factor B of work on the layers next to the target.
    ``pre_bounds(i) -> Box`` gives the bounds of node i (the input of an activation).
    """
    graph = ctx.graph
    nodes = graph.ancestors(target)
    # Pre-activation bounds first, in topological order (they may themselves run backward passes).
    acts = {i: pre_bounds(graph.nodes[i].inputs[0]) for i in nodes if graph.nodes[i].is_activation}
    S = A.shape[1]
    coeffs: dict[int, Tensor] = {target: A}
    const = torch.zeros(ctx.batch, S, dtype=A.dtype, device=A.device)
    lower = None
    for i in reversed(nodes):
        Ai = coeffs.pop(i, None)
        if Ai is None:
            continue
        node = graph.nodes[i]
        if node.is_input:
            c, r = ctx.box.center.flatten(1).unsqueeze(2), ctx.box.radius.flatten(1).unsqueeze(2)
            Af = Ai.flatten(2)  # (1 or B, S, n): matmul broadcasts the leading dim
            lower = (Af @ c - Af.abs() @ r).squeeze(2)
        elif node.is_affine:
            m = ctx.affine_map(i)
            off = m.offset()
            if off is not None:
                const = const + offset_dot(Ai, off)
            lead = Ai.shape[0]
            back = m.transpose(Ai.reshape(lead * S, *Ai.shape[2:]))
            for j, Aj in zip(node.inputs, back):
                Aj = Aj.reshape(lead, S, *Aj.shape[1:])
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


def offset_dot(A: Tensor, off: Tensor) -> Tensor:
    """``sum_i A[b, s, i] * off[i]`` with A: (B, S, *shape) and ``off`` broadcastable to shape.

    Dims where ``off`` broadcasts are summed out of A first, so e.g. a conv bias (C, 1, 1)
    costs one read of A and no temporary of A's size. Returns (B, S).
    """
    shape = A.shape[2:]
    off = off.reshape((1,) * (len(shape) - off.dim()) + tuple(off.shape))
    dims = [2 + d for d, (o, n) in enumerate(zip(off.shape, shape)) if o == 1 and n != 1]
    if dims:
        A = A.sum(dims, keepdim=True)
    return A.flatten(2) @ off.expand(A.shape[2:]).reshape(-1)


def chunk_rows(ctx: BoundContext, target: int, batch: int) -> int:
    """Spec rows per backward pass so that no coefficient tensor exceeds ``ctx.max_elements``."""
    widest = max(ctx.graph.nodes[i].numel for i in ctx.graph.ancestors(target))
    return max(1, ctx.max_elements // (2 * batch * widest))


def chunked_bounds(
    ctx: BoundContext, target: int, rows: Callable[[int, int], Tensor], S: int, pre_bounds, upper: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Lower and upper bounds (B, S) of ``C . f_target`` where ``rows(s0, s1)`` builds the spec
    rows ``C[:, s0:s1]`` (B, s1 - s0, *shape) on demand, one chunk (:func:`chunk_rows`) at a time.
    ``upper=False`` skips the upper bounds (returned as None): half the work.

    With autograd recording and more than one chunk, each chunk runs under activation
    checkpointing: its coefficient tensors are freed after the chunk and recomputed during
    ``backward()``, so peak memory follows ``ctx.max_elements`` instead of growing with the
    number of chunks (same values and gradients, one extra backward pass of compute).
    """
    B = ctx.batch
    prepare_pre_bounds(ctx, target, pre_bounds)
    step = chunk_rows(ctx, target, B)
    recompute = torch.is_grad_enabled() and S > step

    def chunk(s0: int, s1: int) -> Tensor:
        """Lower bounds (B, 2k) for rows s0..s1 and their negations (k = s1 - s0), or (B, k)."""
        Cc = rows(s0, s1)
        return backward_lower(ctx, target, torch.cat([Cc, -Cc], dim=1) if upper else Cc, pre_bounds)

    lows, ups = [], []
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        k = s1 - s0
        # Under checkpointing only (s0, s1) are saved: the spec chunk is rebuilt in backward().
        res = checkpoint(chunk, s0, s1, use_reentrant=False) if recompute else chunk(s0, s1)
        lows.append(res[:, :k])
        ups.append(-res[:, k:])
    return torch.cat(lows, 1), (torch.cat(ups, 1) if upper else None)


def backward_bounds(
    ctx: BoundContext, target: int, C: Tensor, pre_bounds, upper: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Lower and upper bounds of ``C . f_target`` (C: (B, S, *shape)), each (B, S); the upper
    bound is None with ``upper=False``. The spec rows are processed in chunks (:func:`chunk_rows`).
    """
    return chunked_bounds(ctx, target, lambda s0, s1: C[:, s0:s1], C.shape[1], pre_bounds, upper)
