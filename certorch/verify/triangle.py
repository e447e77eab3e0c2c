"""The triangle LP bound as a differentiable bound method (``method="triangle"``).

The per-neuron triangle relaxation of every unstable ReLU (``y >= 0``, ``y >= z``, ``y <= s z + b``)
with the intermediate bounds fixed (CROWN's) is the tightest convex relaxation a single neuron
allows; its LP optimum is the best bound any backward pass with per-neuron lines can reach.
This method computes that optimum *as a backward pass*, so it is differentiable w.r.t. the
weights and can be trained on (Jovanovic et al., "Why tighter relaxations may hurt training"):

1. Intermediate bounds: CROWN's, from the context (differentiable, shared with ``crown`` in
   :func:`certorch.bounds.api.bound_many`).
2. Per example, the triangle LP with exactly those bounds (:func:`certorch.verify.encode.encode`,
   no binaries), the variable boxes of its hidden nodes removed: they are implied by the
   triangles and the input box (each box is a bound over that very polytope), so the optimum
   does not change, but without them the LP dual has the backward pass's structure. HiGHS
   minimises each spec row (the model is kept and warm-started across rows). From the duals
   ``mu_z`` of ``y - z >= 0`` and ``mu_0`` of ``y >= 0``, each unstable neuron's lower slope is
   ``mu_z / (mu_z + mu_0)`` (CROWN's slope where both are 0: the lower line is then unused).
3. The value: a backward pass with those slopes for the spec rows (the alpha-CROWN slope store,
   not optimised). By LP duality (Salman et al. 2019, "A convex relaxation barrier") it equals
   the LP optimum (tested within 1e-5).
4. The gradient w.r.t. the weights: the LP optimum's, by the envelope theorem on the LP's
   Lagrangian, ``sum_k pi_k . f_k(v*) + sum_j pi_j (s_j z*_j + b_j)`` over its affine rows
   (``f_k``: the node's affine map applied to the primal solution ``v*``, differentiable in the
   weights) and triangle upper rows (``s_j, b_j``: the upper line of the differentiable CROWN
   bounds ``l_j, u_j``), with HiGHS's row duals ``pi`` and primal point held fixed. (The
   backward pass of step 3 is not differentiated: its gradient is a one-sided one wherever a
   neuron's backward coefficient is exactly 0, which LP-optimal slopes make common; measured,
   it differed from finite differences of the LP optimum.) A row whose LP failed falls back to
   the backward pass's own gradient.

Soundness never depends on HiGHS: step 3 is a CROWN pass with slopes in [0, 1], a valid bound
for any slopes; a failed or inaccurate LP only makes it looser (a failed row keeps CROWN's
slopes and is counted in ``BoundResult.extra["triangle_lp_failures"]``). Hence
CROWN <= triangle (tested) up to the slopes' rounding, and triangle = LP optimum within 1e-5
(tested against a direct solve of the encoding with its boxes).

Cost: one LP per example and spec row, solved on the CPU one example at a time (an LP solver
has no batched form); meant for small networks (the relaxation study), not for large ones.
Hand-written because no library differentiates a network's LP relaxation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from certorch.bounds.alpha import AlphaSlopes
from certorch.bounds.backward import chunked_bounds
from certorch.bounds.context import BoundContext
from certorch.bounds.intermediate import pre_bounds
from certorch.bounds.methods import BoundMethod, register_final, register_method
from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.relax import relu as relu_relax
from certorch.verify.encode import Encoding, encode
from certorch.verify.solve import _status_name, highs_lp, new_highs

#: a dual multiplier below this counts as zero when reading the slopes
DUAL_ZERO = 1e-12


def triangle_bounds(ctx: BoundContext, C: Tensor, upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """Triangle-LP lower (and upper) bounds (B, S) of ``C . f(x)``, C: (B, S, *out_shape); see module doc."""
    graph = ctx.graph
    for n in graph.nodes:
        if n.is_activation and n.op.kind != "relu":
            raise UnsupportedOperationError(f"the triangle bound supports ReLU activations, not {n.op.kind!r} "
                                            f"(node {n.name!r})")
        mod = getattr(n.op, "module", None)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            raise CertorchError("the triangle bound needs BatchNorm in eval mode (its LP uses the running statistics)")
    relus = [a for a in graph.activation_nodes()]
    boxes = {a.index: pre_bounds(ctx, a.inputs[0]) for a in relus}
    failures = 0
    lower, f = _pass(ctx, C, boxes)
    failures += f
    up = None
    if upper:
        neg, f = _pass(ctx, -C, boxes)
        up, failures = -neg, failures + f
    ctx.extra["triangle_lp_failures"] = failures
    return lower, up


def _pass(ctx: BoundContext, C: Tensor, boxes: dict) -> tuple[Tensor, int]:
    """Lower bounds (B, S) of ``C . f`` (value: backward pass with the LP-optimal slopes; gradient:
    the LP optimum's, see module doc) and the number of failed LPs."""
    out = ctx.graph.output
    S = C.shape[1]
    ids = torch.arange(S, device=C.device)
    grad = torch.is_grad_enabled() and any(b.lower.requires_grad or b.upper.requires_grad for b in boxes.values())
    sol = lp_solutions(ctx, C, boxes, keep_solution=grad)
    store = AlphaSlopes({(out, act, 1): (ids, s) for act, s in sol.slopes.items()})
    sub = replace(ctx, alpha=store)  # shares ctx.boxes: the intermediate bounds are not recomputed
    low, _ = chunked_bounds(sub, out, lambda s0, s1: C[:, s0:s1], S, lambda i: pre_bounds(sub, i), False, ids=ids)
    if grad:
        lag = _lagrangian(ctx, boxes, sol)
        ok = sol.ok.to(low.device)
        low = torch.where(ok, low.detach() + (lag - lag.detach()), low)
    return low, int((~sol.ok).sum())


@dataclass
class LPSolutions:
    """What the LPs of a batch left: ``slopes[a]`` (B, S, n) LP-optimal lower slopes of ReLU node
    ``a`` (CROWN's where unused or failed); ``ok`` (B, S) bool: the row's LP was solved; with
    ``keep_solution``: per affine node ``k``, ``affine[k] = (row duals (B, S, numel_k), primal
    values of its inputs [(B, S, numel_in)])`` and per ReLU node, ``upper[a] = (duals of the
    triangle upper rows (B, S, n), primal pre-activation values (B, S, n))`` (0 off the unstable)."""

    slopes: dict[int, Tensor]
    ok: Tensor
    affine: dict[int, tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=dict)
    upper: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@torch.no_grad()
def lp_solutions(ctx: BoundContext, C: Tensor, boxes: dict, keep_solution: bool = False) -> LPSolutions:
    """Solve the triangle LP of every example and spec row of C (B, S, *out_shape) (one HiGHS
    model per example, warm-started over its S rows); see :class:`LPSolutions`."""
    graph = ctx.graph
    B, S = C.shape[:2]
    init = {a: relu_relax.lower_slope(b.lower, b.upper, ctx.slope).flatten(1) for a, b in boxes.items()}
    slopes = {a: s.unsqueeze(1).expand(B, S, s.shape[1]).to(torch.float64).cpu().clone() for a, s in init.items()}
    sol = LPSolutions(slopes, torch.zeros(B, S, dtype=torch.bool))
    if keep_solution:
        for n in graph.nodes:
            if n.is_affine and not n.is_input:
                sol.affine[n.index] = (np.zeros((B, S, n.numel)),
                                       [np.zeros((B, S, graph.nodes[j].numel)) for j in n.inputs])
        for a in boxes:
            n = graph.nodes[a].numel
            sol.upper[a] = (np.zeros((B, S, n)), np.zeros((B, S, n)))
    lo_in = ctx.box.lower.detach().to(torch.float64).flatten(1).cpu().numpy()
    hi_in = ctx.box.upper.detach().to(torch.float64).flatten(1).cpu().numpy()
    pre = {graph.nodes[a].inputs[0]: (b.lower.detach().to(torch.float64).flatten(1).cpu().numpy(),
                                      b.upper.detach().to(torch.float64).flatten(1).cpu().numpy())
           for a, b in boxes.items()}
    spec = C.detach().to(torch.float64).flatten(2).cpu().numpy()
    parts: dict = {}  # sparse affine parts, extracted once for the batch
    for i in range(B):  # an LP per example: HiGHS has no batched form
        enc = encode(graph, lo_in[i], hi_in[i], {t: (lu[0][i], lu[1][i]) for t, lu in pre.items()}, None,
                     linear_parts=parts)
        _solve_rows(enc, graph, spec[i], sol, i)
    sol.slopes = {a: s.to(device=C.device, dtype=ctx.dtype) for a, s in sol.slopes.items()}
    return sol


def free_hidden_boxes(enc: Encoding, graph) -> tuple[np.ndarray, np.ndarray]:
    """Column bounds of ``enc`` without the (implied) boxes of its hidden variables: affine-node
    variables free, unstable ReLU outputs ``>= 0`` only; inputs and the constant 0 unchanged."""
    lo, hi = enc.col_lower.copy(), enc.col_upper.copy()
    for k in enc.affine_rows:
        v = enc.var_of[k]
        lo[v], hi[v] = -np.inf, np.inf
    for _, yv, _ in enc.triangles.values():
        lo[yv], hi[yv] = 0.0, np.inf
    return lo, hi


def _solve_rows(enc: Encoding, graph, spec: np.ndarray, sol: LPSolutions, i: int) -> None:
    """Solve the S spec rows (S, K) of example ``i`` and record them in ``sol``."""
    A = enc.A.tocsc()
    n = A.shape[1]
    clo, chi = free_hidden_boxes(enc, graph)
    lp = highs_lp(A, np.zeros(n), clo, chi, enc.row_lower, enc.row_upper)
    h = new_highs()
    h.setOptionValue("threads", 1)
    h.setOptionValue("presolve", "off")  # keeps the basis between rows: each re-solve is warm-started
    h.passModel(lp)
    out_vars = enc.var_of[graph.output]
    cols = np.arange(n, dtype=np.int32)
    for s in range(spec.shape[0]):
        cost = np.zeros(n)
        np.add.at(cost, out_vars, spec[s])
        h.changeColsCost(n, cols, cost)
        h.run()
        res = h.getSolution()
        if _status_name(h.getModelStatus()) != "optimal" or not res.dual_valid or not res.value_valid:
            h.clearSolver()
            continue
        sol.ok[i, s] = True
        row_dual, col_dual = np.asarray(res.row_dual), np.asarray(res.col_dual)
        value = np.asarray(res.col_value)
        for a, (idx, yv, r0) in enc.triangles.items():
            if idx.size == 0:
                continue
            mu_z = np.maximum(row_dual[r0 : r0 + idx.size], 0.0)
            mu_0 = np.maximum(col_dual[yv], 0.0)
            total = mu_z + mu_0
            used = total > DUAL_ZERO
            keep = sol.slopes[a][i, s, idx].numpy()
            alpha = np.where(used, mu_z / np.where(used, total, 1.0), keep)
            sol.slopes[a][i, s, idx] = torch.from_numpy(np.clip(alpha, 0.0, 1.0))
            if a in sol.upper:  # the k upper rows follow the k rows y - z >= 0
                pi_u, z_star = sol.upper[a]
                pi_u[i, s, idx] = row_dual[r0 + idx.size : r0 + 2 * idx.size]
                z_star[i, s, idx] = value[enc.var_of[graph.nodes[a].inputs[0]][idx]]
        for k, (pi, ins) in sol.affine.items():
            r0 = enc.affine_rows.get(k)
            if r0 is None:  # a reshape: no rows of its own
                continue
            pi[i, s] = row_dual[r0 : r0 + pi.shape[2]]
            for v, j in zip(ins, graph.nodes[k].inputs):
                v[i, s] = value[enc.var_of[j]]


def _lagrangian(ctx: BoundContext, boxes: dict, sol: LPSolutions) -> Tensor:
    """(B, S) the parameter-dependent part of each LP's Lagrangian at its primal / dual solution
    (module doc, step 4): its gradient is the LP optimum's gradient."""
    graph = ctx.graph
    B, S = sol.ok.shape
    dev, dt = ctx.box.lower.device, ctx.dtype
    total = torch.zeros(B, S, dtype=dt, device=dev)
    as_t = lambda a: torch.from_numpy(a).to(device=dev, dtype=dt)  # noqa: E731
    for k, (pi, ins) in sol.affine.items():
        if not np.any(pi):
            continue
        node = graph.nodes[k]
        xs = [as_t(v).view(B * S, *graph.nodes[j].shape) for v, j in zip(ins, node.inputs)]
        out = ctx.affine_map(k).apply(*xs)
        total = total + (as_t(pi) * out.reshape(B, S, -1)).sum(-1)
    for a, (pi_u, z_star) in sol.upper.items():
        b = boxes[a]
        slope, icpt = relu_relax.upper_line(b.lower.flatten(1), b.upper.flatten(1))  # (B, n)
        total = total + (as_t(pi_u) * (slope.unsqueeze(1) * as_t(z_star) + icpt.unsqueeze(1))).sum(-1)
    return total


register_final("triangle", triangle_bounds)
register_method(BoundMethod(
    "triangle", "triangle", "crown", "adaptive",
    description="triangle LP with CROWN intermediate bounds, as a differentiable backward pass "
                "(LP-optimal slopes from HiGHS duals; small networks)",
))

__all__ = ["LPSolutions", "free_hidden_boxes", "lp_solutions", "triangle_bounds"]
