"""Branch and bound (``bab`` stage): complete verification by splitting the problem into
sub-domains until every one is proved or a counterexample is found.

Two ways to split, chosen per network:

* **ReLU splitting** (the default): a sub-domain fixes the sign of some unstable ReLU inputs,
  ``z_j >= 0`` or ``z_j <= 0``. Each sub-domain is bounded by alpha-CROWN with the split
  constraints in the bound (``ct.bound(..., splits=)``): the split neurons' bounds are clamped
  (their relaxation becomes exact) and one Lagrange multiplier per (spec row, split neuron) is
  optimised with the slopes (beta-CROWN, Wang et al. 2021), which carries each constraint into
  the whole bound. Intermediate bounds are those of the earlier bound stages (alpha-CROWN's
  if it ran, else CROWN's), clamped by the splits (``intermediate_bounds=``): valid on every
  sub-domain, and the multipliers make up for not recomputing them. Slopes and multipliers of a
  parent warm-start its children. alpha-CROWN's plain CROWN reference pass stays in every
  child's bound: it costs about one pass, but without it (tried in the seventeenth session)
  mnist_fc 256x4 ``prop_3_0.05`` went from unsat in 21.8 s (1,595 domains) to a timeout with 235
  open domains (so its CROWN bound must often beat a fresh child's warm-started iterations).
* **Input splitting** when the input has few elements (``input_split_dims``, e.g. ACAS Xu's 5):
  the input box is bisected along the coordinate whose width moves the bound most
  (``|coefficient| x radius`` of the unproved rows), and each half is bounded from scratch.

Every step takes the ``batch`` sub-domains with the lowest bounds (best first), picks a
branching neuron per domain with a BaBSR-style score (Bunel et al. 2020: the coefficient that
the unproved rows put on the ReLU's output times the triangle's intercept ``-l u / (u - l)``,
i.e. what the upper line costs the bound; ties broken by the bound's width) and bounds all
children in **one** batched ``ct.bound`` call: the domains are the batch, nothing loops over
domains in Python. A child whose bound is positive, or whose clamped bounds are empty (the
splits contradict each other: the sub-domain has no points), is proved and dropped.

Counterexamples: the minimiser of each child's linear bound over its box is tried, after a few
projected sign-gradient steps on the property inside the box; the first point whose float64
value is <= 0 ends the search (FALSIFIED; the pipeline rechecks it).

A child's bound is never below its parent's (``floor``): the parent's row bounds hold on the
child's sub-domain too, and a few warm-started iterations with fresh multipliers (they start at
0) can land far below them (measured: -8.6 under a parent at -2.4 on mnist_fc 256x4).

Fully split domains (every unstable ReLU split, bound still <= 0; ReLU mode) are decided
exactly: the network is affine on such a domain, so one LP (HiGHS, ``solve_leaves``) per domain
over its clamped bounds gives the exact minimum; an LP optimum <= 0 is a counterexample, an
infeasible LP proves the domain only with a checked Farkas certificate. A leaf the LP cannot
decide in time leaves the search undecided, and the next stage (MILP) takes over.

``refine=True`` recomputes the children's intermediate bounds after their new split by CROWN
under the splits (intersected with the parent's). It is off by default: measured at 60 s on one
thread (mnist_fc 256x4 prop_6_0.03, oval21 deep img1052) it bounded fewer domains for similar or
worse final bounds; the multipliers already carry the splits into the bound.

Precision: with a float32 model (``BabOptions(low_precision=True)``, the default since the
sixteenth session; ``False`` bounds everything in float64) the root is bounded in float64, the
children in float32 (about half the time per pass; convolutions' adjoints about a quarter), and
the children with a region whose float32 bound turned positive (and is not proven yet) are
bounded again in float64, warm-started from the float32 slopes and multipliers (one
pass, plus a CROWN pass) and floored by their parents' *proven* rows; their rows become the
float64 ones. A domain counts as proved only from a float64 bound; the float32 values steer the
search (order, branching, floors of the float32 bounds) and are never reported. Each domain keeps
both: ``rows`` (what the search sees) and ``sound`` (float64-proven rows, reported as the lower
bound of an undecided search, and what the exact LP leaves skip proved regions by); a region
positive in ``rows`` is positive in ``sound``. The pre-activation bounds stay float64 (the known
ones restricted to the splits). ``refine`` bounds in float64 throughout. The one warm float64
pass reproduces the float32 rows because alpha-CROWN exports each spec row's best slopes when the
intermediate bounds are fixed (``certorch/bounds/alpha.py``); with the best-sum slopes per
example it did not, and mnist_fc 256x4 prop_3_0.05 timed out (3,972 open domains) where float64
proved it. Measured with both fixes (``benchmarks/bab_precision.py``, docs/verification.md): that
instance 6.1 s (float64 8.7 s), oval21 proofs 13.5 / 22.4 / 5.0 s (float64 17.9 / 31.7 / 5.1 s),
colt_mnist the same verdicts about 1 s sooner. The default since 8cebc04: the VNN-COMP rerun with
it (mnist_fc, oval21, sri_resnet_a's first 28; docs/vnncomp.md) solved every instance the float64
search had solved in the two sessions before, 0 wrong.

Memory: the queue's tensors are counted after each step; past ``max_bytes`` the search stops
with UNKNOWN and says so (it never grows until the machine kills the process). The queue
(:class:`~certorch.verify.domains.DomainQueue`) keeps the open domains in growable buffers, so a
step copies the domains it takes and the children it adds, not the whole queue (the bound
counts its buffers: room for 1.5 times the most domains the queue held).

Soundness rests on the bound engine: each child's bound is a sound bound over its sub-domain
(any slopes in [0, 1], any multipliers >= 0), and the sub-domains of a split cover the parent.
Tests (tests/unit/test_bab.py) compare verdicts with MILP and brute force on random tiny nets.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from certorch.bounds.alpha import AlphaState
from certorch.domains.box import Box
from certorch.errors import CertorchError, DeadlineExceeded
from certorch.graph.capture import capture
from certorch.verify.domains import DomainQueue, Domains
from certorch.verify.options import parse_stage_options
from certorch.verify.results import Verdict
from certorch.verify.stages import Problem, Stage, StageOutput, crown_intermediate, float64_forward

#: ReLU kinds whose inputs may be split (their relaxation is exact once the sign is fixed)
SPLITTABLE = ("relu",)
#: dtype of the queued slopes, multipliers and coefficients: halves the queue's memory. Sound:
#: any slope in [0, 1] and multiplier >= 0 gives a valid bound (the bounds are computed in float64
#: from whatever values are stored), and the coefficients only steer branching and the attack.
STORE_DTYPE = torch.float32


@dataclass(frozen=True)
class BabOptions:
    """Settings of one branch-and-bound search.

    ``batch``: domains split per step (each gives two children, bounded in one call);
    ``iters``: alpha/beta iterations per child bound; ``root_iters``: at the root (``iters`` when an
    alpha-CROWN stage ran before and its slopes warm-start the root); ``lr``: Adam's learning rate of
    the children's slopes (warm-started from their parent's: alpha-CROWN's cold-start 0.5 moves
    every slope by about 0.5 in the first step, and measured, the warm slopes then beat both
    following iterations on 80 % of the rows), and of the root's when the alpha-CROWN stage's
    slopes warm-start it (cold, the root optimises at alpha-CROWN's 0.5);
    ``max_bytes``: memory bound of the domain queue; ``input_split_dims``: split the input box
    instead of ReLUs when the input has at most this many elements; ``attack_steps``:
    sign-gradient steps from each child's bound minimiser; ``refine``: recompute the children's
    bounds of the layers after their new split by CROWN under the splits (intersected with the
    parent's) instead of keeping the parent's; ``low_precision`` (on by default, see the module
    doc): bound the children in the model's dtype when it is not float64 and confirm the ones that
    look proved in float64 (not with ``refine`` or without known intermediate bounds);
    ``branch_candidates`` (ReLU splitting): 1 splits each domain's best neuron by the BaBSR-style
    score; k > 1 tries its k best with one bound pass each (both children, warm slopes, no
    optimisation) and splits the one whose worse child is best (FSB, De Palma et al. 2021).
    """

    batch: int = 64
    iters: int = 3
    root_iters: int = 20
    lr: float = 0.1
    max_bytes: int = 2 * 2**30
    input_split_dims: int = 16
    attack_steps: int = 5
    refine: bool = False
    low_precision: bool = True
    branch_candidates: int = 1

    def __post_init__(self):
        k = self.branch_candidates
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise CertorchError(f"branch_candidates must be a positive integer, got {k!r}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise CertorchError(f"lr must be a positive finite number, got {lr!r}")

    @classmethod
    def parse(cls, text: str) -> "BabOptions":
        """Options from ``key=value`` pairs separated by ``:`` (a stage name's suffix,
        ``bab:branch_candidates=3:batch=32``); unknown keys and bad values are one-line errors."""
        return parse_stage_options(cls, text, "bab")


@dataclass
class BabResult:
    verdict: Verdict | None  # None: undecided (out of memory, unsplittable domains)
    lower: float  # proven lower bound of the smallest region value (the min over leaves)
    counterexample: Tensor | None = None
    domains: int = 0  # sub-domains bounded
    timed_out: bool = False
    message: str = ""
    history: list[tuple[float, int]] = field(default_factory=list)  # (seconds, open domains) per step


class _Net:
    """What the search needs to know about the captured network."""

    def __init__(self, problem: Problem):
        graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
        self.graph = graph
        acts = [n for n in graph.activation_nodes() if n.op.kind in SPLITTABLE]
        self.pre = [graph.nodes[a.inputs[0]].name for a in acts]  # split nodes
        self.act = {graph.nodes[a.inputs[0]].name: a.name for a in acts}  # split node -> its ReLU
        self.shape = {graph.nodes[a.inputs[0]].name: graph.nodes[a.inputs[0]].shape for a in acts}  # per example
        self.input = graph.nodes[0].name
        self.relu_only = all(n.op.kind in SPLITTABLE for n in graph.activation_nodes())
        self.output = graph.output


def bound_domains(problem: Problem, i: int, net: _Net, box: Box, splits: dict[str, Tensor],
                  given: dict[str, Box], alpha: AlphaState | None, iters: int, deadline: float,
                  refine: list[str] | None = None, floor: Tensor | None = None, sound: Tensor | None = None,
                  dtype: torch.dtype = torch.float64, lr: float | None = None) -> Domains:
    """Bound D sub-domains of example ``i`` in one ``ct.bound`` call (alpha-CROWN with splits);
    the ``given`` bounds of the nodes in ``refine`` are tightened by a CROWN pass under the splits.
    ``floor``: (D, S) row bounds known to hold on each sub-domain (its parent's: a sub-domain's
    bound is never below its parent's, whatever the few warm-started iterations reach). ``lr``:
    Adam's learning rate of the slopes (None: alpha-CROWN's default).

    ``dtype`` float64 (the default): the rows are proven (``Domains.sound`` = the rows, raised to
    ``sound`` where that is higher). Another dtype: a search bound, the rows are estimates and
    ``Domains.sound`` is ``sound`` (the parents' proven rows, -inf without); the pre-activation
    bounds are then the float64 ``given`` ones restricted to the splits (what the engine uses
    without ``refine``), so children and exact LP leaves keep sound bounds."""
    from certorch.bounds.api import bound
    from certorch.bounds.context import constrain_to_splits

    D = box.lower.shape[0]
    C = problem.C[i : i + 1].expand(D, *problem.C.shape[1:])
    exact = dtype == torch.float64
    with torch.no_grad():
        res = bound(problem.model, box.center, method="alpha-crown", C=C, box=box, dtype=dtype,
                    upper=False, return_intermediate=True, splits=splits or None,
                    intermediate_bounds=given or None, refine_intermediate=list(refine or []) if given else False,
                    alpha_state=alpha, alpha_iters=iters, alpha_lr=lr, return_coefficients=True,
                    deadline=deadline if math.isfinite(deadline) else None)
    rows = (res.lower + problem.d[i].to(res.lower.dtype)).to(torch.float64)
    if floor is not None:
        rows = torch.maximum(rows, floor.to(rows.dtype))
    if exact:
        proven = rows if sound is None else torch.maximum(rows, sound)
    else:
        proven = sound if sound is not None else torch.full_like(rows, -math.inf)
    lb = problem.region_max(rows).amin(dim=1)
    if exact or refine or not all(k in given for k in net.pre):
        bounds = {k: res.intermediate[k].to(torch.float64) for k in net.pre if k in res.intermediate}
    else:
        bounds = {k: constrain_to_splits(given[k], splits[k]) if k in splits else given[k] for k in net.pre}
    empty = torch.zeros(D, dtype=torch.bool, device=lb.device)
    for k, b in bounds.items():  # contradictory splits: the sub-domain has no points
        empty |= (b.lower > b.upper).flatten(1).any(1)
    lb = torch.where(empty, torch.full_like(lb, math.inf), lb)
    state = res.extra.get("alpha")
    if state is not None:  # keep the spec rows' slopes and multipliers only (children reuse the bounds)
        sides = {s: {k: (ids, v.to(STORE_DTYPE)) for k, (ids, v) in d.items() if k[0] == net.output}
                 for s, d in state.sides.items()}
        state = AlphaState(state.signature, state.batch, sides)
    coeffs = {k: v.to(STORE_DTYPE) for k, v in res.extra.get("coefficients", {}).items()}
    return Domains(rows, lb, proven, box, splits, bounds, state, coeffs)


def bound_children(problem: Problem, i: int, net: _Net, box: Box, splits: dict[str, Tensor],
                   given: dict[str, Box], alpha: AlphaState | None, iters: int, deadline: float,
                   refine: list[str] | None, floor: Tensor, sound: Tensor, search: torch.dtype | None,
                   lr: float | None = None) -> Domains:
    """Children of one step (aligned with their parents' ``floor`` rows and ``sound`` rows).

    ``search`` None: bounded in float64 (every row proven). Else bounded in ``search`` (the model's
    dtype: about half the time of float64), and the children with a region whose estimate turned
    positive (not yet proven) are bounded again in float64 from the slopes and multipliers found
    (one warm pass and a CROWN pass, floored by the parents' proven rows); their rows become the
    float64 ones, so an estimate that did not hold is not inherited. Invariant: a region positive
    in ``rows`` is positive in ``sound``, so a child whose rows are all positive is proven. The
    rest keep their estimates for the search and their parents' proven rows."""
    if search is None:
        return bound_domains(problem, i, net, box, splits, given, alpha, iters, deadline, refine, floor=floor, lr=lr)
    kids = bound_domains(problem, i, net, box, splits, given, alpha, iters, deadline, None, floor=floor, sound=sound,
                         dtype=search, lr=lr)
    new_regions = (problem.region_max(kids.rows) > 0) & ~(problem.region_max(kids.sound) > 0)  # (D, R)
    confirm = new_regions.any(dim=1)
    if not bool(confirm.any()):
        return kids
    pos = confirm.nonzero().flatten()
    c = kids.select(pos)
    confirmed = bound_domains(problem, i, net, c.box, c.splits, {k: v[pos] for k, v in given.items()}, c.alpha, 1,
                              deadline, None, floor=c.sound)
    return Domains.cat([kids.select((~confirm).nonzero().flatten()), confirmed])


def _unproved_rows(doms: Domains) -> Tensor:
    """(D, S) weight 1 on rows that are not yet positive."""
    return (doms.rows <= 0).to(doms.rows.dtype)


def settle(doms: Domains, net: _Net, input_mode: bool, candidates: int = 1) -> Domains:
    """The domains as the queue keeps them: each one's split chosen now (:func:`relu_choice` or
    :func:`input_choice`, from its rows, bounds and coefficients, none of which change while it
    waits; with ``candidates`` > 1 its best ReLU candidates, (D, k), for :func:`fsb_choice`), its
    coefficients dropped."""
    choice = input_choice(doms, net) if input_mode else relu_choice(doms, net, candidates)
    return replace(doms, coeffs={}, choice=choice)


def relu_choice(doms: Domains, net: _Net, k: int = 1) -> Tensor:
    """(D,) the unstable, unsplit ReLU input each domain splits next, as an index into the split
    nodes' neurons concatenated in ``net.pre`` order (BaBSR-style score), -1 where none is left;
    ``k`` > 1: (D, k) the k best, best first."""
    w = _unproved_rows(doms)
    scores = []
    for p in net.pre:
        b = doms.bounds[p]
        l, u = b.lower.flatten(1), b.upper.flatten(1)
        free = (l < 0) & (u > 0) & (doms.splits[p].flatten(1) == 0)
        A = doms.coeffs.get(net.act[p])
        if A is None:
            A = torch.zeros(doms.size, w.shape[1], l.shape[1], dtype=l.dtype, device=l.device)
        A = A.flatten(2)
        if A.shape[0] == 1:
            A = A.expand(doms.size, *A.shape[1:])
        width = torch.where(free, u - l, torch.ones_like(u))
        intercept = torch.where(free, -l * u / width, torch.zeros_like(u))
        neg = (A.clamp(max=0).abs() * w[:, :, None]).sum(1)
        mag = (A.abs() * w[:, :, None]).sum(1)
        s = neg * intercept + 1e-4 * mag * torch.minimum(u, -l).clamp(min=0) + 1e-12 * width
        scores.append(torch.where(free, s, torch.full_like(s, -math.inf)))
    allscores = torch.cat(scores, 1)
    if k == 1:
        best, arg = allscores.max(1)
    else:
        best, arg = allscores.topk(min(k, allscores.shape[1]), dim=1)
        if best.shape[1] < k:
            pad = (0, k - best.shape[1])
            best, arg = F.pad(best, pad, value=-math.inf), F.pad(arg, pad, value=-1)
    return torch.where(torch.isfinite(best), arg, torch.full_like(arg, -1))


def fsb_choice(problem: Problem, i: int, net: _Net, doms: Domains, dtype: torch.dtype | None,
               deadline: float) -> Tensor:
    """(D,) the split of each domain among its (D, k) candidates ``doms.choice``: both children
    of every candidate are bounded by one pass (warm slopes, no optimisation; new multipliers 0,
    so the split enters through its neuron's clamped bounds) in ``dtype`` (None: float64), all
    2 k D in one call, and the candidate whose worse child has the highest bound wins (an
    infeasible child counts +inf). The estimates only rank; children are bounded as usual after."""
    cand = doms.choice
    D, k = cand.shape
    sub = doms.select(torch.arange(D, device=cand.device).repeat_interleave(k))
    kids, _, splits = branch_relu(sub, net, cand.flatten())
    est = bound_domains(problem, i, net, kids.box, splits, kids.bounds, kids.alpha, 1, deadline,
                        dtype=dtype or torch.float64)
    score = est.lb.view(D, k, 2).amin(2)
    score = torch.where(cand >= 0, score, torch.full_like(score, -math.inf))
    return cand.gather(1, score.argmax(1, keepdim=True)).squeeze(1)


def branch_relu(doms: Domains, net: _Net, choice: Tensor | None = None) -> tuple[Domains, Tensor, dict[str, Tensor]]:
    """Children of every (settled) domain by splitting the ReLU input it chose (:func:`settle`;
    or ``choice`` (D,)).

    Returns (the parents repeated twice, a mask of parents that had a neuron to split (D,),
    the children's splits)."""
    sizes = [int(math.prod(net.shape[p])) for p in net.pre]
    choice = doms.choice if choice is None else choice
    ok = choice >= 0
    arg = choice.clamp(min=0)
    offsets = torch.tensor([0] + sizes, device=arg.device).cumsum(0)
    layer = torch.bucketize(arg, offsets[1:], right=True)
    neuron = arg - offsets[layer]
    D = doms.size
    parents = torch.arange(D, device=arg.device).repeat_interleave(2)
    sign = torch.tensor([1, -1], dtype=torch.int8, device=arg.device).repeat(D)
    kids = doms.select(parents)
    splits = {}
    for k, p in enumerate(net.pre):
        s = kids.splits[p].flatten(1).clone()
        sel = ((layer[parents] == k) & ok[parents]).nonzero().flatten()
        s[sel, neuron[parents][sel]] = sign[sel]
        splits[p] = s.view(kids.splits[p].shape)
    return kids, ok, splits


def _after_new_splits(net: _Net, parents: Domains, splits: dict[str, Tensor]) -> list[str]:
    """Split nodes after the first one where a child gained a split: their bounds can tighten
    (the earlier ones' cannot, they do not depend on the new splits)."""
    for k, p in enumerate(net.pre):
        if bool((splits[p] != parents.splits[p]).any()):
            return net.pre[k + 1 :]
    return []


def input_choice(doms: Domains, net: _Net) -> Tensor:
    """(D,) the input coordinate each box is bisected along next: the most influential one."""
    w = _unproved_rows(doms)
    lo, hi = doms.box.lower.flatten(1), doms.box.upper.flatten(1)
    A = doms.coeffs.get(net.input)
    r = (hi - lo) / 2
    if A is None:
        score = r
    else:
        A = A.flatten(2)
        score = (A.abs() * w[:, :, None]).sum(1) * r + 1e-9 * r
    return score.argmax(1)


def branch_input(doms: Domains, net: _Net) -> Box:
    """Children boxes (2D, *in): each (settled) box bisected along the coordinate it chose."""
    lo, hi = doms.box.lower.flatten(1), doms.box.upper.flatten(1)
    d = doms.choice
    mid = (lo + hi).gather(1, d[:, None]) / 2
    lo2, hi2 = lo.repeat_interleave(2, 0), hi.repeat_interleave(2, 0)
    d2, mid2 = d.repeat_interleave(2), mid.repeat_interleave(2, 0)
    rows = torch.arange(2 * lo.shape[0], device=lo.device)
    left = rows % 2 == 0
    hi2[rows[left], d2[left]] = mid2[left, 0]
    lo2[rows[~left], d2[~left]] = mid2[~left, 0]
    shape = doms.box.lower.shape
    return Box(lo2.view(-1, *shape[1:]), hi2.view(-1, *shape[1:]))


def search_counterexample(problem: Problem, i: int, net: _Net, doms: Domains, steps: int) -> Tensor | None:
    """A point of example ``i``'s box with a float64 property value <= 0, tried from each
    domain's bound minimiser (then ``steps`` projected sign-gradient steps inside its box).

    The points stay float64; the forward and gradient passes of the steps run in the model's
    dtype (one pass per step), and each step's lowest point, with any point that dtype finds
    violating, is re-checked in float64 (only a float64 value <= 0 counts)."""
    A = doms.coeffs.get(net.input)
    lo, hi = doms.box.lower.to(torch.float64), doms.box.upper.to(torch.float64)
    if A is None:
        x = (lo + hi) / 2
    else:
        A = A.expand(doms.size, *A.shape[1:]) if A.shape[0] == 1 else A
        worst = doms.rows.argmin(1)
        a = A[torch.arange(doms.size), worst].view_as(lo)
        x = torch.where(a > 0, lo, hi)
    idx = torch.full((x.shape[0],), i, dtype=torch.long)
    step = (hi - lo) / 8
    graph = net.graph
    dtype = problem.model_dtype()
    for t in range(steps + 1):
        xg = x.detach().to(dtype).requires_grad_(t < steps)  # a new leaf, also when dtype is float64
        with torch.set_grad_enabled(t < steps):
            val = problem.values(graph.forward(xg)[graph.output].flatten(1), idx).amin(dim=1)
        check = val.detach() <= 0
        check[int(val.argmin())] = True
        pts = x[check]
        with torch.no_grad():
            v = problem.values(float64_forward(problem, pts), idx[check]).amin(dim=1)
        k = int(v.argmin())
        if float(v[k]) <= 0:
            return pts[k].detach()
        if t == steps:
            break
        (g,) = torch.autograd.grad(val.sum(), xg)
        x = torch.minimum(torch.maximum(x - step * g.sign().to(x.dtype), lo), hi).detach()
    return None


def branch_and_bound(problem: Problem, i: int, deadline: float = math.inf,
                     options: BabOptions = BabOptions()) -> BabResult:
    """Decide example ``i`` of ``problem`` by branch and bound (see the module doc)."""
    net = _Net(problem)
    box = problem.box[i : i + 1].to(torch.float64)
    input_mode = box.lower[0].numel() <= options.input_split_dims or not net.relu_only or not net.pre
    warm = None
    if "alpha" in problem.scratch:  # slopes of an earlier alpha-CROWN stage
        ids, state = problem.scratch["alpha"]
        pos = (ids == i).nonzero().flatten()
        if pos.numel() == 1:
            warm = state.select(pos)
    t0 = time.perf_counter()
    try:
        given = {} if input_mode else _known_bounds(problem, i, net, deadline)
        # warm slopes of the alpha-CROWN stage are already optimised for these bounds: a few passes
        # at the children's rate only recover the coefficients and the state for the children
        iters, lr = (options.iters, options.lr) if warm is not None else (options.root_iters, None)
        root = bound_domains(problem, i, net, box, {}, given, warm, iters, deadline, lr=lr)
    except DeadlineExceeded:
        return BabResult(None, -math.inf, timed_out=True, message="bab: out of time at the root")
    search = _search_dtype(problem, net, given, input_mode, options)
    if not input_mode:
        root.splits = {p: torch.zeros((1, *net.shape[p]), dtype=torch.int8)
                       for p in net.pre}
    proven = math.inf  # smallest bound among proved leaves
    count = 1
    history: list[tuple[float, int]] = []
    if float(root.lb[0]) > 0:
        return BabResult(Verdict.VERIFIED, float(root.lb[0]), domains=1)
    x = search_counterexample(problem, i, net, root, options.attack_steps)
    if x is not None:
        return BabResult(Verdict.FALSIFIED, float(root.lb[0]), x, 1)
    k = options.branch_candidates
    queue = DomainQueue(settle(root, net, input_mode, k))
    stuck = None

    def low(doms: Domains | DomainQueue) -> float:  # proven lower bound over open domains
        doms = doms.view() if isinstance(doms, DomainQueue) else doms
        return float(doms.sound_lb(problem).min()) if doms.size else math.inf

    while queue.size:
        if time.perf_counter() > deadline:
            return BabResult(None, low(queue), domains=count, timed_out=True, history=history,
                             message=f"bab: out of time with {queue.size} open domains")
        parents = queue.pop_lowest(options.batch)
        try:
            if input_mode:
                kids_box = branch_input(parents, net)
                src = torch.arange(parents.size).repeat_interleave(2)
                alpha = parents.alpha.select(src) if parents.alpha is not None else None
                kids = bound_children(problem, i, net, kids_box, {}, {}, alpha, options.iters, deadline, None,
                                      parents.rows[src], parents.sound[src], search, options.lr)
            else:
                if k > 1:
                    parents = replace(parents, choice=fsb_choice(problem, i, net, parents, search, deadline))
                rep, ok, splits = branch_relu(parents, net)
                if not bool(ok.all()):  # every unstable ReLU of these domains is split: solve them exactly
                    leaves = parents.select((~ok).nonzero().flatten())
                    solved, lowest, x = solve_leaves(problem, i, net, leaves, deadline)
                    if x is not None:
                        return BabResult(Verdict.FALSIFIED, low(queue), x, count, history=history)
                    proven = min(proven, lowest)
                    if not bool(solved.all()):
                        stuck = leaves.select((~solved).nonzero().flatten())
                    keep = ok.repeat_interleave(2).nonzero().flatten()
                    rep, splits = rep.select(keep), {k: v[keep] for k, v in splits.items()}
                    if rep.size == 0:
                        if stuck is not None:
                            break
                        history.append((time.perf_counter() - t0, queue.size))
                        continue
                kids = bound_children(problem, i, net, rep.box, splits, rep.bounds, rep.alpha, options.iters,
                                      deadline, _after_new_splits(net, rep, splits) if options.refine else None,
                                      rep.rows, rep.sound, search, options.lr)
        except DeadlineExceeded:  # the parents taken out are still open
            return BabResult(None, min(low(queue), low(parents)), domains=count, timed_out=True, history=history,
                             message=f"bab: out of time with {queue.size + parents.size} open domains")
        count += kids.size
        done = kids.lb > 0
        if bool(done.any()):
            proven = min(proven, float(kids.lb[done].min()))
        open_kids = kids.select((~done).nonzero().flatten())
        if open_kids.size:
            x = search_counterexample(problem, i, net, open_kids, options.attack_steps)
            if x is not None:
                return BabResult(Verdict.FALSIFIED, low(queue), x, count, history=history)
            open_kids = settle(open_kids, net, input_mode, k)
        queue.push(open_kids)
        history.append((time.perf_counter() - t0, queue.size))
        if stuck is not None:
            break
        if queue.size and queue.nbytes() > options.max_bytes:
            return BabResult(None, low(queue), domains=count, history=history,
                             message=f"bab: the domain queue ({queue.size} domains, "
                                     f"{queue.nbytes() / 2**20:.0f} MiB) passed its memory bound "
                                     f"({options.max_bytes / 2**20:.0f} MiB); undecided")
    if stuck is not None:
        return BabResult(None, min(low(stuck), low(queue)), domains=count, history=history,
                         message="bab: a domain with every unstable ReLU split is still unproved; undecided")
    return BabResult(Verdict.VERIFIED, proven, domains=count, history=history)


def solve_leaves(problem: Problem, i: int, net: _Net, doms: Domains,
                 deadline: float) -> tuple[Tensor, float, Tensor | None]:
    """Decide fully split domains exactly with one LP each (HiGHS).

    With every unstable ReLU split, the domain's clamped bounds make every neuron stable: the
    network is affine on the domain and the triangle LP over those bounds (``certorch.verify.encode``;
    the splits become the bounds of the pre-activation variables) is exact, where alpha/beta
    iterations only approach its optimum. The kept bound is the LP's weak-duality bound (as in the
    ``lp`` stage). Returns (proved (D,) bool, the smallest bound of a proved domain, a counterexample
    from an LP optimum whose float64 value is <= 0 or None). One LP per domain: such leaves are
    few, so a Python loop over them is fine.
    An infeasible LP (the splits contradict each other) proves its domain only with a checked
    Farkas certificate (:func:`certorch.verify.solve.farkas_certified`).
    """
    from certorch.verify.encode import encode
    from certorch.verify.lp import flat64, region_spec, try_points
    from certorch.verify.solve import minimize_region

    graph = net.graph
    index = {n.name: n.index for n in graph.nodes}
    proved = torch.zeros(doms.size, dtype=torch.bool, device=doms.rows.device)
    regions = problem.region_max(doms.sound).clone()  # (D, R) proven (a row estimate never skips an LP)
    lowest = math.inf
    for k in range(doms.size):
        if time.perf_counter() > deadline:
            raise DeadlineExceeded("bab: out of time solving fully split domains")
        bounds = {index[p]: (flat64(doms.bounds[p].lower[k]), flat64(doms.bounds[p].upper[k])) for p in net.pre}
        enc = encode(graph, flat64(doms.box.lower[k]), flat64(doms.box.upper[k]), bounds, None,
                     deadline=deadline if math.isfinite(deadline) else None)
        ok, points = True, []
        for g in range(regions.shape[1]):
            if float(regions[k, g]) > 0:
                continue
            C, d = region_spec(problem, i, g)
            out = minimize_region(enc, enc.var_of[graph.output], C, d, integer=False,
                                  time_limit=min(deadline - time.perf_counter(), 1e6), threads=problem.threads,
                                  log=problem.solver_log, empty_is_proof=True)
            if out.point is not None:
                points.append(out.point)
            if out.outcome != "positive":
                ok = False
                break
            regions[k, g] = out.lower
        proved[k] = ok
        if ok:
            lowest = min(lowest, float(regions[k].min()))
        else:
            x = try_points(problem, i, points)
            if x is not None:
                return proved, lowest, x
    return proved, lowest, None


def _search_dtype(problem: Problem, net: _Net, given: dict[str, Box], input_mode: bool,
                  options: BabOptions) -> torch.dtype | None:
    """The dtype children are bounded in before a float64 confirmation (``bound_children``): the
    model's, when ``low_precision`` is on, it is not float64, ``refine`` is off and (ReLU
    splitting) every split node has known bounds; else None (float64 throughout)."""
    dtype = problem.model_dtype()
    if not options.low_precision or options.refine or dtype == torch.float64:
        return None
    if not input_mode and not all(k in given for k in net.pre):
        return None
    return dtype


def _known_bounds(problem: Problem, i: int, net: _Net, deadline: float) -> dict[str, Box]:
    """Pre-activation bounds of example ``i`` from the earlier bound stages (alpha-CROWN's when
    it ran, else CROWN's, computed now if no stage did): the root then optimises only the spec
    rows' slopes, so the search fits in memory wherever CROWN does."""
    return {k: v for k, v in crown_intermediate(problem, torch.tensor([i]), deadline).items() if k in net.pre}


class BabStage(Stage):
    """Branch and bound, one example at a time (``bab``)."""

    name = "bab"
    batched = False

    def __init__(self, options: BabOptions = BabOptions()):
        self.options = options

    def run(self, problem, idx, budget):
        verdicts, lower, cex, secs, tout, msgs = [], [], {}, [], [], {}
        for pos, i in enumerate(idx.tolist()):
            t0 = time.perf_counter()
            r = branch_and_bound(problem, i, t0 + float(budget[pos]), self.options)
            verdicts.append(r.verdict)
            lower.append(r.lower if r.verdict == Verdict.VERIFIED or not math.isfinite(r.lower) else min(r.lower, 0.0))
            if r.counterexample is not None:
                cex[pos] = r.counterexample
            msgs[pos] = r.message or f"bab: {r.domains} domains"
            secs.append(time.perf_counter() - t0)
            tout.append(r.timed_out)
        return StageOutput(verdicts, torch.tensor(lower, dtype=torch.float64), cex, secs, tout, msgs)


__all__ = ["BabOptions", "BabResult", "BabStage", "Domains", "branch_and_bound", "bound_domains"]
