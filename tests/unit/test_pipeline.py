"""Unit tests of the verification pipeline (certorch.verify.pipeline / stages / results)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import certorch as ct
from certorch.attacks import PGD
from certorch.domains.box import Box
from certorch.errors import CertorchError
from certorch.verify import Verdict, VerificationResult, build_stages, certify_batch, run_stages, verify_box
from certorch.verify.stages import Problem, Stage, StageOutput

torch.set_num_threads(1)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[1].weight.mul_(6.0)  # steep enough that decisions change inside [0, 1]^4
    return net


@pytest.fixture(scope="module")
def data():
    model = tiny_net()
    x = torch.rand(12, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[1] = (y[1] + 1) % 3  # one misclassified example
    return model, x, y


def test_misclassified_is_not_verified(data):
    model, x, y = data
    r = certify_batch(model, x[1:2], y[1:2], 0.05, stages="crown,milp", timeout=10)[0]
    assert r.verdict == Verdict.NOT_VERIFIED and r.stage == "clean"


def test_milp_decides_every_example_and_verified_is_never_attacked(data):
    model, x, y = data
    eps = 0.1
    res = certify_batch(model, x, y, eps, stages="pgd,ibp,crown,lp,milp", timeout=20)
    assert {r.stage for r in res} >= {"clean", "pgd", "ibp", "crown", "milp"}
    assert all(r.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED, Verdict.NOT_VERIFIED) for r in res)
    verified = torch.tensor([r.verdict == Verdict.VERIFIED for r in res])
    assert verified.any() and (~verified).sum() > 1
    atk = PGD(steps=100, restarts=5, loss="margin", seed=1)(model, x[verified], y[verified], eps)
    assert not atk.success.any()
    for r in res:
        if r.verdict == Verdict.VERIFIED:
            assert r.margin_lb > 0
        assert set(r.stage_seconds) and r.seconds >= 0


def test_falsified_counterexample_is_in_box_and_confirmed_in_float64(data):
    model, x, y = data
    eps = 0.2
    res = certify_batch(model, x, y, eps, stages="milp", timeout=20)
    box = ct.linf_ball(x.double(), eps)
    fals = [i for i, r in enumerate(res) if r.verdict == Verdict.FALSIFIED]
    assert fals
    for i in fals:
        c = res[i].counterexample
        assert c.dtype == torch.float64 and bool(box[i].contains(c).all())
        with torch.no_grad():
            logits = _f64(model)(c.unsqueeze(0))
        assert float(ct.margins(logits, y[i:i + 1]).min()) <= 0
        assert res[i].stage == "milp" and res[i].margin_ub <= 0


def _f64(model):
    import copy

    return copy.deepcopy(model).double()


def test_lp_bound_between_crown_and_milp(data):
    model, x, y = data
    for i in range(2, 9):
        crown = certify_batch(model, x[i:i + 1], y[i:i + 1], 0.1, stages="crown", timeout=10)[0]
        lp = certify_batch(model, x[i:i + 1], y[i:i + 1], 0.1, stages="crown,lp", timeout=10)[0]
        assert lp.margin_lb >= crown.margin_lb - 1e-6


class _Lies(Stage):
    name = "liar"

    def __init__(self, verdict, point=None, lower=None):
        self.verdict, self.point, self.lower_val = verdict, point, lower

    def run(self, problem, idx, budget):
        n = idx.numel()
        cex = {p: self.point for p in range(n)} if self.point is not None else {}
        lower = None if self.lower_val is None else torch.full((n,), self.lower_val, dtype=torch.float64)
        return StageOutput([self.verdict] * n, lower=lower, counterexamples=cex)


class _Crash(Stage):
    name = "crash"

    def run(self, problem, idx, budget):
        raise RuntimeError("boom")


def _problem(model, x, y, eps):
    box = ct.linf_ball(x.double(), eps)
    C = ct.margin_matrix(y, 3).double()
    return Problem(model, box, C, torch.zeros(C.shape[:2], dtype=torch.float64), ((0,), (1,)), x=x.double(), y=y,
                   eps=eps)


def test_unconfirmed_counterexample_is_not_falsified(data):
    model, x, y = data
    p = _problem(model, x[2:3], y[2:3], 0.01)
    r = run_stages(p, [_Lies(Verdict.FALSIFIED, point=x[2].double())], timeout=5)[0]
    assert r.verdict == Verdict.UNKNOWN and "not confirmed" in r.message


def test_verified_without_positive_bound_is_refused(data):
    model, x, y = data
    p = _problem(model, x[2:3], y[2:3], 0.01)
    assert run_stages(p, [_Lies(Verdict.VERIFIED, lower=-1.0)], timeout=5)[0].verdict == Verdict.UNKNOWN


def test_crash_is_error_not_unknown(data):
    model, x, y = data
    p = _problem(model, x[2:4], y[2:4], 0.01)
    res = run_stages(p, [_Crash()], timeout=5)
    assert all(r.verdict == Verdict.ERROR and r.stage == "crash" and "boom" in r.message for r in res)


def test_verify_box_with_disjunction_spec():
    model = tiny_net(1).double()
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)[0]
    k = int(out.argmax())
    box = Box(x[0] - 0.001, x[0] + 0.001)
    # unsafe: some other logit >= logit k  (one disjunct per j) -> verified at a tiny radius
    spec = [(torch.eye(3)[k] - torch.eye(3)[j], torch.zeros(1)) for j in range(3) if j != k]
    assert verify_box(model, box, spec, stages="milp", timeout=10).verdict == Verdict.VERIFIED
    # unsafe: logit k >= its own value - 1 (contains the center) -> falsified at the clean stage
    spec = [(-torch.eye(3)[k][None], out[k:k + 1] - 1)]
    r = verify_box(model, box, spec, stages="crown", timeout=10)
    assert r.verdict == Verdict.FALSIFIED and r.stage == "clean"


def test_bad_inputs_raise_one_line_errors(data):
    model, x, y = data
    with pytest.raises(ct.CertorchError, match="timeout"):
        certify_batch(model, x, y, 0.1, timeout=0)
    with pytest.raises(ct.CertorchError, match="timeout"):
        certify_batch(model, x, y, 0.1, timeout=-3)
    with pytest.raises(ct.CertorchError, match="unknown verification stage"):
        build_stages("crown,nonsense")
    with pytest.raises(ct.CertorchError, match="C must have shape"):
        verify_box(model, Box(x[0], x[0]), torch.ones(2, 5))


def test_configured_stage_objects_are_used_as_given(data):
    from certorch.verify.bab import BabOptions, BabStage

    model, x, y = data
    bab = BabStage(BabOptions(low_precision=False, batch=8))
    stages = build_stages(["pgd", "crown", bab, "bab", "milp"])
    assert [s.name for s in stages] == ["clean", "pgd", "crown", "bab", "milp"]
    assert stages[3] is bab
    ref = certify_batch(model, x, y, 0.05, stages="pgd,crown,milp", timeout=20)
    got = certify_batch(model, x, y, 0.05, stages=["pgd", "crown", bab, "milp"], timeout=20)
    assert [r.verdict for r in got] == [r.verdict for r in ref]
    with pytest.raises(ct.CertorchError, match="name or a Stage object"):
        build_stages(["crown", 3])


def test_result_json_roundtrip():
    r = VerificationResult(Verdict.TIMEOUT, "milp", -math.inf, 1.5, {"crown": 0.1, "milp": 1.4}, index=3, label=7)
    back = VerificationResult.from_json(r.to_json())
    assert back.verdict == Verdict.TIMEOUT and back.margin_lb == -math.inf and back.stage_seconds == r.stage_seconds
    assert back.index == 3 and back.label == 7


def test_milp_timeout_gives_timeout_verdict(data):
    model, x, y = data
    p = _problem(model, x[8:9], y[8:9], 0.1)  # needs the MILP (CROWN does not decide)
    from certorch.verify.milp import MilpStage

    res = run_stages(p, [MilpStage("all")], timeout=1e-4)[0]
    assert res.verdict == Verdict.TIMEOUT


def test_failed_lp_solve_leaves_the_example_to_the_milp(data, monkeypatch):
    """HiGHS failing on the LP (status "unknown") is no verdict: the MILP still decides."""
    import certorch.verify.lp as lp_mod
    from certorch.verify.lp import LPStage
    from certorch.verify.milp import MilpStage
    from certorch.verify.solve import SolveResult

    real = lp_mod.minimize_region

    def lp_fails(*args, integer, **kw):
        if integer:
            return real(*args, integer=integer, **kw)
        return SolveResult("error", -math.inf, math.inf, None, None, "unknown", "HiGHS failed on the LP (unknown)")

    monkeypatch.setattr(lp_mod, "minimize_region", lp_fails)
    model, x, y = data
    p = _problem(model, x[8:9], y[8:9], 0.1)  # CROWN does not decide it
    only_lp = run_stages(p, [LPStage()], timeout=10)[0]
    assert only_lp.verdict == Verdict.UNKNOWN and "unknown" in only_lp.message
    p = _problem(model, x[8:9], y[8:9], 0.1)
    both = run_stages(p, [LPStage(), MilpStage("all")], timeout=10)[0]
    assert both.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED) and both.stage == "milp"


def test_lp_and_milp_skip_networks_they_cannot_encode_without_error():
    """A Sigmoid network: CROWN bounds it; LP/MILP (ReLU only) leave the rest undecided, never ERROR."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 10), nn.Sigmoid(), nn.Linear(10, 3)).double()
    with torch.no_grad():
        net[1].weight.mul_(6.0)
    x = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    res = certify_batch(net, x, y, 0.2, stages="pgd,ibp,crown,lp,milp", timeout=10)
    assert all(r.verdict != Verdict.ERROR for r in res)
    assert any(r.verdict == Verdict.UNKNOWN and "skipped" in r.message for r in res)
    verified = torch.tensor([r.verdict == Verdict.VERIFIED for r in res])
    if verified.any():
        atk = PGD(steps=100, restarts=5, loss="margin", seed=1)(net, x[verified], y[verified], 0.2)
        assert not atk.success.any()


def test_the_bab_stage_takes_its_options_after_its_name():
    from certorch.verify.bab import BabStage

    stages = build_stages("pgd,crown,bab:branch_candidates=3:low_precision=false:batch=16:lr=0.25")
    bab = next(s for s in stages if isinstance(s, BabStage))
    o = bab.options
    assert (o.branch_candidates, o.low_precision, o.batch, o.lr) == (3, False, 16, 0.25)
    assert next(s for s in build_stages("bab") if isinstance(s, BabStage)).options == BabStage().options


@pytest.mark.parametrize("text, match", [
    ("bab:nope=1", "bab option"),
    ("bab:batch", "bab option"),
    ("bab:batch=many", "integer"),
    ("bab:refine=maybe", "true or false"),
    ("bab:branch_candidates=0", "branch_candidates"),
    ("bab:lr=fast", "a number"),
    ("bab:lr=0", "positive finite"),
    ("bab:lr=nan", "positive finite"),
    ("bab:parse=1", "bab option"),  # an attribute of the options class that is not an option
    ("crown:batch=2", "only the bab and alpha-crown stages"),
    ("alpha-crown:steps=5", "alpha-crown option"),
    ("alpha-crown:iters=0", "alpha_iters must be a positive integer"),
    ("alpha-crown:iters=2.5", "an integer"),
    ("alpha-crown:lr=-1", "alpha_lr must be a positive finite number"),
    ("alpha-crown:low_precision=perhaps", "true or false"),
])
def test_bad_stage_options_are_one_line_errors(text, match):
    with pytest.raises(CertorchError, match=match):
        build_stages(text)


def test_the_alpha_crown_stage_takes_its_options_after_its_name():
    from certorch.bounds.alpha import DEFAULT_ITERS, DEFAULT_LR
    from certorch.verify.stages import AlphaCrownStage

    stage = next(s for s in build_stages("pgd,alpha-crown:iters=5:lr=0.25:low_precision=false,bab")
                 if isinstance(s, AlphaCrownStage))
    assert (stage.iters, stage.lr, stage.low_precision) == (5, 0.25, False)
    plain = next(s for s in build_stages("alpha-crown") if isinstance(s, AlphaCrownStage))
    assert (plain.iters, plain.lr, plain.low_precision) == (DEFAULT_ITERS, DEFAULT_LR, True)


def test_the_alpha_crown_iterations_reach_the_slope_optimisation(data, monkeypatch):
    import certorch.bounds.api as api

    seen = []
    real = api.bound

    def spy(*args, **kwargs):
        seen.append(kwargs.get("alpha_iters"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "bound", spy)
    model, x, y = data
    certify_batch(model, x[:2], y[:2], eps=0.3, stages="alpha-crown:iters=3", timeout=30)
    assert 3 in seen  # the optimisation in the model's dtype; then one float64 evaluation pass
    assert set(seen) <= {3, 1}
