"""The big-M MILP stage (complete, Tjeng et al.) and its partial-binaries variant ``refine``.

Per example: encode the network with the per-node CROWN bounds and binaries on the unstable
ReLUs (all of them, or the N most important per layer), then minimize every not-yet-proven
region value with HiGHS through :func:`certorch.verify.solve.minimize_region`, which stops as
soon as an incumbent below 0 is found or the dual bound exceeds the safety margin, and is the one
place that turns the solve into an outcome (see :mod:`certorch.verify.solve` for the rule).
``VERIFIED`` needs every region proven positive; an infeasible encoding gives ``ERROR``; a
candidate point is rechecked with a float64 forward pass before ``FALSIFIED``.
"""
from __future__ import annotations

import time

import torch

from certorch.errors import CertorchError, DeadlineExceeded
from certorch.verify.lp import unencodable_output, solve_regions, try_points
from certorch.verify.results import Verdict
from certorch.verify.solve import minimize_region
from certorch.verify.stages import Problem, Stage, StageOutput


class MilpStage(Stage):
    """Big-M MILP stage. ``binaries="all"``: complete (Tjeng et al.); an int N: COLT-style
    refinement with binaries on the N most important unstable neurons per layer, the rest
    relaxed (incomplete, named ``refine``)."""

    batched = False

    def __init__(self, binaries: str | int = "all", mip_rel_gap: float = 1e-4, stop_below: float = 1e-6):
        if binaries != "all" and (not isinstance(binaries, int) or isinstance(binaries, bool) or binaries < 0):
            raise CertorchError(f"binaries must be 'all' or a non-negative int, got {binaries!r}")
        self.binaries, self.mip_rel_gap, self.stop_below = binaries, mip_rel_gap, stop_below
        self.name = "milp" if binaries == "all" else "refine"

    def run(self, problem, idx, budget):
        skip = unencodable_output(problem, idx, self.name)
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
        """(verdict or None, counterexample or None, timed out, message) for example ``i``."""
        try:
            return self._solve(problem, i, deadline)
        except DeadlineExceeded as e:  # CROWN node bounds or the encoding ran out of time
            return None, None, True, f"{self.name}: {e}"

    def _solve(self, problem: Problem, i: int, deadline: float):
        for g, out, _ in solve_regions(problem, i, self.binaries, deadline, integer=True,
                                         mip_rel_gap=self.mip_rel_gap, stop_below=self.stop_below):
            if out.outcome == "positive":
                continue
            if out.outcome == "error":
                return Verdict.ERROR, None, False, f"{self.name}: region {g}: {out.reason}"
            x = try_points(problem, i, [out.point]) if out.point is not None and out.value is not None \
                and out.value <= 0 else None
            if x is not None:
                return Verdict.FALSIFIED, x, False, ""
            if out.outcome == "timeout":
                return None, None, True, ""
            # a relaxed optimum <= 0 without a real counterexample, an optimum within the margin of 0,
            # or a candidate not confirmed in float64: undecided
            return None, None, False, (f"{self.name}: region {g}: {out.reason}" if out.reason else "")
        if (problem.region_lb(i) > 0).all():
            return Verdict.VERIFIED, None, False, ""
        return None, None, False, ""


__all__ = ["MilpStage", "minimize_region"]
