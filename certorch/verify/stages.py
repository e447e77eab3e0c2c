"""Verification problems and stages (small objects with one ``run`` method, DESIGN.md item 7).

A :class:`Problem` is a batch of B properties sharing one output-spec structure:

* input set: ``box`` (B, *input_shape), float64;
* output spec: rows ``C`` (B, S, K) and offsets ``d`` (B, S) grouped into ``regions`` (tuples of
  row indices). The value of region ``g`` at x is ``v_g(x) = max_{r in g} (C_r f(x) + d_r)``; the
  property holds iff ``v_g(x) > 0`` for every region and every x in the box. Classification
  margins: one row ``e_y - e_j`` per region. VNN-LIB: one region per unsafe disjunct.

A :class:`Stage` sees the undecided examples and returns per-example verdicts (or None), lower
bounds and candidate counterexamples. The pipeline's final entry point
(:func:`certorch.verify.pipeline.run_stages`) enforces the invariants (timing, errors,
float64 recheck of counterexamples).

Time: a stage gets ``budget`` (seconds left per example). Batched stages turn it into one
absolute deadline (:func:`batch_deadline`) that they pass on (``ct.bound(..., deadline=)`` stops
between layers); per-example stages give each example ``start + budget[pos]``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch
from torch import Tensor, nn

from certorch.bounds.alpha import DEFAULT_ITERS, DEFAULT_LR, check_options
from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.verify.options import parse_stage_options
from certorch.verify.results import Verdict


@dataclass
class Problem:
    model: nn.Module
    box: Box
    C: Tensor
    d: Tensor
    regions: tuple[tuple[int, ...], ...]
    x: Tensor | None = None  # clean points (B, *in), float64
    y: Tensor | None = None  # labels (B,) for classification problems
    eps: float | None = None  # radius of the L-inf ball (classification), for certificates that need it
    threads: int = 1
    solver_log: TextIO | None = None  # where LP/MILP solver logs go (None: silent; never stdout)
    scratch: dict = field(default_factory=dict)  # per-call caches (node bounds, region lower bounds)

    @property
    def batch(self) -> int:
        return self.box.lower.shape[0]

    def model_dtype(self, default: torch.dtype = torch.float64) -> torch.dtype:
        """dtype of the model's parameters (``default`` for a model without any)."""
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None else default

    @property
    def center(self) -> Tensor:
        return self.x if self.x is not None else self.box.center

    def region_index(self) -> Tensor:
        """(R, Lmax) row indices per region, padded with -1."""
        L = max(len(g) for g in self.regions)
        idx = torch.full((len(self.regions), L), -1, dtype=torch.long)
        for k, g in enumerate(self.regions):
            idx[k, : len(g)] = torch.tensor(g)
        return idx

    def region_max(self, rows: Tensor) -> Tensor:
        """(n, S) per-row quantities -> (n, R) max over each region's rows."""
        idx = self.region_index().to(rows.device)
        padded = torch.cat([rows, torch.full_like(rows[:, :1], -math.inf)], dim=1)
        return padded[:, idx.clamp(min=-1) % (rows.shape[1] + 1)].amax(dim=2)

    def values(self, out: Tensor, idx: Tensor) -> Tensor:
        """Region values (n, R) of outputs ``out`` (n, K) for examples ``idx`` (n,)."""
        C, d = self.C[idx].to(out.dtype), self.d[idx].to(out.dtype)
        return self.region_max(torch.einsum("nsk,nk->ns", C, out.flatten(1)) + d)

    def region_lb(self, i: int) -> np.ndarray:
        """Best known lower bounds (R,) of example ``i``'s region values."""
        store = self.scratch.setdefault("region_lb", {})
        if i not in store:
            store[i] = np.full(len(self.regions), -np.inf)
        return store[i]

    def update_region_lb(self, idx: Tensor, lbs: Tensor) -> None:
        for pos, i in enumerate(idx.tolist()):
            cur = self.region_lb(i)
            np.maximum(cur, lbs[pos].detach().cpu().numpy(), out=cur)


@dataclass
class StageOutput:
    """Per-example outputs (n = number of examples given to the stage)."""

    verdicts: list[Verdict | None]
    lower: Tensor | None = None  # (n,) lower bounds of min over regions
    counterexamples: dict[int, Tensor] = field(default_factory=dict)  # position -> (*in,)
    seconds: list[float] | None = None  # per-example seconds (per-example stages)
    timed_out: list[bool] | None = None
    messages: dict[int, str] = field(default_factory=dict)


class Stage:
    """Subclasses set ``name`` and implement :meth:`run`; ``batched`` stages run on all
    undecided examples at once (their time is shared equally)."""

    name: str = "stage"
    batched: bool = True

    def run(self, problem: Problem, idx: Tensor, budget: np.ndarray) -> StageOutput:
        """``idx``: (n,) undecided example indices; ``budget``: (n,) seconds left per example."""
        raise NotImplementedError


def batch_deadline(budget: np.ndarray) -> float:
    """Absolute ``time.perf_counter()`` deadline of a batched stage: its time is shared equally by
    the n examples, so it may run ``n * min(budget)`` seconds before any example is over budget."""
    b = np.asarray(budget, dtype=np.float64)
    return time.perf_counter() + float(b.min()) * b.size if b.size else time.perf_counter()


def float64_forward(problem: Problem, x: Tensor) -> Tensor:
    """Float64 outputs (n, K) at (n, *in) inputs, through the captured graph (model untouched)."""
    from certorch.graph.capture import capture

    x = x.to(torch.float64)
    try:
        graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    except CertorchError:
        import copy

        m = problem.scratch.get("model64")
        if m is None:
            m = problem.scratch["model64"] = copy.deepcopy(problem.model).to(torch.float64).eval()
        with torch.no_grad():
            return m(x).flatten(1)
    with torch.no_grad():
        return graph.forward(x)[graph.output].flatten(1)


class CleanStage(Stage):
    """Classification: the clean point must be classified as ``y`` (else NOT_VERIFIED).
    Other specs: the box center is tried as a counterexample."""

    name = "clean"

    def run(self, problem, idx, budget):
        x = problem.center[idx]
        out = float64_forward(problem, x)
        n = idx.numel()
        if problem.y is not None:
            wrong = out.argmax(dim=1) != problem.y[idx].to(out.device)
            return StageOutput([Verdict.NOT_VERIFIED if w else None for w in wrong.tolist()])
        v = problem.values(out, idx).amin(dim=1)
        bad = (v <= 0).tolist()
        return StageOutput([Verdict.FALSIFIED if b else None for b in bad],
                           counterexamples={p: x[p] for p in range(n) if bad[p]})


class BoundStage(Stage):
    """IBP / CROWN / any ``ct.bound`` method, batched; CROWN also caches per-node bounds.

    The bound call gets the stage's deadline (it raises ``DeadlineExceeded`` between layers);
    a result that is an estimate (``sound=False``) never verifies.
    """

    def __init__(self, method: str):
        self.method = method
        self.name = method

    def run(self, problem, idx, budget):
        return self.run_until(problem, idx, batch_deadline(budget))

    def run_until(self, problem: Problem, idx: Tensor, deadline: float) -> StageOutput:
        from certorch.bounds.api import bound

        keep = method_keeps_nodes(self.method)
        with torch.no_grad():
            res = bound(problem.model, problem.center[idx], method=self.method, C=problem.C[idx],
                        box=problem.box[idx], dtype=torch.float64, return_intermediate=keep,
                        deadline=deadline if math.isfinite(deadline) else None, **self.bound_options(problem, idx))
        if not getattr(res, "sound", True):
            raise CertorchError(f"bound method {self.method!r} returned estimates, not sound bounds")
        rows = res.lower + problem.d[idx].to(res.lower.dtype)
        reg = problem.region_max(rows)
        problem.update_region_lb(idx, reg)
        if keep:
            cache_node_bounds(problem, idx, res.intermediate)
        self.after_bound(problem, idx, res)
        lower = reg.amin(dim=1)
        return StageOutput([Verdict.VERIFIED if v > 0 else None for v in lower.tolist()], lower=lower)

    def bound_options(self, problem: Problem, idx: Tensor) -> dict:
        """Extra ``ct.bound`` keywords of this stage."""
        return {}

    def after_bound(self, problem: Problem, idx: Tensor, res) -> None:
        """Hook after the bound call (e.g. keep method outputs in ``problem.scratch``)."""


@dataclass(frozen=True)
class AlphaCrownOptions:
    """Settings of the ``alpha-crown`` stage, also written after its name
    (``alpha-crown:iters=5:lr=0.5``): ``iters`` slope-optimisation iterations, ``lr`` Adam's
    learning rate, ``low_precision`` optimise the slopes in the model's dtype and certify with
    one float64 pass (see :class:`AlphaCrownStage`). Fewer iterations leave more of a per-example
    timeout to a following ``bab`` stage (docs/verification.md, "alpha-CROWN iterations")."""

    iters: int = DEFAULT_ITERS
    lr: float = DEFAULT_LR
    low_precision: bool = True

    def __post_init__(self):
        check_options(self.iters, self.lr)

    @classmethod
    def parse(cls, text: str) -> "AlphaCrownOptions":
        return parse_stage_options(cls, text, "alpha-crown")


class AlphaCrownStage(BoundStage):
    """alpha-CROWN (optimised ReLU lower slopes), batched, lower bounds only. Its intermediate
    bounds replace CROWN's in the per-node cache (LP/MILP stages then use the tighter ones); the
    optimised slopes are kept in ``problem.scratch["alpha"]`` as ``(example indices, AlphaState)``
    for a later stage's warm start (``state.select(positions)``).

    Precision: the slopes are *optimised* in the model's dtype (float32 for most models: about
    half the time of float64 per pass), then one float64 pass with those slopes gives the bounds
    (``alpha_iters=1`` warm-started: the maximum of a float64 CROWN pass and the float64 pass with
    the optimised slopes). Any slopes in [0, 1] give a sound bound, so where they were found
    does not matter for soundness; the float64 pass is what certifies. A float64 model optimises
    in float64 directly (``low_precision=False`` forces that for any model)."""

    def __init__(self, iters: int | None = None, lr: float | None = None, low_precision: bool = True):
        super().__init__("alpha-crown")
        self.iters, self.lr, self.low_precision = iters, lr, low_precision
        self._given: dict[str, Box] | None = None
        self._warm = None

    def run_until(self, problem, idx, deadline):
        """When optimising every intermediate bound's slopes does not fit the memory budget
        (deep residual nets), optimise the spec rows' slopes only, on CROWN's intermediate
        bounds (computed by the ``crown`` stage, or now)."""
        from certorch.errors import MemoryBudgetError

        self._given = self._warm = None
        try:
            self._warm = self.optimise_slopes(problem, idx, deadline)
            return super().run_until(problem, idx, deadline)
        except MemoryBudgetError:
            self._given = crown_intermediate(problem, idx, deadline)
            self._warm = self.optimise_slopes(problem, idx, deadline)
            return super().run_until(problem, idx, deadline)

    def optimise_slopes(self, problem: Problem, idx: Tensor, deadline: float):
        """AlphaState of slopes optimised in the model's dtype, or None (float64 model, or
        ``low_precision=False``: the float64 call optimises itself). Leaves a fifth of the time
        left to the float64 pass."""
        from certorch.bounds.api import bound

        dtype = problem.model_dtype()
        if not self.low_precision or dtype == torch.float64:
            return None
        now = time.perf_counter()
        inner = now + 0.8 * (deadline - now) if math.isfinite(deadline) else None
        with torch.no_grad():  # ct.bound casts the point, box, spec and given bounds to ``dtype``
            res = bound(problem.model, problem.center[idx], method="alpha-crown", C=problem.C[idx], box=problem.box[idx],
                        dtype=dtype, upper=False, alpha_iters=self.iters, alpha_lr=self.lr, deadline=inner,
                        intermediate_bounds=self._given)
        return res.extra.get("alpha")

    def bound_options(self, problem, idx):
        opts = {"upper": False, "alpha_iters": self.iters, "alpha_lr": self.lr}
        if self._warm is not None:  # evaluate the optimised slopes (and CROWN's) in float64
            opts.update(alpha_state=self._warm, alpha_iters=1)
        if self._given is not None:
            opts["intermediate_bounds"] = self._given
        return opts

    def after_bound(self, problem, idx, res):
        if "alpha" in res.extra:
            problem.scratch["alpha"] = (idx.clone(), res.extra["alpha"])


def method_keeps_nodes(method: str) -> bool:
    return method in ("crown", "alpha-crown")


def cache_node_bounds(problem: Problem, idx: Tensor, intermediate: dict[str, Box]) -> None:
    """Store flat float64 numpy (l, u) per node index for each example of ``idx``."""
    from certorch.graph.capture import capture

    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    names = {n.name: n.index for n in graph.nodes}
    store = problem.scratch.setdefault("node_bounds", {})
    flat = {names[k]: (b.lower.detach().flatten(1).cpu().numpy(), b.upper.detach().flatten(1).cpu().numpy())
            for k, b in intermediate.items() if k in names}
    for pos, i in enumerate(idx.tolist()):
        store[i] = {k: (l[pos].copy(), u[pos].copy()) for k, (l, u) in flat.items()}


def crown_intermediate(problem: Problem, idx: Tensor, deadline: float = math.inf) -> dict[str, Box]:
    """``{name: Box (n, *shape)}`` cached per-node bounds of every activation input, for examples ``idx``."""
    from certorch.graph.capture import capture

    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    per = [node_bounds(problem, i, deadline) for i in idx.tolist()]
    out = {}
    for a in graph.activation_nodes():
        node = graph.nodes[a.inputs[0]]
        if all(node.index in b for b in per):
            lo = torch.stack([torch.from_numpy(b[node.index][0]) for b in per]).view(-1, *node.shape)
            hi = torch.stack([torch.from_numpy(b[node.index][1]) for b in per]).view(-1, *node.shape)
            out[node.name] = Box(lo, hi)
    return out


def node_bounds(problem: Problem, i: int, deadline: float = math.inf) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per-node CROWN bounds of example ``i`` (computed on demand before ``deadline``, cached)."""
    store = problem.scratch.setdefault("node_bounds", {})
    if i not in store:
        BoundStage("crown").run_until(problem, torch.tensor([i]), deadline)
    return store[i]


class AttackStage(Stage):
    """PGD (or CW) from :mod:`certorch.attacks` for classification; a projected sign-gradient
    descent on the region values for other specs. Candidates are rechecked by the pipeline."""

    def __init__(self, name: str = "pgd", steps: int = 40, restarts: int = 2, seed: int = 0):
        self.name = name
        self.steps, self.restarts, self.seed = steps, restarts, seed

    def run(self, problem, idx, budget):
        box = problem.box[idx]
        if problem.y is not None:
            from certorch.attacks import build_attack

            kw = dict(steps=self.steps, seed=self.seed)
            if self.name == "pgd":
                kw.update(restarts=self.restarts, loss="margin")
            atk = build_attack(self.name, **kw)
            dt = problem.model_dtype(torch.float32)
            c, r = box.center.to(dt), box.radius.to(dt)
            res = atk(problem.model, c, problem.y[idx], r, box.lower.to(dt), box.upper.to(dt))
            x_adv, hit = res.x_adv.to(torch.float64), res.success
        else:
            x_adv = spec_pgd(problem, idx, self.steps, self.restarts, self.seed)
            hit = torch.ones(idx.numel(), dtype=torch.bool)
        v = problem.values(float64_forward(problem, x_adv), idx).amin(dim=1)
        found = [bool(h) and float(val) <= 0 for h, val in zip(hit.tolist(), v.tolist())]
        return StageOutput([Verdict.FALSIFIED if f else None for f in found],
                           counterexamples={p: x_adv[p] for p, f in enumerate(found) if f})


def spec_pgd(problem: Problem, idx: Tensor, steps: int, restarts: int, seed: int) -> Tensor:
    """Minimize ``min_g v_g(x)`` over the box by projected sign-gradient steps; (n, *in) float64."""
    from certorch.graph.capture import capture

    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    lo, hi = problem.box.lower[idx].to(torch.float64), problem.box.upper[idx].to(torch.float64)
    gen = torch.Generator(device=lo.device).manual_seed(seed)
    best, best_v = problem.center[idx].to(torch.float64).clone(), None
    step = (hi - lo) / 4
    for r in range(max(restarts, 1)):
        x = lo + (hi - lo) * torch.rand(lo.shape, generator=gen, dtype=lo.dtype, device=lo.device) if r else best.clone()
        for t in range(steps):
            x.requires_grad_(True)
            v = problem.values(graph.forward(x)[graph.output].flatten(1), idx).amin(dim=1)
            (g,) = torch.autograd.grad(v.sum(), x)
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x - step * (0.97 ** t) * g.sign(), lo), hi)
        with torch.no_grad():
            v = problem.values(graph.forward(x)[graph.output].flatten(1), idx).amin(dim=1)
            if best_v is None:
                best_v = torch.full_like(v, math.inf)
            better = v < best_v
            best[better] = x[better]
            best_v = torch.minimum(best_v, v)
    return best.detach()


class LinfDistStage(Stage):
    """A model family's own certificate (L_inf-dist: Lipschitz margin rule / head IBP), through the
    family certifier registry (:mod:`certorch.bounds.certifiers`), the same function as
    ``ct.certified``. Networks outside the family's guarantee (finite p) raise: no fallback."""

    name = "linf"

    def run(self, problem, idx, budget):
        from certorch.bounds.certifiers import find_certifier

        if problem.y is None or problem.eps is None:
            raise CertorchError("the L_inf-dist certificate needs a classification spec (labels and eps)")
        fam = find_certifier(problem.model)
        if fam is None:
            raise CertorchError("the linf stage needs a model of a family with its own certificate (L_inf-dist)")
        lower = fam.margins(problem.model, problem.center[idx], problem.y[idx], problem.eps).to(torch.float64)
        return StageOutput([Verdict.VERIFIED if v > 0 else None for v in lower.tolist()], lower=lower)
