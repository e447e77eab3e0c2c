"""Per-example verification pipeline: attacks, then bounds of increasing cost, stopping at the
first decisive stage.

Public API::

    from certorch.verify import verify_box, certify_batch, Verdict
    r = verify_box(model, box, C, stages=("pgd", "crown", "alpha-crown", "bab"), timeout=60)   # one example
    rs = certify_batch(model, x, y, eps=0.1, stages=DEFAULT_STAGES, timeout=60)      # list[VerificationResult]

Stage names: ``clean`` (always first: misclassified -> NOT_VERIFIED), ``pgd``/``cw`` (attack ->
FALSIFIED), ``ibp``, ``crown`` (and the other ``ct.bound`` methods), ``linf`` (L_inf-dist
certificate; replaces ``ibp``/``crown`` automatically for L_inf-dist nets), ``lp`` (triangle LP),
``bab`` (branch and bound over ReLU or input splits, :mod:`certorch.verify.bab`), ``refine`` (MILP
with 50 binaries per layer), ``milp`` (complete big-M MILP).

:func:`run_stages` is the final entry point: it times every stage per example, turns a crash into
``ERROR`` (never ``UNKNOWN``), re-checks every counterexample with a float64 forward pass inside
the box (else it is not reported as falsified), and requires ``margin_lb > 0`` for ``VERIFIED``.
"""
from __future__ import annotations

import math
import time
from typing import Sequence, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from certorch.domains.box import Box
from certorch.nn.mode import eval_mode
from certorch.errors import CertorchError, DeadlineExceeded
from certorch.spec import check_finite, linf_ball, margin_matrix
from certorch.verify.bab import BabOptions, BabStage
from certorch.verify.lp import LPStage
from certorch.verify.milp import MilpStage
from certorch.verify.results import Verdict, VerificationResult
from certorch.verify.stages import (AlphaCrownOptions, AlphaCrownStage, AttackStage, BoundStage, CleanStage,
                                    LinfDistStage, Problem, Stage, StageOutput, float64_forward)

DEFAULT_STAGES = ("pgd", "ibp", "crown", "alpha-crown", "bab", "milp")
REFINE_BINARIES = 50
_BOUND_METHODS = ("ibp", "zonotope", "symbolic", "crown", "crown-ibp", "dual", "alpha-crown")
_COMPLETE_ONLY = ("lp", "refine", "milp", "bab")


def is_linf_dist_net(model: nn.Module) -> bool:
    try:
        from certorch.nn.linf_dist import LINF_DIST_LAYERS
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, LINF_DIST_LAYERS) for m in model.modules())


def build_stages(names: Sequence[str] | str, model: nn.Module | None = None) -> list[Stage]:
    """Stage objects from names (a list or a comma-separated string); ``clean`` is prepended.

    A list may also hold configured :class:`Stage` objects, used as given (e.g.
    ``["pgd", "crown", BabStage(BabOptions(low_precision=False))]``); a name or object twice is
    kept once. For L_inf-dist nets ``ibp``/``crown`` become ``linf`` and the LP/MILP stages are
    dropped (their neurons have no LP encoding). ``bab`` takes :class:`BabOptions` after its name
    (``bab:branch_candidates=3:batch=32``), ``alpha-crown`` :class:`AlphaCrownOptions`
    (``alpha-crown:iters=5``).
    """
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    linf = model is not None and is_linf_dist_net(model)
    out: list[Stage] = [CleanStage()]
    seen = {"clean"}
    for given in names:
        if not isinstance(given, (str, Stage)):
            raise CertorchError(f"a verification stage is a name or a Stage object, got {type(given).__name__}")
        n, options = (given.name, "") if isinstance(given, Stage) else given.lower().partition(":")[::2]
        if options and n not in ("bab", "alpha-crown"):
            raise CertorchError(f"only the bab and alpha-crown stages take options (name:key=value), got {given!r}")
        if linf and n in _BOUND_METHODS and isinstance(given, str):
            n = "linf"
        if linf and n in _COMPLETE_ONLY or n in seen:
            continue
        seen.add(n)
        if isinstance(given, Stage):
            out.append(given)
        elif n in ("pgd", "cw"):
            out.append(AttackStage(n))
        elif n in _BOUND_METHODS:
            if n == "alpha-crown":
                o = AlphaCrownOptions.parse(options)
                out.append(AlphaCrownStage(o.iters, o.lr, o.low_precision))
            else:
                out.append(BoundStage(n))
        elif n == "linf":
            out.append(LinfDistStage())
        elif n == "lp":
            out.append(LPStage())
        elif n == "bab":
            out.append(BabStage(BabOptions.parse(options)))
        elif n == "refine":
            out.append(MilpStage(REFINE_BINARIES))
        elif n == "milp":
            out.append(MilpStage("all"))
        else:
            valid = ["clean", "pgd", "cw", *_BOUND_METHODS, "linf", "lp", "bab", "refine", "milp"]
            raise CertorchError(f"unknown verification stage {n!r}; valid: {', '.join(valid)}")
    return out


def check_timeout(timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    t = float(timeout)
    if not (t > 0) or math.isnan(t):
        raise CertorchError(f"timeout must be > 0 seconds, got {timeout}")
    return t


def run_stages(problem: Problem, stages: Sequence[Stage], timeout: float | None = None) -> list[VerificationResult]:
    """Run ``stages`` in order on the undecided examples of ``problem``; see module doc.

    Time: each example has ``timeout`` seconds over all stages. A stage gets the seconds left
    per example (and derives its deadline from them). A stage that raises
    :class:`~certorch.errors.DeadlineExceeded`, or raises anything after its examples' time ran
    out, gives ``TIMEOUT`` (the error is kept in the message); other exceptions give ``ERROR``.
    A verdict reached after an example's time ran out is not kept: that example is ``TIMEOUT``.
    """
    limit = check_timeout(timeout)
    B = problem.batch
    verdict: list[Verdict | None] = [None] * B
    stage_of: list[str | None] = [None] * B
    spent = np.zeros(B)
    per_stage: list[dict[str, float]] = [{} for _ in range(B)]
    lower = np.full(B, -math.inf)
    cex: dict[int, Tensor] = {}
    ub = np.full(B, math.inf)
    timed_out = np.zeros(B, dtype=bool)
    message = [""] * B
    for stage in stages:
        for i in range(B):
            if verdict[i] is None and not timed_out[i] and spent[i] >= limit:
                timed_out[i] = True  # budget used up before this stage
        todo = [i for i in range(B) if verdict[i] is None and not timed_out[i]]
        if not todo:
            break
        idx = torch.tensor(todo, dtype=torch.long)
        budget = limit - spent[todo]
        t0 = time.perf_counter()
        try:
            out = stage.run(problem, idx, budget)
        except Exception as e:  # noqa: BLE001 - a crash is an ERROR verdict, never "unknown"
            dt = (time.perf_counter() - t0) / len(todo)
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for i in todo:
                spent[i] += dt
                per_stage[i][stage.name] = per_stage[i].get(stage.name, 0.0) + dt
                stage_of[i] = stage.name
                if isinstance(e, DeadlineExceeded) or spent[i] >= limit:
                    timed_out[i] = True
                    message[i] = f"{stage.name}: out of time ({text})"
                else:
                    verdict[i], message[i] = Verdict.ERROR, text
            continue
        wall = time.perf_counter() - t0
        for pos, i in enumerate(todo):
            dt = out.seconds[pos] if out.seconds is not None else wall / len(todo)
            spent[i] += dt
            per_stage[i][stage.name] = per_stage[i].get(stage.name, 0.0) + dt
            if out.lower is not None:
                lower[i] = max(lower[i], float(out.lower[pos]))
            if pos in out.messages:
                message[i] = out.messages[pos]
            v = out.verdicts[pos]
            if v is not None and spent[i] > limit:
                v, message[i] = None, f"{stage.name}: decided {v.value} only after the time limit"
                timed_out[i] = True
            if v == Verdict.FALSIFIED:
                x_c, val = _recheck(problem, i, out.counterexamples.get(pos))
                if x_c is None:
                    v, message[i] = None, f"{stage.name}: counterexample not confirmed in float64"
                else:
                    cex[i], ub[i] = x_c, val
            elif v == Verdict.VERIFIED and not lower[i] > 0:
                v, message[i] = None, f"{stage.name}: claimed verified without a positive bound"
            if v is not None:
                verdict[i], stage_of[i] = v, stage.name
            elif (out.timed_out is not None and out.timed_out[pos]) or spent[i] >= limit:
                timed_out[i], stage_of[i] = True, stage.name
    results = []
    for i in range(B):
        v = verdict[i] or (Verdict.TIMEOUT if timed_out[i] else Verdict.UNKNOWN)
        results.append(VerificationResult(v, stage_of[i] if v != Verdict.UNKNOWN else None, float(lower[i]),
                                          float(spent[i]), per_stage[i], cex.get(i), float(ub[i]), message[i]))
    return results


def _recheck(problem: Problem, i: int, x: Tensor | None) -> tuple[Tensor | None, float]:
    """Clip a candidate into example ``i``'s box and confirm a violation in float64."""
    if x is None:
        return None, math.inf
    lo, hi = problem.box.lower[i].to(torch.float64), problem.box.upper[i].to(torch.float64)
    x = torch.minimum(torch.maximum(x.detach().to(torch.float64).reshape(lo.shape), lo), hi)
    if not bool(problem.box[i].to(torch.float64).contains(x).all()):
        return None, math.inf
    v = float(problem.values(float64_forward(problem, x.unsqueeze(0)), torch.tensor([i])).amin())
    return (x, v) if v <= 0 else (None, math.inf)


def normalize_spec(spec, K: int, dtype=torch.float64) -> tuple[Tensor, Tensor, tuple[tuple[int, ...], ...]]:
    """Spec -> (C (S, K), d (S,), regions).

    ``spec`` is either a tensor C (S, K): the property is ``C f > 0`` row by row (each row its
    own region), or a list of unsafe disjuncts, each ``C_i`` (R_i, K) or a pair ``(C_i, d_i)``:
    disjunct i is the set ``{f : C_i f + d_i <= 0 (every row)}``; the property holds iff no
    point of the box reaches any disjunct.
    """
    if isinstance(spec, Tensor):
        C = spec.to(dtype)
        if C.dim() != 2 or C.shape[1] != K:
            raise CertorchError(f"C must have shape (S, {K}), got {tuple(C.shape)}")
        return C, torch.zeros(C.shape[0], dtype=dtype), tuple((r,) for r in range(C.shape[0]))
    if not isinstance(spec, (list, tuple)) or not spec:
        raise CertorchError("spec must be a tensor C (S, K) or a non-empty list of (C_i, d_i) disjuncts")
    Cs, ds, regions, s = [], [], [], 0
    for item in spec:
        Ci, di = item if isinstance(item, (tuple, list)) else (item, None)
        Ci = torch.as_tensor(Ci, dtype=dtype)
        if Ci.dim() == 1:
            Ci = Ci.unsqueeze(0)
        if Ci.dim() != 2 or Ci.shape[1] != K or Ci.shape[0] == 0:
            raise CertorchError(f"each disjunct's C must have shape (R, {K}), got {tuple(Ci.shape)}")
        di = torch.zeros(Ci.shape[0], dtype=dtype) if di is None else torch.as_tensor(di, dtype=dtype).reshape(-1)
        if di.shape[0] != Ci.shape[0]:
            raise CertorchError(f"disjunct offsets d must have {Ci.shape[0]} entries, got {di.shape[0]}")
        Cs.append(Ci)
        ds.append(di)
        regions.append(tuple(range(s, s + Ci.shape[0])))
        s += Ci.shape[0]
    C, d = torch.cat(Cs), torch.cat(ds)
    check_finite(C, "C")
    check_finite(d, "d")
    return C, d, tuple(regions)


def verify_box(
    model: nn.Module,
    box: Box,
    spec,
    stages: Sequence[str] | str = DEFAULT_STAGES,
    timeout: float | None = 60.0,
    *,
    y: Tensor | int | None = None,
    threads: int = 1,
    solver_log: TextIO | None = None,
) -> VerificationResult:
    """Verify one input box (``box.lower``/``upper``: (*input_shape) or (1, *input_shape)) against
    ``spec`` (see :func:`normalize_spec`). ``y``: optional label (then misclassification of the
    box center gives NOT_VERIFIED). ``timeout`` covers everything done here (graph capture
    included). ``solver_log``: stream for LP/MILP solver logs (default: silent). The model is
    used in eval mode; its modules' own train/eval flags are restored afterwards."""
    t_start = time.perf_counter()
    timeout = check_timeout(timeout)
    lo, hi = box.lower, box.upper
    if lo.shape != hi.shape:
        raise CertorchError("box.lower and box.upper must have the same shape")
    check_finite(lo, "box.lower")
    check_finite(hi, "box.upper")
    if bool((lo > hi).any()):
        raise CertorchError("box.lower must be <= box.upper")
    from certorch.graph.capture import capture

    in_shape = tuple(lo.shape[1:]) if lo.dim() >= 2 and lo.shape[0] == 1 else tuple(lo.shape)
    box64 = Box(lo.reshape(1, *in_shape).to(torch.float64), hi.reshape(1, *in_shape).to(torch.float64))
    stage_list = build_stages(stages, model)
    with eval_mode(model):
        K = int(np.prod(capture(model, in_shape).output_shape)) if not is_linf_dist_net(model) \
            else _num_outputs(model, box64)
        C, d, regions = normalize_spec(spec, K)
        yt = None if y is None else torch.as_tensor(y, dtype=torch.long).reshape(1)
        problem = Problem(model, box64, C.unsqueeze(0), d.unsqueeze(0), regions, y=yt, threads=threads,
                          solver_log=solver_log)
        left = timeout - (time.perf_counter() - t_start)
        if not left > 0:
            return VerificationResult(Verdict.TIMEOUT, None, -math.inf, time.perf_counter() - t_start,
                                      message="time ran out while preparing the problem")
        return run_stages(problem, stage_list, left)[0]


def _num_outputs(model: nn.Module, box: Box) -> int:
    param = next(model.parameters())
    with torch.no_grad(), eval_mode(model):
        return int(model(box.center.to(param.dtype)).flatten(1).shape[1])


def certify_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    stages: Sequence[str] | str = DEFAULT_STAGES,
    timeout: float | None = 60.0,
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    threads: int = 1,
) -> list[VerificationResult]:
    """Classification robustness of (B, *in) ``x`` with labels (B,) ``y`` in the L-inf ball of
    radius ``eps`` (intersected with [lo, hi]); one :class:`VerificationResult` per example,
    ``timeout`` seconds per example. The model is used in eval mode (flags restored afterwards)."""
    timeout = check_timeout(timeout)
    if not isinstance(y, Tensor) or y.shape != x.shape[:1]:
        raise CertorchError("y must be a tensor of shape (B,) matching x")
    x64 = x.detach().to(torch.float64)
    box = linf_ball(x64, eps, lo, hi)
    stage_list = build_stages(stages, model)
    with eval_mode(model):
        K = _num_outputs(model, box) if is_linf_dist_net(model) else None
        if K is None:
            from certorch.graph.capture import capture

            K = int(np.prod(capture(model, tuple(x.shape[1:])).output_shape))
        C = margin_matrix(y, K).to(torch.float64)
        d = torch.zeros(C.shape[:2], dtype=torch.float64)
        regions = tuple((r,) for r in range(K - 1))
        problem = Problem(model, box, C, d, regions, x=x64, y=y.long(), eps=float(eps), threads=threads)
        results = run_stages(problem, stage_list, timeout)
    for i, r in enumerate(results):
        r.label = int(y[i])
    return results


__all__ = ["DEFAULT_STAGES", "build_stages", "certify_batch", "normalize_spec", "run_stages", "verify_box",
           "is_linf_dist_net", "check_timeout", "StageOutput"]
