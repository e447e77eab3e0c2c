"""One place that runs HiGHS on an LP/MILP encoding and turns its answer into a verdict.

:func:`minimize_region` minimizes the value ``v = max_r (C_r f(x) + d_r)`` of one output region
over an encoding (:mod:`certorch.verify.encode`) and returns a :class:`SolveResult`. Both the LP
stage (no binaries) and the MILP stage (big-M binaries) use it; :func:`interpret` is the only
code that maps a solver status and its numbers to an outcome.

Outcomes and the rule behind them
---------------------------------
* ``positive`` (the region value is proven > 0) only when a *lower bound* of the minimum exceeds
  a safety margin: ``lower > margin``. Never from the primal objective.

  - LP: ``lower`` is a weak-duality bound that certorch recomputes in float64 from HiGHS's row
    duals ``y`` (Neumaier-Shcherbina style): with ``r = c - A^T y`` (exact reduced costs),
    ``lower = offset + sum_i y_i b_i(y_i) + sum_j min(r_j l_j, r_j u_j)``, where
    ``b_i(y_i)`` is the row's lower bound for ``y_i > 0`` and its upper bound for ``y_i < 0``
    (a dual of the wrong sign for an infinite side is set to 0 first). This holds for *any*
    ``y``, so HiGHS's feasibility and optimality tolerances cannot make it invalid; every column
    has finite bounds (the encoding gives implied interval bounds to every variable). Its margin
    only covers float64 rounding of that sum: ``margin = 4 (n + m + 2) 2^-53 T`` with ``T`` the
    sum of the magnitudes of all terms (``|y_i b_i|``, ``|r_j| max(|l_j|, |u_j|)``,
    ``(|c_j| + (|A|^T |y|)_j) max(|l_j|, |u_j|)``, ``|offset|``), the classical bound for
    summing ``n + m + 2`` products.
  - MILP: ``lower`` is HiGHS's dual bound (``mip_dual_bound``). It comes from node LPs solved to
    HiGHS's tolerances and cannot be rechecked here, so the margin is an error budget of those
    tolerances scaled by the problem's magnitudes::

        margin = (eps_p + eps_d + eps_int) * (1 + |offset| + sum_j |c_j| max(|l_j|, |u_j|)
                                                 + sum_j (u_j - l_j))

    ``eps_p``, ``eps_d``, ``eps_int``: HiGHS's primal feasibility, dual feasibility and MIP
    (integrality) feasibility tolerances; ``l, u``: the finite column bounds. The first sum is
    the largest objective magnitude on the variable box (a relative error ``eps`` of every
    objective column and of the integrality of every binary feeding it); the second is the
    dual-bound error of a node LP whose reduced costs have the wrong sign by up to ``eps_d`` on
    every nonbasic column (``c^T x - L(y) = sum_j r_j (x_j - bound_j)``). It is a first-order
    budget, not a floating-point proof; a dual bound within the margin gives ``undecided``.
* ``negative``: a point of the encoding with value ``<= -stop_below`` was found (a *candidate*
  counterexample; the pipeline rechecks its input part with a float64 forward pass).
* ``error``: the solve failed, or HiGHS says the encoding is *infeasible* (or unbounded). The
  input box is never empty and every node bound comes from a sound bound method, so
  infeasibility means wrong intermediate bounds or numerical trouble: never a proof.
* ``timeout``: the time limit (the caller's remaining budget) ran out undecided.
* ``undecided``: solved, but neither positive nor negative (e.g. the optimum lies within the
  margin of 0, or an LP relaxation whose bound is <= 0).

Solver output: HiGHS prints a banner when the first ``Highs`` object of a process is built; it
is built with the process's stdout (file descriptor 1) pointed elsewhere, and its log is off
(``output_flag``) before the model is passed. With ``log=stream`` the log goes to that stream
(the CLI's ``--verbose`` uses stderr), never to stdout.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from certorch.errors import CertorchError
from certorch.verify.encode import Encoding, region_objective

OUTCOMES = ("positive", "negative", "undecided", "timeout", "error")
_U = 2.0 ** -53  # unit round-off of float64
#: HiGHS MIP integrality tolerance used here (HiGHS's default is 1e-6; tighter keeps the margin small)
MIP_FEASIBILITY_TOLERANCE = 1e-7


@dataclass(frozen=True)
class SolveResult:
    """Outcome of minimizing one region value (see the module doc for the rules).

    Attributes:
        outcome: one of :data:`OUTCOMES`.
        lower: valid lower bound of the minimum (``-inf`` if none).
        margin: the safety margin ``lower`` had to exceed for ``positive``.
        value: objective of the best point found (``None`` if none).
        point: that point's input variables (flat float64), or ``None``.
        solver_status: HiGHS's model status in lower case without the ``k`` (``optimal``,
            ``infeasible``, ``time_limit``, ``interrupt``, ...), or ``not_run``.
        reason: why the outcome is ``error``/``undecided`` (one line), else empty.
        seconds: wall time of the solve (building the model included).
    """

    outcome: str
    lower: float
    margin: float
    value: float | None
    point: np.ndarray | None
    solver_status: str
    reason: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Tolerances:
    """HiGHS tolerances that enter the MILP margin."""

    primal: float = 1e-7
    dual: float = 1e-7
    integrality: float = MIP_FEASIBILITY_TOLERANCE


def milp_margin(cost: np.ndarray, offset: float, col_lower: np.ndarray, col_upper: np.ndarray,
                tol: Tolerances) -> float:
    """The MILP safety margin (module doc): ``(eps_p + eps_d + eps_int) * (1 + |offset| +
    sum_j |c_j| max(|l_j|, |u_j|) + sum_j (u_j - l_j))``; ``inf`` if a bound is infinite."""
    mag = np.maximum(np.abs(col_lower), np.abs(col_upper))
    with np.errstate(invalid="ignore"):
        obj = float(np.sum(np.abs(cost) * np.where(cost != 0, mag, 0.0)))
        rng = float(np.sum(col_upper - col_lower))
    scale = 1.0 + abs(offset) + obj + rng
    return (tol.primal + tol.dual + tol.integrality) * scale if math.isfinite(scale) else math.inf


def lp_dual_bound(A, row_lower: np.ndarray, row_upper: np.ndarray, col_lower: np.ndarray, col_upper: np.ndarray,
                  cost: np.ndarray, offset: float, row_dual: np.ndarray) -> tuple[float, float]:
    """Weak-duality lower bound of ``min c^T x + offset`` over ``{row_lower <= A x <= row_upper,
    col_lower <= x <= col_upper}`` from any row duals ``y`` (m,), and its rounding margin.

    ``A``: (m, n) scipy sparse. Returns ``(lower, margin)``; ``lower`` is ``-inf`` when a column
    with a nonzero reduced cost has an infinite bound on the side the bound needs.
    """
    y = np.asarray(row_dual, dtype=np.float64).copy()
    y[~np.isfinite(y)] = 0.0
    y[(y > 0) & ~np.isfinite(row_lower)] = 0.0  # a side that does not exist gives nothing
    y[(y < 0) & ~np.isfinite(row_upper)] = 0.0
    r = cost - A.T @ y
    row_term = np.where(y > 0, y * np.where(y > 0, row_lower, 0.0), y * np.where(y < 0, row_upper, 0.0))
    with np.errstate(invalid="ignore"):
        col_term = np.where(r > 0, r * np.where(r > 0, col_lower, 0.0), r * np.where(r < 0, col_upper, 0.0))
    lower = float(offset + row_term.sum() + col_term.sum())
    if math.isnan(lower):
        lower = -math.inf
    mag = np.maximum(np.abs(col_lower), np.abs(col_upper))
    with np.errstate(invalid="ignore"):
        grad = np.abs(cost) + abs(A).T @ np.abs(y)
        total = (abs(offset) + float(np.abs(row_term).sum()) + float(np.abs(col_term).sum())
                 + float(np.sum(np.where(grad > 0, grad * mag, 0.0))))
    n_terms = A.shape[0] + A.shape[1] + 2
    margin = 4.0 * n_terms * _U * total
    return lower, (margin if math.isfinite(margin) else math.inf)


def farkas_certified(h, A, row_lower: np.ndarray, row_upper: np.ndarray, col_lower: np.ndarray,
                     col_upper: np.ndarray) -> bool:
    """True when HiGHS's dual ray proves ``{row_lower <= A x <= row_upper, col bounds}`` empty:
    a feasible point would make every weak-duality bound of the zero objective <= 0, so a
    ray whose bound (either sign; recomputed with its rounding margin) exceeds its margin
    certifies infeasibility."""
    try:
        *_, exists, ray = h.getDualRay()  # (status, exists, ray)
    except Exception:  # a highspy without rays: no certificate
        return False
    if not exists:
        return False
    ray = np.asarray(ray, dtype=np.float64)
    if ray.shape != (A.shape[0],) or not np.isfinite(ray).all():
        return False
    zero = np.zeros(A.shape[1])
    for y in (ray, -ray):
        lower, margin = lp_dual_bound(A, row_lower, row_upper, col_lower, col_upper, zero, 0.0, y)
        if lower > margin:
            return True
    return False


def interpret(*, integer: bool, solver_status: str, lower: float, margin: float, value: float | None,
              point: np.ndarray | None, stop_below: float, seconds: float = 0.0) -> SolveResult:
    """The verdict rule (module doc) applied to one solve.

    ``lower``: the valid lower bound of the solve (LP: :func:`lp_dual_bound`; MILP: HiGHS's dual
    bound; ``-inf`` if none); ``value``/``point``: best primal point; ``stop_below``: a point
    with ``value <= -stop_below`` is a candidate counterexample.
    """
    kind = "MILP" if integer else "LP"
    lower = lower if lower is not None and not math.isnan(lower) else -math.inf

    def res(outcome, reason="", lo=lower):
        return SolveResult(outcome, lo, margin, value, point, solver_status, reason, seconds)

    if solver_status in ("infeasible", "unbounded_or_infeasible"):
        return res("error", f"HiGHS reports the {kind} encoding {solver_status.replace('_', ' ')} although the input "
                            "box is not empty: wrong intermediate bounds or numerical trouble", -math.inf)
    if solver_status == "unbounded":
        return res("error", f"HiGHS reports the {kind} encoding unbounded although every variable is bounded: "
                            "numerical trouble", -math.inf)
    if solver_status not in ("optimal", "time_limit", "interrupt", "iteration_limit", "solution_limit",
                             "objective_bound", "objective_target", "highs_interrupt"):
        return res("error", f"HiGHS failed on the {kind} ({solver_status})", -math.inf)
    if lower > margin:
        return res("positive")
    if value is not None and point is not None and value <= -stop_below:
        return res("negative")
    if solver_status == "optimal":
        if lower > 0:
            return res("undecided", f"{kind} bound {lower:.3g} > 0 is within the solver safety margin {margin:.3g}")
        return res("undecided", f"{kind} bound {lower:.3g} <= 0")
    return res("timeout", f"{kind} stopped by {solver_status.replace('_', ' ')}")


# --- running HiGHS ------------------------------------------------------------------------------

_CONSTRUCT_LOCK = threading.Lock()


def _highs_module():
    try:
        import highspy
    except ImportError:  # pragma: no cover - highspy is a declared dependency of the verify extra
        raise CertorchError("the LP/MILP stages need highspy: pip install 'certorch[verify]'") from None
    return highspy


def _libc_fflush() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - best effort (non-glibc platforms)
        pass


def new_highs(log: TextIO | None = None):
    """A silent ``highspy.Highs``: built with file descriptor 1 pointed at stderr (``log`` given)
    or the null device, so HiGHS's banner never reaches stdout; its log goes to ``log`` or nowhere."""
    hs = _highs_module()
    with _CONSTRUCT_LOCK:
        sys.stdout.flush()
        _libc_fflush()
        try:
            saved = os.dup(1)
        except OSError:  # no stdout at all: nothing to protect
            saved = None
        try:
            if saved is not None:
                target = 2 if log is not None else os.open(os.devnull, os.O_WRONLY)
                if log is not None:
                    sys.stderr.flush()
                os.dup2(target, 1)
                if target != 2:
                    os.close(target)
            try:
                h = hs.Highs()
                h.setOptionValue("output_flag", False)
            finally:
                _libc_fflush()
        finally:
            if saved is not None:
                os.dup2(saved, 1)
                os.close(saved)
    if log is not None:
        h.setOptionValue("output_flag", True)
        h.setOptionValue("log_to_console", False)

        def write(e) -> None:
            log.write(e.message)

        h.cbLogging.subscribe(write)
    return h


_STATUS_NAMES: dict = {}


def _status_name(status) -> str:
    name = getattr(status, "name", str(status))
    if name not in _STATUS_NAMES:
        s = name[1:] if name.startswith("k") else name
        _STATUS_NAMES[name] = "".join("_" + ch.lower() if ch.isupper() else ch for ch in s).lstrip("_")
    return _STATUS_NAMES[name]


def highs_lp(A, cost: np.ndarray, col_lower: np.ndarray, col_upper: np.ndarray, row_lower: np.ndarray,
             row_upper: np.ndarray, offset: float = 0.0):
    """A ``highspy.HighsLp`` for ``min cost . v + offset`` s.t. ``row_lower <= A v <= row_upper``,
    ``col_lower <= v <= col_upper``; ``A``: a scipy CSC matrix."""
    hs = _highs_module()
    lp = hs.HighsLp()
    lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, col_lower, col_upper
    lp.row_lower_, lp.row_upper_ = row_lower, row_upper
    lp.offset_ = offset
    lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = A.shape[1], A.shape[0]
    return lp


def minimize_region(
    enc: Encoding,
    out_vars: np.ndarray,
    C: np.ndarray,
    d: np.ndarray,
    *,
    integer: bool = True,
    time_limit: float = 60.0,
    threads: int = 1,
    mip_rel_gap: float = 1e-4,
    stop_below: float = 1e-6,
    early_stop: bool = True,
    log: TextIO | None = None,
    empty_is_proof: bool = False,
) -> SolveResult:
    """Minimize ``max_r (C_r f + d_r)`` (C: (R, K), d: (R,)) over ``enc`` and interpret the solve.

    ``integer``: keep the encoding's binaries (MILP), else the LP relaxation. ``time_limit``:
    seconds for building and solving (the caller's remaining budget). With ``early_stop`` a
    MILP stops as soon as an incumbent has value ``<= -stop_below`` or its dual bound exceeds the
    margin. ``log``: stream for HiGHS's log (default: silent). ``empty_is_proof`` (LP only; for
    branch-and-bound sub-domains, whose split constraints may contradict each other): an LP that
    HiGHS calls infeasible is ``positive`` (lower ``inf``) when its dual ray is a Farkas certificate,
    i.e. the weak-duality bound of the zero objective along the ray, recomputed here with its
    rounding margin (:func:`lp_dual_bound`), is positive; the solver's word alone proves nothing.
    """
    t0 = time.perf_counter()
    if not time_limit > 0:
        return SolveResult("timeout", -math.inf, math.inf, None, None, "not_run", "no time left", 0.0)
    hs = _highs_module()
    A, rlo, rhi, clo, chi, cost, offset, _ = region_objective(enc, out_vars, np.asarray(C, np.float64),
                                                               np.asarray(d, np.float64))
    A = A.tocsc()
    use_int = integer and enc.integer.size > 0
    tol = Tolerances()
    margin = milp_margin(cost, offset, clo, chi, tol) if use_int else math.inf  # LP: set after the solve
    lp = highs_lp(A, cost, clo, chi, rlo, rhi, offset)
    if use_int:
        integrality = np.full(A.shape[1], hs.HighsVarType.kContinuous)
        integrality[enc.integer] = hs.HighsVarType.kInteger
        lp.integrality_ = integrality.tolist()
    h = new_highs(log)
    left = time_limit - (time.perf_counter() - t0)
    if not left > 0:
        return SolveResult("timeout", -math.inf, margin, None, None, "not_run", "no time left after encoding",
                           time.perf_counter() - t0)
    h.setOptionValue("time_limit", float(left))
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.setOptionValue("primal_feasibility_tolerance", tol.primal)
    h.setOptionValue("dual_feasibility_tolerance", tol.dual)
    h.setOptionValue("mip_feasibility_tolerance", tol.integrality)
    h.passModel(lp)
    inputs = enc.var_of[0]
    state: dict = {"point": None, "value": None, "lower": None, "late": False}
    hard_deadline = t0 + time_limit  # HiGHS's own time_limit is checked rarely (presolve, root LP)

    def late(e) -> bool:
        if time.perf_counter() > hard_deadline:
            state["late"] = True
            e.interrupt()
            return True
        return False

    if use_int:
        def on_solution(e) -> None:
            val = e.data_out.objective_function_value
            if early_stop and val <= -stop_below and state["point"] is None:
                state["point"] = np.asarray(e.data_out.mip_solution)[inputs].copy()
                state["value"] = float(val)

        def on_interrupt(e) -> None:
            if late(e) or not early_stop:
                return
            if state["point"] is not None:
                e.interrupt()
            elif e.data_out.mip_dual_bound > margin:
                state["lower"] = float(e.data_out.mip_dual_bound)
                e.interrupt()

        h.cbMipImprovingSolution.subscribe(on_solution)
        h.cbMipInterrupt.subscribe(on_interrupt)
    h.cbSimplexInterrupt.subscribe(late)
    h.cbIpmInterrupt.subscribe(late)
    h.run()
    status = _status_name(h.getModelStatus())
    if state["late"] and status in ("interrupt", "highs_interrupt"):
        status = "time_limit"
    info = h.getInfo()
    sol = h.getSolution()
    point, value = state["point"], state["value"]
    if point is None and sol.value_valid:
        point = np.asarray(sol.col_value)[inputs].copy()
        value = float(info.objective_function_value)
    if use_int:
        lower = state["lower"] if state["lower"] is not None else float(info.mip_dual_bound)
        if status == "optimal" and not math.isfinite(lower) and value is not None:
            lower = -math.inf  # no dual bound reported: no proof
    elif status == "optimal" and sol.dual_valid:
        lower, margin = lp_dual_bound(A.tocsr(), rlo, rhi, clo, chi, cost, offset, np.asarray(sol.row_dual))
    elif status == "infeasible" and empty_is_proof and farkas_certified(h, A.tocsr(), rlo, rhi, clo, chi):
        return SolveResult("positive", math.inf, margin, None, None, status,
                           "infeasible (Farkas certificate checked)", time.perf_counter() - t0)
    else:
        lower = -math.inf
    return interpret(integer=use_int, solver_status=status, lower=lower, margin=margin, value=value, point=point,
                     stop_below=stop_below, seconds=time.perf_counter() - t0)


__all__ = ["OUTCOMES", "SolveResult", "Tolerances", "farkas_certified", "highs_lp", "interpret", "lp_dual_bound",
           "milp_margin", "minimize_region", "new_highs"]
