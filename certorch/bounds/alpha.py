"""alpha-CROWN: CROWN with optimised ReLU lower slopes (``method="alpha-crown"``).

CROWN lower-bounds ``relu(z) >= a z`` on an unstable neuron with a fixed slope ``a`` (adaptive:
0 or 1). Every ``a`` in [0, 1] gives a valid line, and the best one differs per spec row, so
alpha-CROWN makes the slopes free parameters, one per (spec row, neuron), for the final spec and
for the CROWN rows of every intermediate bound, and maximises the final lower bound by projected
gradient ascent (Adam, then clamping into [0, 1]). The intermediate bounds are recomputed from
the slopes in every iteration, so the gradient reaches the slopes of earlier layers through the
intermediate bounds (as in auto_LiRPA's ``CROWN-Optimized``).

Soundness and tightness:

* A pass with any slopes in [0, 1] is a CROWN pass with other valid lines: a sound bound.
  Stable neurons keep their exact lines (:func:`certorch.relax.relu.free_lower_lines`).
* The slopes start at CROWN's (``slope=``, adaptive by default), so iteration 0 is CROWN. A
  plain CROWN pass runs first as the reference; the result is the elementwise maximum over the
  reference and every iteration (each is a sound bound), and the returned intermediate bounds
  (``return_intermediate``) are the intersection over the reference and every iteration.
  Hence CROWN <= alpha-CROWN <= the triangle LP with those intermediate bounds. Inside an
  iteration the intermediate bounds are *not* intersected with CROWN's: a maximum with a fixed
  bound stops the gradient wherever that bound is tighter (and splits it on ties, as at
  iteration 0); measured, that optimised to looser bounds than auto_LiRPA's, without it they agree.
* Lower and upper bounds are optimised separately (the upper bound is the lower bound of -C
  with its own slopes); ``upper=False`` skips the second optimisation.

Slopes live in an :class:`AlphaSlopes` store for one call (``ctx.alpha``); the backward
interpreter asks it for the lines of a ReLU when it knows which rows it pushes (``rows``).
A slot is created on first use with the layout the pass needs: dense rows (B, k, n) or window
rows (B, k, C * kh * kw) (see :mod:`certorch.bounds.patches`). The result carries an
:class:`AlphaState` (``BoundResult.extra["alpha"]``) that a later call takes back
(``alpha_state=``): slopes are matched by row identity (target neuron or spec row), so a warm
start works when the set of intermediate rows changes (e.g. a sub-box in branch and bound);
rows it does not know start from CROWN's slopes. Rows (or, with optimised intermediate slopes,
examples) where no iteration beat the CROWN reference are exported unknown (NaN), so a warm
start begins from the slopes of the best bound found, not from a worse iteration's.

The result is not differentiable (the slopes are optimised inside; the returned bounds are
detached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from certorch.bounds.backward import backward_bounds, chunked_bounds, row_numel
from certorch.bounds.context import BoundContext
from certorch.bounds.ibp import ibp_box, ibp_is_exact
from certorch.bounds.intermediate import pre_bounds
from certorch.bounds.patches import Patches
from certorch.domains.box import Box
from certorch.errors import CertorchError, DeadlineExceeded

#: defaults of auto_LiRPA 0.3's ``CROWN-Optimized``: iterations, Adam learning rate, decay per step
DEFAULT_ITERS = 20
DEFAULT_LR = 0.5
#: Adam learning rate of the split multipliers (beta), alpha-beta-CROWN's default
BETA_LR = 0.05
LR_DECAY = 0.98
#: per (row, neuron) coefficient of an iteration: tensors autograd keeps per relaxation step
#: (the coefficients, their negative part, the lines) + slope, gradient, Adam moments, best copy
SAVED_PER_ENTRY = 8

SlotKey = tuple[int, int, int]  # (target node, activation node, +1 for rows C / -1 for rows -C)
#: third entry of the slot key of split multipliers: (target, split node, BETA)
BETA = 2


@dataclass
class AlphaState:
    """Optimised slopes of one alpha-CROWN call, for a warm start (``alpha_state=``).

    ``sides["lower"]`` (slopes that maximise the lower bounds) and ``sides["upper"]`` map
    ``(target node, activation node, sign)`` to ``(ids (R,), slopes (B, R, D))``: row ``r``
    bounds neuron ``ids[r]`` of the target (the spec row for the output), with sign +1 for the
    row and -1 for its negation; D is the row's extent at the activation (the activation's size
    for dense rows, C * kh * kw for window rows). NaN marks a slope that is not known.
    Split multipliers (``splits=``) are kept as ``(target, split node, BETA)`` -> (ids, beta (B, R, n)).
    ``signature`` names the graph's nodes (a state is refused on another network).
    """

    signature: tuple[str, ...]
    batch: int
    sides: dict[str, dict[SlotKey, tuple[Tensor, Tensor]]]

    def select(self, index) -> "AlphaState":
        """The slopes of examples ``index`` (a slice, an index tensor or list; repeats allowed,
        e.g. a parent's slopes for both children of a split)."""
        if isinstance(index, slice):
            batch = len(range(*index.indices(self.batch)))
        else:
            index = torch.as_tensor(index, dtype=torch.long)
            batch = index.numel()
        sides = {s: {k: (ids, v[index]) for k, (ids, v) in d.items()} for s, d in self.sides.items()}
        return AlphaState(self.signature, batch, sides)

    @staticmethod
    def cat(states: list["AlphaState"]) -> "AlphaState":
        """Batch concatenation; rows one state lacks are NaN (unknown) for its examples."""
        first = states[0]
        sides: dict[str, dict] = {}
        for side in {s for st in states for s in st.sides}:
            keys = {k for st in states for k in st.sides.get(side, {})}
            out = {}
            for key in keys:
                parts = [st.sides.get(side, {}).get(key) for st in states]
                merged = _union(parts, [st.batch for st in states])
                if merged is not None:
                    out[key] = merged
            sides[side] = out
        return AlphaState(first.signature, sum(st.batch for st in states), sides)


def _union(parts: list, batches: list[int]) -> tuple[Tensor, Tensor] | None:
    """Concatenate (ids, slopes) parts along the batch over the union of their ids."""
    known = [p for p in parts if p is not None]
    D = known[0][1].shape[2]
    if any(p[1].shape[2] != D for p in known):
        return None
    if len(known) == len(parts) and all(torch.equal(p[0], known[0][0]) for p in known[1:]):
        return known[0][0], torch.cat([p[1] for p in known], 0)  # the same rows everywhere (branch and bound)
    ids = torch.unique(torch.cat([p[0] for p in known]))
    ref = known[0][1]
    blocks = []
    for p, b in zip(parts, batches):
        full = ref.new_full((b, ids.numel(), D), math.nan)
        if p is not None:
            full[:, torch.searchsorted(ids, p[0])] = p[1]
        blocks.append(full)
    return ids, torch.cat(blocks, 0)


def _lookup(ids: Tensor, old_ids: Tensor, old: Tensor) -> Tensor:
    """Slopes (B, k, D) of rows ``ids`` (k,) from a stored (old_ids (R,), old (B, R, D)); NaN where unknown."""
    order = torch.argsort(old_ids)
    srt = old_ids[order]
    pos = torch.searchsorted(srt, ids).clamp(max=max(srt.numel() - 1, 0))
    found = srt[pos] == ids if srt.numel() else torch.zeros_like(ids, dtype=torch.bool)
    vals = old[:, order[pos]] if srt.numel() else old.new_full((old.shape[0], ids.numel(), old.shape[2]), math.nan)
    return torch.where(found[None, :, None], vals, torch.full_like(vals, math.nan))


def signature(graph) -> tuple[str, ...]:
    return tuple(f"{n.name}:{n.op.kind}:{n.shape}" for n in graph.nodes)


class AlphaSlopes:
    """Slopes of one optimisation (one side): leaf tensors per (target, activation, sign, chunk).

    ``warm``: stored slopes ``{(target, act, sign): (ids, slopes)}`` to start from.
    """

    def __init__(self, warm: dict | None, target: int | None = None, beta: bool = False, record: bool = False):
        self.slots: dict[tuple[int, int, int, int], Tensor] = {}
        self.slot_ids: dict[tuple[int, int, int, int], Tensor] = {}
        self.warm = warm or {}
        self.target = target  # the spec's node: its rows get split multipliers and have coefficients recorded
        self.beta = beta and target is not None
        self.beta_keys: set[tuple[int, int, int, int]] = set()
        self.coefficients: dict[int, Tensor] = {}  # node -> last coefficients of the target's rows there
        self.recording = record  # keep them (B x spec rows x neurons per ReLU: only when asked)

    # --- what the backward interpreter asks ------------------------------------------------

    @staticmethod
    def rows_of(target: int, s0: int, ids: Tensor, negated: bool, unit_rows: int, windows: bool) -> tuple:
        """Identity of a chunk of rows: the chunk's start, its row ids, whether the pass also
        holds the negated rows (:func:`certorch.bounds.backward.with_negation`), rows per window
        position, and whether the rows start as windows (:class:`Patches`: rows and negated rows
        then alternate per window position, also after a conversion to dense)."""
        return target, s0, ids, negated, unit_rows, windows

    def has_beta(self, rows: tuple) -> bool:
        """True when this pass's rows carry split multipliers (the spec's rows, with splits)."""
        return self.beta and rows[0] == self.target

    def record(self, rows: tuple, node: int, A) -> None:
        """Keep the coefficients (detached) that the spec's rows have at the value of ``node``
        (an activation's output, or the network's input): branching scores and the minimiser
        of the linear bound read them (``BoundResult.extra["coefficients"]`` by node name)."""
        if self.recording and rows[0] == self.target:
            self.coefficients[node] = (A.to_dense() if isinstance(A, Patches) else A).detach()

    def beta_backward(self, rows: tuple, node: int, A: Tensor, split: Tensor) -> Tensor:
        """Add the Lagrangian terms of the split constraints ``s_j z_j >= 0`` of ``node`` to the
        coefficients A (L, k, *shape) of z (beta-CROWN): for ``beta >= 0`` and every x of the
        domain, ``A z >= (A - beta s) z``, so a lower bound of the right side over the whole
        input box is one over the domain, and maximising over beta recovers what the
        constraints cut off. ``split``: (B, n) in {-1, 0, +1}. Returns (B, k, *shape)."""
        target, s0, ids, negated, G, from_windows = rows
        key = (target, node, BETA, s0)
        B, n = split.shape
        beta = self.slots.get(key)
        if beta is None:
            with torch.no_grad():
                first = A.new_zeros(B, ids.numel(), n)
                old = self.warm.get(key[:3])
                if old is not None and old[1].shape[2] == n:
                    prev = _lookup(ids.to(old[0].device), old[0], old[1]).to(first.device, first.dtype)
                    first = torch.where(torch.isnan(prev), first, prev.clamp(min=0.0))
                beta = first.requires_grad_(True)
            self.slots[key] = beta
            self.slot_ids[key] = ids
            self.beta_keys.add(key)
        s = split.to(A.dtype).unsqueeze(1)  # (B, 1, n)
        A_new = A.flatten(2) - beta.clamp(min=0.0) * s
        return A_new.view(A_new.shape[:2] + A.shape[2:])

    def relu_backward(self, relax, rows: tuple, act: int, A, box: Box, mode: str):
        """Push coefficients A (dense (L, S, *shape) or :class:`Patches`) back through the ReLU
        ``act`` with this store's lower slopes. Returns (coefficients of the ReLU's input, constant (B, S))."""
        l, u = box.lower, box.upper
        B = l.shape[0]
        s_low, ds, b_up, _ = relax.backward_lines(l, u, mode)  # ReLU: no lower intercept
        unstable = relax.masks(l, u)[2]
        if isinstance(A, Patches):
            g = A.gather(torch.cat([s_low, ds, b_up, unstable.to(l.dtype)], 0)).flatten(3)  # (4B, U, 1, D)
            s, d, b = g[:B], g[B : 2 * B], g[2 * B : 3 * B]
            alpha = self.slopes(rows, act, s, True)
            s, d = relax.free_lower_lines(s, d, g[3 * B :] > 0.5, alpha)
            P_in, c_add = relax.apply_lines(A.P.flatten(3), s, d, b)
            return A.with_P(P_in.view(P_in.shape[:3] + A.P.shape[3:]), clean=True), A.flat_rows(c_add)
        s, d, b = (t.flatten(1).unsqueeze(1) for t in (s_low, ds, b_up))
        alpha = self.slopes(rows, act, s, False)
        s, d = relax.free_lower_lines(s, d, unstable.flatten(1).unsqueeze(1), alpha)
        A_new, const = relax.apply_lines(A.flatten(2), s, d, b)
        return A_new.view(A_new.shape[:2] + A.shape[2:]), const

    # --- slots --------------------------------------------------------------------------------

    def slopes(self, rows: tuple, act: int, init: Tensor, windows: bool) -> Tensor:
        """Slopes in the pass's layout: dense (B, k', n), windows (B, U, G', D); k' = k or 2k
        and G' = G or 2G with negated rows. ``init``: CROWN's slopes, (B, 1, n) or (B, U, 1, D).
        ``windows``: the coefficients are :class:`Patches` at this activation."""
        target, s0, ids, negated, G, from_windows = rows
        parts = [self._slot((target, act, sign, s0), ids, init, windows, G) for sign in ((1, -1) if negated else (1,))]
        if not from_windows:  # dense spec rows: [rows; negated rows]
            return torch.cat(parts, 1) if negated else parts[0]
        B, k, D = parts[0].shape
        parts = [p.view(B, k // G, G, D) for p in parts]
        grouped = torch.cat(parts, 2) if negated else parts[0]  # (B, U, G', D), as Patches.stacked_with_negation
        return grouped if windows else grouped.reshape(B, -1, D)  # Patches.to_dense keeps this row order

    def _slot(self, key: tuple[int, int, int, int], ids: Tensor, init: Tensor, windows: bool, G: int) -> Tensor:
        a = self.slots.get(key)
        if a is not None:
            return a
        B, k = init.shape[0], ids.numel()
        with torch.no_grad():
            if windows:
                first = init.expand(B, init.shape[1], G, init.shape[3]).reshape(B, k, init.shape[3])
            else:
                first = init.expand(B, k, init.shape[2])
            old = self.warm.get(key[:3])
            if old is not None and old[1].shape[2] == first.shape[2]:
                prev = _lookup(ids.to(old[0].device), old[0], old[1]).to(first.device, first.dtype)
                first = torch.where(torch.isnan(prev), first, prev.clamp(0.0, 1.0))
            a = first.detach().clone().requires_grad_(True)
        self.slots[key] = a
        self.slot_ids[key] = ids
        return a

    def export(self, values: dict) -> dict[SlotKey, tuple[Tensor, Tensor]]:
        """``{(target, act, sign): (ids, slopes (B, R, D))}`` from per-chunk ``values``."""
        groups: dict[SlotKey, list] = {}
        for key in sorted(values):
            groups.setdefault(key[:3], []).append((self.slot_ids[key], values[key]))
        return {k: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v], 1)) for k, v in groups.items()}


@dataclass(frozen=True)
class AlphaOptions:
    iters: int = DEFAULT_ITERS
    lr: float = DEFAULT_LR
    state: AlphaState | None = None
    beta_lr: float = BETA_LR


def check_options(iters: Any = None, lr: Any = None, state: Any = None, coefficients: bool = False) -> dict[str, Any]:
    """Validated ``ct.bound`` options of alpha-CROWN as a dict for ``BoundContext.options``."""
    out: dict[str, Any] = {}
    if coefficients:
        out["alpha_coefficients"] = True
    if iters is not None:
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise CertorchError(f"alpha_iters must be a positive integer, got {iters!r}")
        out["alpha_iters"] = iters
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise CertorchError(f"alpha_lr must be a positive finite number, got {lr!r}")
        out["alpha_lr"] = float(lr)
    if state is not None:
        if not isinstance(state, AlphaState):
            raise CertorchError(f"alpha_state must be an AlphaState (BoundResult.extra['alpha']), got {type(state).__name__}")
        out["alpha_state"] = state
    return out


def _options(ctx: BoundContext) -> AlphaOptions:
    o = ctx.options
    state = o.get("alpha_state")
    if state is not None:
        if state.signature != signature(ctx.graph):
            raise CertorchError("alpha_state was computed for another network (its graph differs)")
        if state.batch != ctx.batch:
            raise CertorchError(f"alpha_state holds {state.batch} examples but the batch has {ctx.batch}; "
                                "use AlphaState.select to pick the matching examples")
    return AlphaOptions(o.get("alpha_iters", DEFAULT_ITERS), o.get("alpha_lr", DEFAULT_LR), state)


def _fresh(ctx: BoundContext, **changes) -> BoundContext:
    """A context for one pass sharing the call's IBP boxes, affine maps and clean values."""
    sub = replace(ctx, boxes={}, regions={}, forward_done=set(), extra={}, **changes)
    sub._values = ctx._values
    return sub


def alpha_bounds(ctx: BoundContext, C: Tensor, upper: bool = True) -> tuple[Tensor, Tensor | None]:
    """alpha-CROWN lower (and upper) bounds (B, S) of ``C . f(x)``, C: (B, S, *out_shape).

    Sets ``ctx.boxes`` (intermediate bounds: the intersection over the reference and every
    iteration) and ``ctx.extra["alpha"]`` (:class:`AlphaState` of the best slopes per example).
    """
    opts = _options(ctx)
    out = ctx.graph.output
    ref = _fresh(ctx, intermediate="crown", alpha=None)
    with torch.no_grad():  # the reference: plain CROWN (also builds the IBP boxes and affine maps once)
        ref_low, ref_up = backward_bounds(ref, out, C, lambda i: pre_bounds(ref, i), upper)
    ctx._values = ref._values
    if ctx.refine:  # refined by the reference's CROWN pass; the iterations keep those bounds
        ctx.given, ctx.refine = {**ctx.given, **ref.boxes}, frozenset()
    warm = opts.state.sides if opts.state is not None else {}
    ctx.extra = {}
    lower, lo_slopes, boxes = _optimise(ctx, C, ref_low, ref.boxes, opts, warm.get("lower"))
    sides = {"lower": lo_slopes}
    up = None
    if upper:
        neg, up_slopes, up_boxes = _optimise(ctx, -C, -ref_up, ref.boxes, opts, warm.get("upper"))
        up = -neg
        sides["upper"] = up_slopes
        boxes = {k: b.intersect(up_boxes[k]) if k in up_boxes else b for k, b in boxes.items()}
    ctx.boxes = boxes
    ctx.extra["alpha"] = AlphaState(signature(ctx.graph), ctx.batch, sides)
    return lower, up


def _optimise(ctx: BoundContext, C: Tensor, ref_low: Tensor, ref_boxes: dict[int, Box], opts: AlphaOptions,
              warm: dict | None) -> tuple[Tensor, dict, dict[int, Box]]:
    """Maximise the lower bounds of ``C . f`` over the slopes. Returns (best lower bounds (B, S),
    exported best slopes (per spec row when only the spec's rows have slopes, else per example;
    NaN where no iteration beat the CROWN reference), intersected intermediate bounds)."""
    out = ctx.graph.output
    S = C.shape[1]
    ids = torch.arange(S, device=C.device)
    store = AlphaSlopes(warm, out, beta=bool(ctx.splits), record=bool(ctx.options.get("alpha_coefficients")))
    best = ref_low.detach().clone()
    best_boxes = dict(ref_boxes)
    # the reference is the first candidate: slopes are exported where an iteration beat it, NaN
    # (unknown: CROWN's slopes when warm-started) where it did not, so a warm start from the
    # state reproduces the best bound found, also when that is the reference's
    best_sum = best.sum(1)
    best_alpha: dict[tuple, Tensor] = {}
    best_rows = best.clone()
    opt = None
    for t in range(opts.iters):
        it = _fresh(ctx, intermediate="crown", alpha=store)
        try:
            with torch.set_grad_enabled(opts.iters > 1):  # one pass (evaluating warm slopes): no gradient
                low, _ = chunked_bounds(it, out, lambda s0, s1: C[:, s0:s1], S, lambda i: pre_bounds(it, i), False,
                                        ids=ids)
        except DeadlineExceeded:
            break  # every finished iteration (and the reference) is a sound bound: keep the best
        with torch.no_grad():
            best = torch.maximum(best, low.detach())
            for k, b in it.boxes.items():
                best_boxes[k] = best_boxes[k].intersect(b) if k in best_boxes else b
            best_boxes = {k: Box(b.lower.detach(), b.upper.detach()) for k, b in best_boxes.items()}
            total = low.detach().sum(1)
            better = total > best_sum
            best_sum = torch.maximum(best_sum, total)
            # with fixed intermediate bounds (only the spec's rows have slopes) a row's bound depends
            # on its own slopes and multipliers only: keep each row's best, so the exported state
            # reproduces every row's best bound (branch and bound's children and float64 checks)
            per_row = all(k[0] == out for k in store.slots)
            row_better = low.detach() > best_rows  # (B, S)
            best_rows = torch.maximum(best_rows, low.detach())
            for key, a in store.slots.items():
                kept = best_alpha.get(key)
                if kept is None:
                    kept = torch.full_like(a, math.nan)
                if per_row and a.dim() == 3 and a.shape[1] == store.slot_ids[key].numel():
                    m = row_better[:, store.slot_ids[key].to(row_better.device)].unsqueeze(-1)  # (B, k, 1)
                    best_alpha[key] = torch.where(m, a.detach(), kept)
                else:
                    kept[better] = a.detach()[better]
                    best_alpha[key] = kept
        keys = list(store.slots)
        params = [store.slots[k] for k in keys]
        if t == opts.iters - 1 or not params or not low.requires_grad:
            break
        if opt is None:  # slopes in [0, 1], split multipliers in [0, inf)
            opt = {False: ProjectedAdam([], opts.lr), True: ProjectedAdam([], opts.beta_lr, high=None)}
            seen: set = set()
        new = [k for k in keys if k not in seen]  # slots are created in the first iteration
        for k in new:
            opt[k in store.beta_keys].extend([store.slots[k]])
            seen.add(k)
        with torch.enable_grad():
            grads = dict(zip(keys, torch.autograd.grad(-low.sum(), params, allow_unused=True)))
        for is_beta, o in opt.items():
            o.step([grads[k] for k in keys if (k in store.beta_keys) == is_beta])
    if store.recording and not ctx.extra.get("coefficients"):  # the first optimisation's (lower bounds of C)
        names = {i: ctx.graph.nodes[i].name for i in store.coefficients}
        ctx.extra["coefficients"] = {names[i]: A for i, A in store.coefficients.items()}
    return best, store.export(best_alpha), best_boxes


class ProjectedAdam:
    """Adam (Kingma & Ba, with bias correction; torch's defaults betas (0.9, 0.999), eps 1e-8)
    on a list of tensors, each step followed by the projection onto [0, 1] and a learning-rate
    decay (``decay`` per step, as ``ExponentialLR``). Hand-written: building a
    ``torch.optim`` optimizer imports torch._dynamo (about 2 s in a fresh process), and torch
    2.13's fused CPU Adam misreads non-contiguous gradients."""

    def __init__(self, params: list[Tensor], lr: float, decay: float = LR_DECAY,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, high: float | None = 1.0):
        self.params, self.lr, self.decay, self.betas, self.eps = params, lr, decay, betas, eps
        self.high = high  # projection onto [0, high] ([0, inf) with None)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def extend(self, params: list[Tensor]) -> None:
        self.params = self.params + params
        self.m += [torch.zeros_like(p) for p in params]
        self.v += [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[Tensor | None]) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if g is None:
                continue
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(math.sqrt(bc2)).add_(self.eps), value=-self.lr / bc1)
            p.clamp_(0.0, self.high)
        self.lr *= self.decay


def peak_bytes(ctx: BoundContext, spec_rows: int, itemsize: int) -> float:
    """Estimated bytes per example of one alpha-CROWN iteration: every backward pass of the
    iteration keeps its coefficients for the gradient, and each (row, neuron) has a slope
    with its Adam state. Rows per intermediate target from the IBP-unstable neurons (as in
    :func:`certorch.bounds.intermediate.crown_box`); each row counted at its widest extent at
    every activation (deliberately generous)."""
    graph = ctx.graph
    total = 0.0
    with torch.no_grad():
        targets: list[tuple[int, int, bool]] = []
        for a in graph.activation_nodes():
            t = a.inputs[0]
            if t in ctx.given or ibp_is_exact(ctx, t):
                continue
            box = ibp_box(ctx, t)
            unstable = ((box.lower.flatten(1) < 0) & (box.upper.flatten(1) > 0)).any(0)
            nu = int(unstable.sum())
            shape = graph.nodes[t].shape
            windows = ctx.patches and len(shape) == 3
            rows = nu
            if windows:
                per_pos = shape[0] * int(unstable.view(shape[0], -1).any(0).sum())
                rows = per_pos if 2 * nu >= per_pos else nu
            targets.append((t, 2 * rows, windows))
        targets.append((graph.output, spec_rows, False))
        for t, rows, windows in targets:
            if rows == 0:
                continue
            acts = sum(1 for i in graph.ancestors(t) if graph.nodes[i].is_activation)
            total += rows * row_numel(ctx, t, windows) * (acts + 1) * SAVED_PER_ENTRY
    return total * itemsize
