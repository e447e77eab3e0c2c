"""Solve the LP / MILP encodings with HiGHS (``highspy``), with early stopping.

:func:`minimize_region` minimizes the value ``v = max_r (C_r f(x) + d_r)`` of one output region
over the encoding. With binaries (MILP, Tjeng et al. big-M) the solve stops as soon as

* an incumbent with ``v < -tol`` is found (a candidate counterexample; HiGHS callback on
  improving solutions), or
* the dual (objective) bound proves ``v > tol`` (checked in the MIP interrupt callback),

or when the time limit is reached. Without binaries it is the triangle LP relaxation: its
optimum is a lower bound of ``v`` (the LP stage, :mod:`certorch.verify.lp`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from certorch.errors import CertorchError
from certorch.verify.encode import Encoding, region_objective

STATUSES = ("positive", "negative", "optimal", "timeout", "infeasible", "error")


@dataclass
class SolveOutcome:
    """Result of minimizing one region value.

    ``status``: ``positive`` (bound proves v > tol), ``negative`` (a point with v < -tol),
    ``optimal`` (solved; compare ``lower``/``value`` yourself), ``timeout``, ``infeasible``
    (no point at all: the value is +inf), ``error``. ``lower``: a valid lower bound of v (-inf
    if none); ``value``: objective of the best point found (None if none); ``point``: its
    input variables (flat float64) or None.
    """

    status: str
    lower: float
    value: float | None
    point: np.ndarray | None
    seconds: float


def _highs():
    try:
        import highspy
    except ImportError:  # pragma: no cover - highspy is a declared dependency of the verify extra
        raise CertorchError("the LP/MILP stages need highspy: pip install 'certorch[verify]'") from None
    return highspy


def minimize_region(
    enc: Encoding,
    out_vars: np.ndarray,
    C: np.ndarray,
    d: np.ndarray,
    *,
    integer: bool = True,
    time_limit: float = 60.0,
    threads: int = 1,
    tol: float = 1e-6,
    mip_rel_gap: float = 1e-4,
) -> SolveOutcome:
    """Minimize ``max_r (C_r f + d_r)`` (C: (R, K), d: (R,)) over ``enc``; see module doc."""
    hs = _highs()
    t0 = time.perf_counter()
    if time_limit <= 0:
        return SolveOutcome("timeout", -math.inf, None, None, 0.0)
    A, rlo, rhi, clo, chi, cost, offset, _ = region_objective(enc, out_vars, np.asarray(C, np.float64),
                                                               np.asarray(d, np.float64))
    A = A.tocsc()
    lp = hs.HighsLp()
    lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, clo, chi
    lp.row_lower_, lp.row_upper_ = rlo, rhi
    lp.offset_ = offset
    lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = A.shape[1], A.shape[0]
    use_int = integer and enc.integer.size > 0
    if use_int:
        integrality = [hs.HighsVarType.kContinuous] * A.shape[1]
        for i in enc.integer.tolist():
            integrality[i] = hs.HighsVarType.kInteger
        lp.integrality_ = integrality
    h = hs.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.passModel(lp)
    n_in = enc.var_of[0].size
    state = {"point": None, "value": None, "positive": False}
    if use_int:
        def on_solution(e) -> None:
            val = e.data_out.objective_function_value
            if val < -tol and state["point"] is None:
                state["point"] = np.asarray(e.data_out.mip_solution)[enc.var_of[0]].copy()
                state["value"] = float(val)

        def on_interrupt(e) -> None:
            if state["point"] is not None:
                e.interrupt()
            elif e.data_out.mip_dual_bound > tol:
                state["positive"] = True
                state["lower"] = float(e.data_out.mip_dual_bound)
                e.interrupt()

        h.cbMipImprovingSolution.subscribe(on_solution)
        h.cbMipInterrupt.subscribe(on_interrupt)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    S = hs.HighsModelStatus
    seconds = time.perf_counter() - t0
    if state["point"] is not None:
        return SolveOutcome("negative", -math.inf, state["value"], state["point"], seconds)
    if state["positive"]:
        return SolveOutcome("positive", state["lower"], None, None, seconds)
    if status == S.kInfeasible:
        return SolveOutcome("infeasible", math.inf, None, None, seconds)
    point, value = None, None
    sol = h.getSolution()
    if sol.value_valid:
        point = np.asarray(sol.col_value)[enc.var_of[0]].copy()
        value = float(info.objective_function_value)
    if status == S.kOptimal:
        lower = float(info.mip_dual_bound) if use_int else float(info.objective_function_value)
        if use_int and not math.isfinite(lower):
            lower = value if value is not None else -math.inf
        if lower > tol:
            return SolveOutcome("positive", lower, value, point, seconds)
        if value is not None and value < -tol and use_int:
            return SolveOutcome("negative", lower, value, point, seconds)
        return SolveOutcome("optimal", lower, value, point, seconds)
    if status in (S.kTimeLimit, S.kInterrupt, S.kIterationLimit, S.kSolutionLimit):
        lower = float(info.mip_dual_bound) if use_int else -math.inf
        return SolveOutcome("timeout", lower if math.isfinite(lower) else -math.inf, value, point, seconds)
    return SolveOutcome("error", -math.inf, value, point, seconds)


class MilpStage:
    """Big-M MILP stage. ``binaries="all"``: complete (Tjeng et al.); an int N: COLT-style
    refinement with binaries on the N most important unstable neurons per layer, the rest
    relaxed (incomplete, named ``refine``)."""

    batched = False

    def __init__(self, binaries: str | int = "all", mip_rel_gap: float = 1e-4, tol: float = 1e-6):
        if binaries != "all" and (not isinstance(binaries, int) or binaries < 0):
            raise CertorchError(f"binaries must be 'all' or a non-negative int, got {binaries!r}")
        self.binaries, self.mip_rel_gap, self.tol = binaries, mip_rel_gap, tol
        self.name = "milp" if binaries == "all" else "refine"

    def run(self, problem, idx, budget):
        import torch

        from certorch.verify.results import Verdict
        from certorch.verify.stages import StageOutput

        verdicts, lower, cex, secs, tout = [], [], {}, [], []
        for pos, i in enumerate(idx.tolist()):
            t0 = time.perf_counter()
            verdict, point, timed_out = self._one(problem, i, float(budget[pos]), t0)
            if point is not None:
                cex[pos] = point
            verdicts.append(verdict)
            lower.append(float(problem.region_lb(i).min()))
            secs.append(time.perf_counter() - t0)
            tout.append(timed_out)
        return StageOutput(verdicts, torch.tensor(lower, dtype=torch.float64), cex, secs, tout)

    def _one(self, problem, i: int, budget: float, t0: float):
        import torch

        from certorch.graph.capture import capture
        from certorch.verify.lp import example_encoding, region_spec
        from certorch.verify.results import Verdict
        from certorch.verify.stages import float64_forward

        graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
        enc = example_encoding(problem, i, self.binaries)
        known = problem.region_lb(i)
        complete = self.binaries == "all" or enc.integer.size == enc.num_unstable
        undecided = False
        for g in np.argsort(known, kind="stable"):
            if known[g] > 0:
                continue
            C, d = region_spec(problem, i, int(g))
            left = budget - (time.perf_counter() - t0)
            out = minimize_region(enc, enc.var_of[graph.output], C, d, integer=True, time_limit=left,
                                  threads=problem.threads, tol=self.tol, mip_rel_gap=self.mip_rel_gap)
            if out.status in ("positive", "infeasible") or (out.status == "optimal" and out.lower > 0):
                known[g] = max(known[g], out.lower)
                continue
            if out.status == "timeout":
                return None, None, True
            if out.status == "error":
                raise RuntimeError(f"HiGHS failed on region {int(g)} of example {i}")
            if out.point is not None and out.value is not None and out.value <= 0:
                shape = problem.box.lower.shape[1:]
                x = torch.from_numpy(out.point).view(1, *shape)
                x = torch.minimum(torch.maximum(x, problem.box.lower[i:i + 1]), problem.box.upper[i:i + 1])
                v = problem.values(float64_forward(problem, x), torch.tensor([i])).amin()
                if float(v) <= 0:
                    return Verdict.FALSIFIED, x[0], False
            if not complete:
                return None, None, False  # relaxed optimum <= 0 without a real counterexample
            undecided = True  # optimum within tolerance of 0, or a candidate not confirmed in float64
            break
        if not undecided and (known > 0).all():
            return Verdict.VERIFIED, None, False
        return None, None, False
