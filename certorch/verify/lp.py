"""The triangle LP relaxation as an incomplete verification stage.

Per example: encode the network with the per-node CROWN bounds (``certorch.verify.encode``,
no binaries) and minimize each not-yet-proven region value with HiGHS. The LP optimum is a
lower bound of the region value at least as tight as CROWN with the same intermediate bounds.
The LP's optimal input point is also tried as a counterexample (rechecked by the pipeline).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from certorch.graph.capture import capture
from certorch.verify.encode import Encoding, encode
from certorch.verify.milp import minimize_region
from certorch.verify.results import Verdict
from certorch.verify.stages import Problem, Stage, StageOutput, float64_forward, node_bounds


def example_encoding(problem: Problem, i: int, binaries: str | int | None) -> Encoding:
    """Encoding of example ``i`` of ``problem`` (CROWN node bounds, float64)."""
    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    lo = problem.box.lower[i].detach().to(torch.float64).flatten().cpu().numpy()
    hi = problem.box.upper[i].detach().to(torch.float64).flatten().cpu().numpy()
    return encode(graph, lo, hi, node_bounds(problem, i), binaries)


def region_spec(problem: Problem, i: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(C (R, K), d (R,)) float64 rows of region ``g`` of example ``i``."""
    rows = list(problem.regions[g])
    C = problem.C[i, rows].detach().to(torch.float64).flatten(1).cpu().numpy()
    d = problem.d[i, rows].detach().to(torch.float64).cpu().numpy()
    return C, d


def lp_region_bounds(problem: Problem, i: int, time_limit: float = math.inf, stop_at_first_fail: bool = False):
    """LP lower bounds (R,) of example ``i``'s region values and the LP input points per region.

    Regions already proven positive are skipped (their known bound is kept).
    """
    enc = example_encoding(problem, i, None)
    graph = capture(problem.model, tuple(problem.box.lower.shape[1:]))
    known = problem.region_lb(i)
    lbs, points = known.copy(), {}
    t0 = time.perf_counter()
    for g in np.argsort(known, kind="stable"):
        if known[g] > 0:
            continue
        C, d = region_spec(problem, i, int(g))
        left = time_limit - (time.perf_counter() - t0)
        out = minimize_region(enc, enc.var_of[graph.output], C, d, integer=False, time_limit=min(left, 1e6),
                              threads=problem.threads, tol=math.inf)
        if out.status == "infeasible":
            lbs[g] = math.inf
        elif out.status in ("optimal", "positive"):
            lbs[g] = max(lbs[g], out.lower)
        if out.point is not None:
            points[int(g)] = out.point
        if out.status == "timeout":
            return lbs, points, True
        if stop_at_first_fail and lbs[g] <= 0:
            break
    return lbs, points, False


class LPStage(Stage):
    """Triangle LP relaxation, one example at a time."""

    name = "lp"
    batched = False

    def run(self, problem, idx, budget):
        verdicts, lower, cex, secs, tout = [], [], {}, [], []
        for pos, i in enumerate(idx.tolist()):
            t0 = time.perf_counter()
            lbs, points, timed_out = lp_region_bounds(problem, i, float(budget[pos]), stop_at_first_fail=True)
            np.maximum(problem.region_lb(i), lbs, out=problem.region_lb(i))
            lb = float(problem.region_lb(i).min())
            verdict = Verdict.VERIFIED if lb > 0 else None
            if verdict is None and points:
                shape = problem.box.lower.shape[1:]
                xs = torch.stack([torch.from_numpy(p).view(shape) for p in points.values()])
                xs = torch.minimum(torch.maximum(xs, problem.box.lower[i]), problem.box.upper[i])
                v = problem.values(float64_forward(problem, xs), torch.full((xs.shape[0],), i)).amin(dim=1)
                if float(v.min()) <= 0:
                    verdict, cex[pos] = Verdict.FALSIFIED, xs[int(v.argmin())]
            verdicts.append(verdict)
            lower.append(lb)
            secs.append(time.perf_counter() - t0)
            tout.append(timed_out)
        return StageOutput(verdicts, torch.tensor(lower, dtype=torch.float64), cex, secs, tout)
