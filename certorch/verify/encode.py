"""Network-to-constraints encoding shared by the LP (triangle) and MILP (big-M) stages.

One example at a time, float64 numpy throughout. Every graph node gets a vector of variable
indices (``var_of[node]``, flat, per-example numel):

* input: variables bounded by the input box;
* affine node: new variables ``z`` (bounded by the node's known box, else by interval arithmetic
  on its inputs' variable bounds, widened by a float64 rounding bound) and equality rows
  ``z - L(x_1, ..., x_k) = offset`` with the map's linear part as a sparse matrix (extracted
  block-wise from ``AffineMap.apply`` with identity batches: vectorized, no per-coefficient
  loop); a pure reshape reuses its input's variables;
* ReLU: the pre-activation bounds ``l, u`` decide per neuron (via ``certorch.relax.relu``, the
  one relaxation object): stable-active reuses ``z``, stable-inactive maps to one shared
  variable fixed to 0, unstable gets ``y in [0, u]`` with ``y >= z`` and the triangle's upper
  line ``y <= s z + b`` (``s, b = relu.upper_line(l, u)``); selected unstable neurons also get a
  binary ``a`` with the big-M rows ``y <= z - l (1 - a)`` and ``y <= u a`` (Tjeng et al.).

Every variable has finite bounds (given or implied), which the solver-result interpretation
(:mod:`certorch.verify.solve`) needs for its weak-duality bound.

Which unstable neurons get binaries: ``binaries=None`` -> none (the LP relaxation),
``"all"`` -> every unstable neuron (complete MILP), an int ``N`` -> the ``N`` most important
unstable neurons of each ReLU layer (COLT / MAAR style refinement), ranked by the area-like
score ``-l u / (u - l)`` (the largest vertical gap of the triangle).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from certorch.errors import DeadlineExceeded, UnsupportedOperationError
from certorch.graph.ir import Graph
from certorch.ops.maps import AffineMap, ReshapeMap
from certorch.relax import relu as relu_relax

INF = np.inf
_BLOCK_ELEMENTS = 2**22  # largest identity-batch output (rows x out numel) built at once (~0.1 s of work)


@dataclass
class Encoding:
    """A linear program over ``n`` variables: ``row_lower <= A v <= row_upper``,
    ``col_lower <= v <= col_upper``; ``integer``: indices of binary variables.

    ``var_of[i]``: (numel_i,) int64 variable indices of graph node ``i``. ``unstable[i]``:
    number of unstable neurons of ReLU node ``i``.
    """

    A: sparse.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integer: np.ndarray
    var_of: dict[int, np.ndarray]
    unstable: dict[int, int] = field(default_factory=dict)
    #: per ReLU node: (flat positions of its unstable neurons (k,), their ``y`` variables (k,),
    #: index of the first of their k consecutive rows ``y - z >= 0``)
    triangles: dict[int, tuple[np.ndarray, np.ndarray, int]] = field(default_factory=dict)
    #: per affine node that has rows: index of the first of its numel consecutive rows
    #: ``z - W x = offset`` (row r for output neuron r)
    affine_rows: dict[int, int] = field(default_factory=dict)

    @property
    def num_vars(self) -> int:
        return int(self.col_lower.shape[0])

    def output_vars(self, graph: Graph) -> np.ndarray:
        return self.var_of[graph.output]

    @property
    def num_unstable(self) -> int:
        return int(sum(self.unstable.values()))


class _Builder:
    """Accumulates variables and COO rows; vectorized per call."""

    def __init__(self) -> None:
        self.lower: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.n = 0
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.rlo: list[np.ndarray] = []
        self.rhi: list[np.ndarray] = []
        self.m = 0
        self.integer: list[np.ndarray] = []
        self._flat: tuple[np.ndarray, np.ndarray] | None = None
        self.zero = self.add_vars(np.zeros(1), np.zeros(1))[0]  # the shared constant-0 variable

    def add_vars(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        idx = np.arange(self.n, self.n + lo.shape[0], dtype=np.int64)
        self.lower.append(np.asarray(lo, dtype=np.float64))
        self.upper.append(np.asarray(hi, dtype=np.float64))
        self.n += lo.shape[0]
        self._flat = None
        return idx

    def bounds_of(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Current (lower, upper) bounds of variables ``idx``."""
        if self._flat is None:
            self._flat = (np.concatenate(self.lower), np.concatenate(self.upper))
        return self._flat[0][idx], self._flat[1][idx]

    def add_rows(self, r: np.ndarray, c: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows numbered 0..len(lo)-1 locally (``r``), shifted to global numbers here."""
        keep = c != self.zero  # the constant-0 variable contributes nothing
        self.rows.append(r[keep] + self.m)
        self.cols.append(c[keep])
        self.vals.append(v[keep])
        self.rlo.append(lo)
        self.rhi.append(hi)
        self.m += lo.shape[0]

    def finish(self, var_of: dict[int, np.ndarray], unstable: dict[int, int], triangles: dict | None = None,
               affine_rows: dict | None = None) -> Encoding:
        cat = lambda xs, dt=np.float64: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        A = sparse.csr_matrix(
            (cat(self.vals), (cat(self.rows, np.int64), cat(self.cols, np.int64))), shape=(self.m, self.n)
        )
        A.sum_duplicates()
        return Encoding(A, cat(self.rlo), cat(self.rhi), cat(self.lower), cat(self.upper),
                        cat(self.integer, np.int64), var_of, unstable, triangles or {}, affine_rows or {})


@torch.no_grad()
def sparse_linear_part(amap: AffineMap, in_shapes: list[tuple[int, ...]], which: int,
                       deadline: float | None = None) -> sparse.coo_matrix:
    """The linear part of ``amap`` w.r.t. input ``which`` as a sparse (out_numel, in_numel) matrix.

    Identity batches of the input are pushed through ``amap.apply`` in blocks (other inputs 0);
    ``deadline`` (``time.perf_counter()``) is checked before each block.
    """
    shape = in_shapes[which]
    n_in = int(np.prod(shape))
    probe = amap.apply(*[torch.zeros(1, *s, dtype=torch.float64) for s in in_shapes])
    n_out = probe[0].numel()
    block = max(1, _BLOCK_ELEMENTS // max(n_out, 1))
    rows, cols, vals = [], [], []
    for start in range(0, n_in, block):
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("the LP/MILP encoding ran past its deadline (extracting an affine map)")
        k = min(block, n_in - start)
        eye = torch.zeros(k, n_in, dtype=torch.float64)
        eye[torch.arange(k), torch.arange(start, start + k)] = 1.0
        xs = [torch.zeros(k, *s, dtype=torch.float64) for s in in_shapes]
        xs[which] = eye.view(k, *shape)
        out = amap.apply(*xs).reshape(k, n_out)  # out[j, o] = d out_o / d in_{start+j}
        j, o = out.nonzero(as_tuple=True)
        rows.append(o.numpy())
        cols.append((j + start).numpy())
        vals.append(out[j, o].numpy())
    return sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in))


def select_binaries(l: np.ndarray, u: np.ndarray, unstable: np.ndarray, binaries: str | int | None) -> np.ndarray:
    """Bool mask (n,) of unstable neurons that get a binary variable (see module doc)."""
    if binaries is None:
        return np.zeros_like(unstable)
    if binaries == "all":
        return unstable.copy()
    n = int(binaries)
    idx = np.flatnonzero(unstable)
    if idx.size <= n:
        return unstable.copy()
    score = -l[idx] * u[idx] / (u[idx] - l[idx])
    chosen = idx[np.argsort(-score, kind="stable")[:n]]
    mask = np.zeros_like(unstable)
    mask[chosen] = True
    return mask


def unsupported_reason(graph: Graph) -> str | None:
    """Why ``graph`` cannot be encoded (one line), or None: the encoding has affine ops and ReLU."""
    for node in graph.nodes[1:]:
        if not node.is_affine and not (node.is_activation and node.op.kind == "relu"):
            return f"the LP/MILP encoding supports affine ops and ReLU, not {node.op.kind!r} (node {node.name!r})"
    return None


@torch.no_grad()
def encode(
    graph: Graph,
    input_lower: np.ndarray,
    input_upper: np.ndarray,
    bounds: dict[int, tuple[np.ndarray, np.ndarray]],
    binaries: str | int | None = None,
    deadline: float | None = None,
    linear_parts: dict | None = None,
) -> Encoding:
    """Encode ``graph`` on the input box (flat float64 arrays) with per-node bounds.

    ``bounds[i] = (l, u)``: flat float64 bounds of node ``i`` (needed for the input node of
    every ReLU; optional elsewhere, where they only tighten the variable bounds). ``deadline``:
    a ``time.perf_counter()`` value checked between nodes (``DeadlineExceeded`` past it).
    ``linear_parts``: a dict kept by the caller across calls on the same network (same weights):
    the affine maps' sparse linear parts are extracted once and reused from it.
    """
    reason = unsupported_reason(graph)
    if reason is not None:
        raise UnsupportedOperationError(reason)
    b = _Builder()
    var_of: dict[int, np.ndarray] = {0: b.add_vars(input_lower.astype(np.float64), input_upper.astype(np.float64))}
    unstable_count: dict[int, int] = {}
    triangles: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    affine_rows: dict[int, int] = {}
    for node in graph.nodes[1:]:
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded(f"the LP/MILP encoding ran past its deadline at node {node.name!r}")
        if node.is_affine:
            row0 = b.m
            var_of[node.index] = _encode_affine(b, graph, node, var_of, bounds.get(node.index), deadline, linear_parts)
            if b.m > row0:
                affine_rows[node.index] = row0
        else:  # a ReLU (unsupported_reason admits nothing else)
            src = node.inputs[0]
            if src not in bounds:
                raise UnsupportedOperationError(f"no pre-activation bounds for ReLU node {node.name!r}")
            l, u = bounds[src]
            var_of[node.index], triangles[node.index] = _encode_relu(b, var_of[src], l, u, binaries)
            unstable_count[node.index] = int(triangles[node.index][0].size)
    return b.finish(var_of, unstable_count, triangles, affine_rows)


def _encode_affine(b: _Builder, graph: Graph, node, var_of, box, deadline: float | None = None,
                   cache: dict | None = None) -> np.ndarray:
    amap = node.op.affine(torch.float64, None)
    if isinstance(amap, ReshapeMap):
        return var_of[node.inputs[0]]
    n_out = node.numel
    in_shapes = [graph.nodes[i].shape for i in node.inputs]
    Ws = cache.get(node.index) if cache is not None else None
    if Ws is None:
        Ws = [sparse_linear_part(amap, in_shapes, k, deadline) for k in range(len(node.inputs))]
        if cache is not None:
            cache[node.index] = Ws
    off = amap.offset()
    rhs = np.zeros(n_out) if off is None else torch.broadcast_to(
        off.to(torch.float64).detach(), node.shape).reshape(-1).numpy().copy()
    lo, hi = interval_bounds(b, Ws, [var_of[s] for s in node.inputs], rhs) if box is None else box
    z = b.add_vars(lo, hi)
    rows, cols, vals = [np.arange(n_out)], [z], [np.ones(n_out)]
    for W, src in zip(Ws, node.inputs):
        rows.append(W.row.astype(np.int64))
        cols.append(var_of[src][W.col])
        vals.append(-W.data)
    b.add_rows(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), rhs, rhs)
    return z


def interval_bounds(b: _Builder, Ws: list, srcs: list[np.ndarray], offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds (lo, hi) of ``sum_k W_k v_k + offset`` from the variables' bounds, widened by
    ``(n + 2) 2^-52 sum_k |W_k| max(|l_k|, |u_k|) + |offset|`` so float64 rounding cannot make them
    tighter than the exact interval."""
    lo, hi, mag = offset.copy(), offset.copy(), np.abs(offset)
    n = 0
    for W, src in zip(Ws, srcs):
        W = W.tocsr()
        l, u = b.bounds_of(src)
        pos, neg = W.maximum(0), W.minimum(0)
        pos.eliminate_zeros()
        neg.eliminate_zeros()
        with np.errstate(invalid="ignore"):
            lo = lo + pos @ l + neg @ u
            hi = hi + pos @ u + neg @ l
            mag = mag + abs(W) @ np.maximum(np.abs(l), np.abs(u))
        n += W.shape[1]
    widen = (n + 2) * 2.0 ** -52 * mag
    lo, hi = lo - widen, hi + widen
    lo[np.isnan(lo)] = -INF
    hi[np.isnan(hi)] = INF
    return lo, hi


def _encode_relu(b: _Builder, z: np.ndarray, l: np.ndarray, u: np.ndarray,
                 binaries) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, int]]:
    lt, ut = torch.from_numpy(l), torch.from_numpy(u)
    active, inactive, unstable = (m.numpy() for m in relu_relax.masks(lt, ut))
    s, c = (t.numpy() for t in relu_relax.upper_line(lt, ut))
    y = np.where(active, z, b.zero)
    idx = np.flatnonzero(unstable)
    k = idx.size
    if k == 0:
        return y, (idx, idx, b.m)
    yv = b.add_vars(np.zeros(k), u[idx])
    y = y.copy()
    y[idx] = yv
    zv = z[idx]
    r = np.arange(k)
    ge_row0 = b.m
    # y - z >= 0
    b.add_rows(np.concatenate([r, r]), np.concatenate([yv, zv]), np.concatenate([np.ones(k), -np.ones(k)]),
               np.zeros(k), np.full(k, INF))
    # y - s z <= b   (triangle upper line, from the shared relaxation)
    b.add_rows(np.concatenate([r, r]), np.concatenate([yv, zv]), np.concatenate([np.ones(k), -s[idx]]),
               np.full(k, -INF), c[idx])
    sel = select_binaries(l, u, unstable, binaries)[idx]
    m = int(sel.sum())
    if m:
        yi, zi, li, ui = yv[sel], zv[sel], l[idx][sel], u[idx][sel]
        a = b.add_vars(np.zeros(m), np.ones(m))
        b.integer.append(a)
        r = np.arange(m)
        # y - z - l a <= -l   (y <= z - l (1 - a))
        b.add_rows(np.concatenate([r, r, r]), np.concatenate([yi, zi, a]),
                   np.concatenate([np.ones(m), -np.ones(m), -li]), np.full(m, -INF), -li)
        # y - u a <= 0
        b.add_rows(np.concatenate([r, r]), np.concatenate([yi, a]), np.concatenate([np.ones(m), -ui]),
                   np.full(m, -INF), np.zeros(m))
    return y, (idx, yv, ge_row0)


def region_objective(
    enc: Encoding, out_vars: np.ndarray, C: np.ndarray, d: np.ndarray
) -> tuple:
    """Objective ``v = max_r (C_r f + d_r)`` of one region over output variables ``out_vars``.

    ``C``: (R, K), ``d``: (R,). One row: cost ``C_0`` on ``f`` and offset ``d_0``. Several rows:
    an extra free variable ``t`` (returned index) minimized with rows ``t - C_r f >= d_r``.
    Returns (A, row_lower, row_upper, col_lower, col_upper, cost, offset, t) for the full model.
    """
    n = enc.num_vars
    if C.shape[0] == 1:
        cost = np.zeros(n)
        np.add.at(cost, out_vars, C[0])
        return enc.A, enc.row_lower, enc.row_upper, enc.col_lower, enc.col_upper, cost, float(d[0]), None
    R = C.shape[0]
    t = n
    r = np.repeat(np.arange(R), out_vars.size + 1)
    c = np.tile(np.concatenate([[t], out_vars]), R)
    v = np.concatenate([np.concatenate([[1.0], -C[i]]) for i in range(R)])
    extra = sparse.csr_matrix((v, (r, c)), shape=(R, n + 1))
    A = sparse.vstack([sparse.hstack([enc.A, sparse.csr_matrix((enc.A.shape[0], 1))]), extra], format="csr")
    cost = np.zeros(n + 1)
    cost[t] = 1.0
    # t's implied bounds: max over the rows of the interval of C_r f + d_r (widened for rounding)
    l, u = enc.col_lower[out_vars], enc.col_upper[out_vars]
    Cp, Cn = np.maximum(C, 0), np.minimum(C, 0)
    with np.errstate(invalid="ignore"):
        row_lo, row_hi = Cp @ l + Cn @ u + d, Cp @ u + Cn @ l + d
        widen = (out_vars.size + 2) * 2.0 ** -52 * (np.abs(C) @ np.maximum(np.abs(l), np.abs(u)) + np.abs(d))
    t_lo, t_hi = float(np.max(row_lo - widen)), float(np.max(row_hi + widen))
    t_lo = -INF if np.isnan(t_lo) else t_lo
    t_hi = INF if np.isnan(t_hi) else t_hi
    return (A, np.concatenate([enc.row_lower, d]), np.concatenate([enc.row_upper, np.full(R, INF)]),
            np.append(enc.col_lower, t_lo), np.append(enc.col_upper, t_hi), cost, 0.0, t)
