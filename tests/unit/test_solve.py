"""The one interpretation of a HiGHS solve (certorch.verify.solve): dual bound vs margin,
infeasible -> error, the LP's weak-duality bound, and what the LP/MILP stages make of it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.optimize import linprog
from torch import nn

from certorch.domains.box import Box
from certorch.verify import Verdict, run_stages, verify_box
from certorch.verify.lp import LPStage
from certorch.verify.milp import MilpStage
from certorch.verify.solve import Tolerances, interpret, lp_dual_bound, milp_margin
from certorch.verify.stages import Problem, node_bounds

pytest.importorskip("highspy")
pytestmark = pytest.mark.usefixtures("one_thread")


# --- the rule, on synthetic solver results -------------------------------------------------------

@pytest.mark.parametrize("integer", [True, False])
def test_bound_just_above_margin_is_positive_just_below_is_not(integer):
    m = 3e-6
    kw = dict(integer=integer, solver_status="optimal", margin=m, value=None, point=None, stop_below=1e-6)
    assert interpret(lower=m * 1.001, **kw).outcome == "positive"
    below = interpret(lower=m * 0.999, **kw)
    assert below.outcome == "undecided" and "margin" in below.reason
    for lower in (1e-6, -1e-6, 0.0):  # a bound at +-tol is never a proof
        assert interpret(lower=lower, **kw).outcome != "positive"


def test_primal_value_is_never_a_bound():
    """An optimal primal value far above 0 with no dual bound gives no proof."""
    r = interpret(integer=True, solver_status="optimal", lower=-math.inf, margin=1e-6, value=5.0,
                  point=np.zeros(2), stop_below=1e-6)
    assert r.outcome == "undecided" and r.lower == -math.inf


@pytest.mark.parametrize("status", ["infeasible", "unbounded_or_infeasible", "unbounded"])
def test_infeasible_or_unbounded_is_an_error_never_a_proof(status):
    r = interpret(integer=True, solver_status=status, lower=math.inf, margin=1e-6, value=None, point=None,
                  stop_below=1e-6)
    assert r.outcome == "error" and r.lower == -math.inf and status.split("_")[0] in r.reason


def test_candidate_point_and_timeout():
    kw = dict(integer=True, margin=1e-6, point=np.zeros(1), stop_below=1e-6)
    assert interpret(solver_status="interrupt", lower=-1.0, value=-2e-6, **kw).outcome == "negative"
    assert interpret(solver_status="time_limit", lower=-1.0, value=-1e-7, **kw).outcome == "timeout"
    assert interpret(solver_status="time_limit", lower=2e-6, value=None, **kw).outcome == "positive"


def test_milp_margin_formula():
    cost = np.array([0.0, 2.0, -1.0])
    lo, hi = np.array([-1.0, 0.0, -3.0]), np.array([1.0, 4.0, 0.5])
    tol = Tolerances(1e-7, 2e-7, 3e-7)
    expected = 6e-7 * (1 + 0.5 + (2 * 4 + 1 * 3) + (2 + 4 + 3.5))
    assert milp_margin(cost, 0.5, lo, hi, tol) == pytest.approx(expected, rel=1e-12)
    assert milp_margin(cost, 0.0, lo, np.array([1.0, math.inf, 0.5]), tol) == math.inf


# --- the LP weak-duality bound ----------------------------------------------------------------------

def _random_lp(seed):
    rng = np.random.default_rng(seed)
    m, n = 6, 5
    A = rng.normal(size=(m, n))
    x0 = rng.uniform(-0.5, 0.5, n)  # a feasible point
    act = A @ x0
    rl = np.where(rng.random(m) < 0.5, act - rng.uniform(0, 1, m), -np.inf)
    ru = np.where(np.isfinite(rl) & (rng.random(m) < 0.5), np.inf, act + rng.uniform(0, 1, m))
    return A, rl, ru, -np.ones(n), np.ones(n), rng.normal(size=n)


@pytest.mark.parametrize("seed", range(6))
def test_lp_dual_bound_is_valid_for_any_duals_and_tight_at_the_optimum(seed):
    A, rl, ru, cl, cu, c = _random_lp(seed)
    A_ub = np.vstack([A[np.isfinite(ru)], -A[np.isfinite(rl)]])
    b_ub = np.concatenate([ru[np.isfinite(ru)], -rl[np.isfinite(rl)]])
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=list(zip(cl, cu)), method="highs")
    assert res.status == 0
    opt = res.fun + 0.25
    # exact duals (scipy's marginals) give the optimum; random duals give a lower bound
    y = np.zeros(A.shape[0])
    y[np.isfinite(ru)] += res.ineqlin.marginals[: int(np.isfinite(ru).sum())]
    y[np.isfinite(rl)] -= res.ineqlin.marginals[int(np.isfinite(ru).sum()):]
    lb, margin = lp_dual_bound(sparse.csr_matrix(A), rl, ru, cl, cu, c, 0.25, y)
    assert lb == pytest.approx(opt, abs=1e-9) and lb <= opt + margin and 0 < margin < 1e-12
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        lb, margin = lp_dual_bound(sparse.csr_matrix(A), rl, ru, cl, cu, c, 0.25, y + rng.normal(size=y.shape))
        assert lb <= opt + margin


# --- the stages ---------------------------------------------------------------------------------------

def _abs_net() -> nn.Module:
    """f(x) = relu(x) + relu(-x) = |x| (two unstable ReLUs on boxes around 0)."""
    lin = nn.Linear(1, 2)
    out = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        lin.bias.zero_()
        out.weight.copy_(torch.tensor([[1.0, 1.0]]))
        out.bias.zero_()
    return nn.Sequential(lin, nn.ReLU(), out).double()


def _abs_box():
    return Box(torch.tensor([-0.2], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))


def _spec(d: float):
    return [(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([d], dtype=torch.float64))]  # unsafe: |x|+d <= 0


def test_milp_minimum_within_solver_tolerance_is_not_verified():
    """min |x| + d over [-0.2, 1] is d. With d = +5e-7 (inside HiGHS's tolerances) the property
    holds, but HiGHS's MILP dual bound cannot prove it: not VERIFIED. (Before: the dual bound
    5e-7 > 0 was taken as a proof.) With d = -5e-7 it is false; d = 1e-2 is clearly verified."""
    model = _abs_net()
    r = verify_box(model, _abs_box(), _spec(5e-7), stages="milp", timeout=20)
    assert r.verdict == Verdict.UNKNOWN and not r.margin_lb > 0 and "margin" in r.message
    r = verify_box(model, _abs_box(), _spec(-5e-7), stages="milp", timeout=20)
    assert r.verdict == Verdict.FALSIFIED and r.margin_ub <= 0
    assert verify_box(model, _abs_box(), _spec(1e-2), stages="milp", timeout=20).verdict == Verdict.VERIFIED


def test_lp_bound_is_the_recomputed_dual_bound():
    """The triangle LP is exact for |x| = relu(x) + relu(-x); its weak-duality bound (recomputed
    from the duals, margin = float64 rounding only) proves d = 5e-7 and never more than d, and
    never proves d = -5e-7."""
    model = _abs_net()
    r = verify_box(model, _abs_box(), _spec(5e-7), stages="lp", timeout=20)
    assert r.verdict == Verdict.VERIFIED and 0 < r.margin_lb <= 5e-7 + 1e-15
    r = verify_box(model, _abs_box(), _spec(-5e-7), stages="lp", timeout=20)
    assert r.verdict != Verdict.VERIFIED and r.margin_lb <= -5e-7 + 1e-15


def _problem_with_wrong_node_bounds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    x = torch.full((1, 2), 0.5, dtype=torch.float64)
    box = Box(x - 0.1, x + 0.1)
    C = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    p = Problem(model, box, C, torch.full((1, 1), -100.0, dtype=torch.float64), ((0,),))
    nb = node_bounds(p, 0)  # the true CROWN bounds, then shifted away from every reachable value
    first = min(k for k in nb if k > 0)
    l, u = nb[first]
    nb[first] = (l + 100.0, u + 100.0)
    p.scratch["region_lb"] = {}
    return p


@pytest.mark.parametrize("stage", [LPStage(), MilpStage("all")], ids=["lp", "milp"])
def test_infeasible_encoding_is_an_error(stage):
    """Node bounds that contradict the box make the encoding infeasible: ERROR with the reason.
    (Before: infeasible was read as value +inf and VERIFIED.)"""
    r = run_stages(_problem_with_wrong_node_bounds(), [stage], timeout=20)[0]
    assert r.verdict == Verdict.ERROR and r.stage == stage.name
    assert "infeasible" in r.message and "intermediate bounds" in r.message
