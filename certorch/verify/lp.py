"""The triangle LP relaxation as an incomplete verification stage, and the per-example encoding
helpers shared with the MILP stage.

Per example: encode the network with the per-node CROWN bounds (``certorch.verify.encode``,
no binaries) and minimize each not-yet-proven region value with HiGHS
(:func:`certorch.verify.solve.minimize_region`). The lower bound kept is the weak-duality bound
recomputed from the LP's duals (never the primal objective), so it is a valid bound whatever
HiGHS's tolerances did; a region counts as proven only when that bound exceeds its rounding
margin. An infeasible or unbounded LP is an ``ERROR`` (the input box is not empty and every
variable is bounded: wrong intermediate bounds or numerical trouble, an alarm to keep loud). A
solve that merely failed (e.g. HiGHS status ``unknown``) proves nothing and decides nothing: the
example stays undecided, with the solver's reason as its message, and goes on to the next stage
(the MILP). The LP's optimal input point is also tried as a counterexample (rechecked by
the pipeline).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from certorch.errors import DeadlineExceeded
from certorch.graph.capture import capture
from certorch.verify.encode import Encoding, encode, unsupported_reason
from certorch.verify.results import Verdict
from certorch.verify.solve import SolveResult, minimize_region
from certorch.verify.stages import Problem, Stage, StageOutput, float64_forward, node_bounds


def flat64(t: torch.Tensor) -> np.ndarray:
    """One example's tensor as the flat float64 numpy array the encoder takes (on the CPU)."""
    return t.detach().to(torch.float64).flatten().cpu().numpy()


def example_encoding(problem: Problem, i: int, binaries: str | int | None, deadline: float = math.inf) -> Encoding:
    """Encoding of example ``i`` of ``problem`` (CROWN node bounds, float64)."""
    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    return encode(graph, flat64(problem.box.lower[i]), flat64(problem.box.upper[i]), node_bounds(problem, i, deadline),
                  binaries, deadline=deadline if math.isfinite(deadline) else None)


def region_spec(problem: Problem, i: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(C (R, K), d (R,)) float64 rows of region ``g`` of example ``i``."""
    rows = list(problem.regions[g])
    C = problem.C[i, rows].detach().to(torch.float64).flatten(1).cpu().numpy()
    d = problem.d[i, rows].detach().to(torch.float64).cpu().numpy()
    return C, d


def solve_regions(problem: Problem, i: int, binaries: str | int | None, deadline: float, *, integer: bool,
                  mip_rel_gap: float = 1e-4, stop_below: float = 1e-6):
    """Minimize every not-yet-proven region value of example ``i``, least proven first.

    Yields ``(g, SolveResult)``; a positive result raises the stored region bound. The caller
    stops iterating when it has its answer.
    """
    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    enc = example_encoding(problem, i, binaries, deadline)
    known = problem.region_lb(i)
    for g in np.argsort(known, kind="stable"):
        if known[g] > 0:
            continue
        C, d = region_spec(problem, i, int(g))
        out = minimize_region(enc, enc.var_of[graph.output], C, d, integer=integer,
                              time_limit=min(deadline - time.perf_counter(), 1e6), threads=problem.threads,
                              mip_rel_gap=mip_rel_gap, stop_below=stop_below, log=problem.solver_log)
        if out.outcome == "positive":
            known[g] = max(known[g], out.lower)
        elif not integer and out.outcome != "error":  # a valid LP bound, but not a proof: kept <= 0
            known[g] = max(known[g], min(out.lower, 0.0))
        yield int(g), out, enc


def try_points(problem: Problem, i: int, points: list[np.ndarray]) -> torch.Tensor | None:
    """The first of the solver's input points (clipped into the box) with a float64 value <= 0."""
    if not points:
        return None
    shape = problem.box.lower.shape[1:]
    xs = torch.stack([torch.from_numpy(p).view(shape) for p in points])
    xs = torch.minimum(torch.maximum(xs, problem.box.lower[i]), problem.box.upper[i])
    v = problem.values(float64_forward(problem, xs), torch.full((xs.shape[0],), i)).amin(dim=1)
    k = int(v.argmin())
    return xs[k] if float(v[k]) <= 0 else None


def unencodable_output(problem: Problem, idx, stage: str) -> StageOutput | None:
    """Undecided output for every example when the network has ops the encoding lacks (e.g.
    Sigmoid): an incomplete stage that cannot run decides nothing; it is not an ``ERROR``."""
    reason = unsupported_reason(capture(problem.model, tuple(problem.box.lower.shape[1:])))
    if reason is None:
        return None
    n = len(idx)
    return StageOutput([None] * n, None, {}, [0.0] * n, [False] * n, {p: f"{stage}: skipped, {reason}" for p in range(n)})


_ENCODING_WRONG = ("infeasible", "unbounded_or_infeasible", "unbounded")


class LPStage(Stage):
    """Triangle LP relaxation, one example at a time."""

    name = "lp"
    batched = False

    def run(self, problem, idx, budget):
        skip = unencodable_output(problem, idx, "lp")
        if skip is not None:
            return skip
        verdicts, lower, cex, secs, tout, msgs = [], [], {}, [], [], {}
        for pos, i in enumerate(idx.tolist()):
            t0 = time.perf_counter()
            verdict, point, timed_out, msg = self._one(problem, i, t0 + float(budget[pos]))
            if point is not None:
                cex[pos] = point
            if msg:
                msgs[pos] = msg
            verdicts.append(verdict)
            lower.append(float(problem.region_lb(i).min()))
            secs.append(time.perf_counter() - t0)
            tout.append(timed_out)
        return StageOutput(verdicts, torch.tensor(lower, dtype=torch.float64), cex, secs, tout, msgs)

    def _one(self, problem: Problem, i: int, deadline: float):
        try:
            return self._solve(problem, i, deadline)
        except DeadlineExceeded as e:
            return None, None, True, f"lp: {e}"

    def _solve(self, problem: Problem, i: int, deadline: float):
        points = []
        for g, out, _ in solve_regions(problem, i, None, deadline, integer=False):
            if out.outcome == "error":
                if out.solver_status in _ENCODING_WRONG:
                    return Verdict.ERROR, None, False, f"lp: region {g}: {out.reason}"
                return None, None, False, f"lp: region {g}: {out.reason}"  # a failed solve is no verdict
            if out.point is not None:
                points.append(out.point)
            if out.outcome == "timeout":
                return None, None, True, ""
            if out.outcome != "positive":
                break  # one region the LP cannot prove is enough to stop
        if (problem.region_lb(i) > 0).all():
            return Verdict.VERIFIED, None, False, ""
        x = try_points(problem, i, points)
        return (Verdict.FALSIFIED, x, False, "") if x is not None else (None, None, False, "")


__all__ = ["LPStage", "SolveResult", "example_encoding", "region_spec", "solve_regions", "try_points",
           "unencodable_output"]
