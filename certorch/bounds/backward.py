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
from certorch.bounds.patches import Patches, add_coefficients
from certorch.errors import UnsupportedOperationError
from certorch.ops.maps import ConvMap, ScaleShiftMap, SumMap, fold_preferred

Coefficients = Tensor | Patches


def backward_lower(ctx: BoundContext, target: int, A: Coefficients, pre_bounds, rows=None) -> Tensor:
    """Lower bound of ``A . f_target`` with A: (B, S, *shape_target). Returns (B, S).

    A may have a leading dim of 1 instead of B when the spec is the same for every example
    (CROWN's one-hot intermediate specs): it then stays un-batched through the affine maps
    until the first activation's per-example relaxation broadcasts it to B, which saves a
    factor B of work on the layers next to the target. A may also be :class:`Patches` (rows
    that are windows of a conv map); they stay windows as long as the ops allow.
    ``pre_bounds(i) -> Box`` gives the bounds of node i (the input of an activation).
    ``rows``: which spec rows A holds (from ``ctx.alpha.rows_of``) when ``ctx.alpha`` gives
    per-row ReLU lower slopes (alpha-CROWN, :mod:`certorch.bounds.alpha`); None otherwise.
    """
    graph = ctx.graph
    nodes = graph.ancestors(target)
    # Pre-activation bounds first, in topological order (they may themselves run backward passes).
    acts = {i: pre_bounds(graph.nodes[i].inputs[0]) for i in nodes if graph.nodes[i].is_activation}
    S = A.rows if isinstance(A, Patches) else A.shape[1]
    coeffs: dict[int, Coefficients] = {target: A}
    const = torch.zeros(ctx.batch, S, dtype=ctx.dtype, device=ctx.box.lower.device)
    lower = None

    def push(j: int, Aj: Coefficients) -> None:
        coeffs[j] = add_coefficients(coeffs[j], Aj) if j in coeffs else Aj

    for i in reversed(nodes):
        Ai = coeffs.pop(i, None)
        if Ai is None:
            continue
        ctx.tick()
        node = graph.nodes[i]
        if rows is not None and i in ctx.splits and ctx.alpha.has_beta(rows):
            # split constraints s * z >= 0 of this node, with Lagrange multipliers (beta-CROWN)
            Ai = ctx.alpha.beta_backward(rows, i, Ai.to_dense() if isinstance(Ai, Patches) else Ai, ctx.splits[i])
        if node.is_input:
            if rows is not None:
                ctx.alpha.record(rows, i, Ai)
            lower = input_lower(ctx, Ai)
        elif node.is_affine:
            m = ctx.affine_map(i)
            back = Ai.transpose(m) if isinstance(Ai, Patches) else None
            if back is None and isinstance(Ai, Patches):
                Ai = Ai.to_dense()
            off = m.offset()
            if off is not None:
                const = const + (Ai.offset_dot(off) if isinstance(Ai, Patches) else offset_dot(Ai, off))
            if back is None:
                back = dense_transpose(m, Ai)
            for j, Aj in zip(node.inputs, back):
                if isinstance(Aj, Patches) and Aj.too_wide():
                    Aj = Aj.to_dense()
                push(j, Aj)
        elif node.is_activation:
            relax = node.op.relaxation
            elementwise = getattr(relax, "backward_lines", None) is not None
            if not elementwise and getattr(relax, "backward", None) is None:
                raise UnsupportedOperationError(
                    f"backward bound methods do not support {node.op.kind!r} (node {node.name!r}); use method='ibp'"
                )
            box = acts[i]
            if not elementwise:  # a window op (max pooling): dense coefficients, its own backward rule
                A_in, c_add = relax.backward(Ai.to_dense() if isinstance(Ai, Patches) else Ai, box.lower, box.upper,
                                             ctx.slope)
            elif rows is not None and getattr(relax, "free_lower_lines", None) is not None:
                # optimised lower slopes, one per (spec row, neuron)
                ctx.alpha.record(rows, i, Ai)
                A_in, c_add = ctx.alpha.relu_backward(relax, rows, i, Ai, box, ctx.slope)
            elif isinstance(Ai, Patches):
                B = box.lower.shape[0]
                lines = [t for t in relax.backward_lines(box.lower, box.upper, ctx.slope) if t is not None]
                g = Ai.gather(torch.cat(lines, 0)).flatten(3)  # one gather for all lines: (3B or 4B, U, 1, D)
                parts = [g[k * B : (k + 1) * B] for k in range(len(lines))]
                P_in, c_add = relax.apply_lines(Ai.P.flatten(3), *parts)
                A_in = Ai.with_P(P_in.view(P_in.shape[:3] + Ai.P.shape[3:]), clean=True)  # lines are 0 in the padding
                c_add = Ai.flat_rows(c_add)
            else:
                A_in, c_add = relax.backward(Ai, box.lower, box.upper, ctx.slope)
            const = const + c_add
            push(node.inputs[0], A_in)
        else:
            raise UnsupportedOperationError(f"node {node.name!r} ({node.op.kind}) is not supported by backward bounds")
    if lower is None:  # the target does not depend on the input
        lower = torch.zeros_like(const)
    return lower + const


def input_lower(ctx: BoundContext, A: Coefficients) -> Tensor:
    """Minimum of ``A . x`` over the input box: (B, S)."""
    if isinstance(A, Patches):
        return A.concretize(ctx.box.center, ctx.box.radius)
    c, r = ctx.box.center.flatten(1).unsqueeze(2), ctx.box.radius.flatten(1).unsqueeze(2)
    Af = A.flatten(2)  # (1 or B, S, n): matmul broadcasts the leading dim
    return (Af @ c - Af.abs() @ r).squeeze(2)


def dense_transpose(m, A: Tensor) -> list[Tensor]:
    """Dense coefficients (L, S, *out_shape) pushed through the affine map's adjoint."""
    lead, S = A.shape[:2]
    back = m.transpose(A.reshape(lead * S, *A.shape[2:]))
    return [Aj.reshape(lead, S, *Aj.shape[1:]) for Aj in back]


def prepare_pre_bounds(ctx: BoundContext, target: int, pre_bounds) -> None:
    """Compute the bounds of every activation input that ``target`` depends on, in topological
    order, before any coefficient tensor for ``target`` is allocated (keeps peak memory flat)."""
    graph = ctx.graph
    for i in graph.ancestors(target):
        if i != target and graph.nodes[i].is_activation:
            pre_bounds(graph.nodes[i].inputs[0])


def with_negation(C: Coefficients) -> Coefficients:
    """Rows C and rows -C (lower bounds of both give lower and upper bounds); see :func:`split_negation`."""
    if isinstance(C, Patches):
        return C.stacked_with_negation()
    return torch.cat([C, -C], dim=1)


def split_negation(C: Coefficients, res: Tensor) -> tuple[Tensor, Tensor]:
    """Lower bounds (B, 2S) of :func:`with_negation` rows -> (bounds of C's rows, of -C's rows)."""
    if isinstance(C, Patches):
        return Patches.split_negation(res, C.groups)
    S = C.shape[1]
    return res[:, :S], res[:, S:]


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


def chunk_rows(ctx: BoundContext, target: int, batch: int, windows: bool = False) -> int:
    """Spec rows per backward pass so that no coefficient tensor exceeds ``ctx.max_elements``."""
    return max(1, ctx.max_elements // (2 * batch * row_numel(ctx, target, windows)))


def row_numel(ctx: BoundContext, target: int, windows: bool = False) -> int:
    """The most coefficients one spec row holds at any node of a backward pass from ``target``:
    the node's size for dense rows; channels x window area for window rows (an estimate: a
    window grows through each conv and turns dense where :class:`Patches` would), and the
    column buffer ``conv_transpose2d`` allocates at each conv."""
    graph = ctx.graph
    ext: dict[int, tuple[int, int] | None] = {target: (1, 1) if windows and len(graph.nodes[target].shape) == 3 else None}
    widest = 1
    for i in reversed(graph.ancestors(target)):
        if i not in ext:
            continue
        node, e = graph.nodes[i], ext.pop(i)
        if e is not None and e[0] * e[1] >= node.shape[1] * node.shape[2]:
            e = None
        area = (node.shape[-2] * node.shape[-1] if len(node.shape) == 3 else 1) if e is None else e[0] * e[1]
        widest = max(widest, node.numel if e is None else node.shape[0] * area)
        if node.is_input:
            continue
        if node.is_affine:
            m = ctx.affine_map(i)
            if isinstance(m, ConvMap):
                # conv_transpose2d's scratch (measured, torch 2.13 CPU): float64 (no oneDNN kernel)
                # allocates a column buffer of Cin * k * k entries per output position for the whole
                # batch at once, and so does fold_transpose (few input channels, where it is
                # taken: counted on every device); float32 about twice its output
                cin = m.weight.shape[1]
                columns = ctx.dtype == torch.float64 or fold_preferred(m.weight, m.stride)
                scratch = m.weight[0].numel() * area if columns else 2 * cin * _input_area(m, e)
                widest = max(widest, scratch)
            if e is not None:
                e = _grown_window(e, m)
        for j in node.inputs:
            old = ext[j] if j in ext else e
            ext[j] = None if old is None or e is None else (max(old[0], e[0]), max(old[1], e[1]))
    return widest


def _input_area(m, e: tuple[int, int] | None) -> int:
    """Spatial size of a conv's input window (the whole input map for dense rows)."""
    if e is None:
        return m.in_shape[1] * m.in_shape[2]
    g = _grown_window(e, m)
    return g[0] * g[1]


def _grown_window(e: tuple[int, int], m) -> tuple[int, int] | None:
    """Window size at the input of affine map m for a window e at its output (None: dense)."""
    if isinstance(m, ConvMap):
        k = m.weight.shape[-2:]
        return tuple((e[d] - 1) * m.stride[d] + m.dilation[d] * (k[d] - 1) + 1 for d in range(2))
    if isinstance(m, SumMap) or (isinstance(m, ScaleShiftMap) and m.channel_dims == 2):
        return e
    return None


def chunked_bounds(
    ctx: BoundContext,
    target: int,
    rows: Callable[[int, int], Coefficients],
    units: int,
    pre_bounds,
    upper: bool = True,
    unit_rows: int = 1,
    windows: bool = False,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Lower and upper bounds (B, units * unit_rows) of ``C . f_target`` where ``rows(s0, s1)``
    builds the spec rows of units s0..s1 (``unit_rows`` rows each: (L, (s1 - s0) * unit_rows,
    *shape) or, with ``windows``, :class:`Patches`) on demand, a chunk (:func:`chunk_rows`) at a time.
    ``upper=False`` skips the upper bounds (returned as None): half the work.
    ``ids``: (units * unit_rows,) identities of the rows (neuron indices of ``target``), needed
    when ``ctx.alpha`` holds per-row slopes (alpha-CROWN); ignored otherwise.

    With autograd recording and more than one chunk, each chunk runs under activation
    checkpointing: its coefficient tensors are freed after the chunk and recomputed during
    ``backward()``, so peak memory follows ``ctx.max_elements`` instead of growing with the
    number of chunks (same values and gradients, one extra backward pass of compute).
    """
    B = ctx.batch
    prepare_pre_bounds(ctx, target, pre_bounds)
    step = max(1, chunk_rows(ctx, target, B, windows) // unit_rows)
    recompute = torch.is_grad_enabled() and units > step

    def chunk(s0: int, s1: int) -> tuple[Tensor, Tensor | None]:
        """Lower bounds (B, k) of rows of units s0..s1 and of their negations (None without upper)."""
        Cc = rows(s0, s1)
        key = None
        if ctx.alpha is not None and ids is not None:
            key = ctx.alpha.rows_of(target, s0, ids[s0 * unit_rows : s1 * unit_rows], upper, unit_rows, windows)
        if not upper:
            return backward_lower(ctx, target, Cc, pre_bounds, key), None
        return split_negation(Cc, backward_lower(ctx, target, with_negation(Cc), pre_bounds, key))

    lows, ups = [], []
    for s0 in range(0, units, step):
        s1 = min(units, s0 + step)
        # Under checkpointing only (s0, s1) are saved: the spec chunk is rebuilt in backward().
        low, neg_up = checkpoint(chunk, s0, s1, use_reentrant=False) if recompute else chunk(s0, s1)
        lows.append(low)
        ups.append(None if neg_up is None else -neg_up)
    return torch.cat(lows, 1), (torch.cat(ups, 1) if upper else None)


def backward_bounds(
    ctx: BoundContext, target: int, C: Tensor, pre_bounds, upper: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Lower and upper bounds of ``C . f_target`` (C: (B, S, *shape)), each (B, S); the upper
    bound is None with ``upper=False``. The spec rows are processed in chunks (:func:`chunk_rows`).
    """
    return chunked_bounds(ctx, target, lambda s0, s1: C[:, s0:s1], C.shape[1], pre_bounds, upper)
