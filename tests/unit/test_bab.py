"""Branch and bound: split-constrained bounds are sound, beta tightens them, and the ``bab``
stage's verdicts equal MILP's and brute force's on random tiny nets."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import certorch as ct
from certorch.errors import CertorchError
from certorch.graph.capture import capture
from certorch.verify import Verdict, certify_batch
from certorch.verify.bab import BabOptions, BabStage, branch_and_bound
from certorch.verify.pipeline import build_stages
from certorch.verify.stages import Problem
from certorch.spec import linf_ball, margin_matrix
from tests.soundness.test_bounds_hypothesis import _dense


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int, widths=(4, 16, 16, 3)) -> nn.Module:
    torch.manual_seed(seed)
    return _dense(list(widths)).double().eval()


def _pre_nodes(model, in_shape) -> list[str]:
    g = capture(model, in_shape)
    return [g.nodes[a.inputs[0]].name for a in g.activation_nodes()]


def _random_splits(model, x, eps, seed: int, k: int) -> dict[str, torch.Tensor]:
    """Signs on ``k`` random neurons of every pre-activation node (unstable or not)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in ((n, capture(model, tuple(x.shape[1:])).nodes) for n in _pre_nodes(model, tuple(x.shape[1:]))):
        node = next(m for m in shape if m.name == name)
        s = torch.zeros(x.shape[0], node.numel, dtype=torch.int8)
        idx = torch.randperm(node.numel, generator=g)[:k]
        s[:, idx] = (torch.randint(0, 2, (x.shape[0], k), generator=g) * 2 - 1).to(torch.int8)
        out[name] = s.view(x.shape[0], *node.shape)
    return out


def _satisfying_points(model, x, eps, splits, n: int, seed: int):
    """Samples of the box (with corners) that satisfy every split constraint, and their outputs."""
    g = torch.Generator().manual_seed(seed)
    box = linf_ball(x, eps, 0.0, 1.0)
    pts = box.lower + (box.upper - box.lower) * torch.rand(n, *x.shape[1:], generator=g, dtype=x.dtype)
    corners = torch.where(torch.rand(n, *x.shape[1:], generator=g) < 0.5, box.lower, box.upper)
    pts = torch.cat([pts, corners])
    graph = capture(model, tuple(x.shape[1:]))
    vals = graph.forward(pts)
    keep = torch.ones(pts.shape[0], dtype=torch.bool)
    names = {nd.name: nd.index for nd in graph.nodes}
    for name, s in splits.items():
        z = vals[names[name]].flatten(1)
        s = s[0].flatten().to(z.dtype)
        keep &= ((z * s) >= 0).all(1)
    return vals[graph.output][keep]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), method=st.sampled_from(["crown", "alpha-crown", "ibp"]))
def test_split_bounds_hold_on_every_point_of_the_subdomain(seed, k, method):
    model = _net(seed % 7)
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eps = 0.3
    splits = _random_splits(model, x, eps, seed, k)
    C = torch.eye(3, dtype=torch.float64)
    res = ct.bound(model, x, eps, method=method, C=C, splits=splits, dtype=torch.float64,
                   **({"alpha_iters": 10} if method == "alpha-crown" else {}))
    out = _satisfying_points(model, x, eps, splits, 20_000, seed)
    if out.shape[0] == 0:
        return  # (nearly) empty sub-domain: nothing to check
    assert (out.min(0).values >= res.lower[0] - 1e-9).all()
    assert (out.max(0).values <= res.upper[0] + 1e-9).all()


def test_split_multipliers_tighten_the_bound():
    """beta-CROWN: with a split z_j <= 0 the multiplier carries the constraint into the bound;
    clamping the neuron alone (CROWN with splits) is looser here (seed and neuron fixed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    x = torch.rand(1, 4, dtype=torch.float64)
    root = ct.bound(model, x, 0.3, method="alpha-crown", return_intermediate=True, upper=False)
    b = root.intermediate["0"]
    j = int(((b.lower < 0) & (b.upper > 0)).nonzero()[0, 1])
    s = torch.zeros(1, 16)
    s[0, j] = -1
    with torch.no_grad():
        crown = ct.bound(model, x, 0.3, method="crown", splits={"0": s}, upper=False)
    beta = ct.bound(model, x, 0.3, method="alpha-crown", splits={"0": s}, upper=False)
    assert (beta.lower >= crown.lower - 1e-12).all()
    assert float((beta.lower - crown.lower).max()) > 0.01
    out = _satisfying_points(model, x, 0.3, {"0": s}, 50_000, 0)
    assert (out.min(0).values >= beta.lower[0] - 1e-9).all()


def test_contradicting_splits_give_an_empty_domain_that_bab_drops():
    model = _net(1)
    x = torch.full((1, 4), 0.5, dtype=torch.float64)
    res = ct.bound(model, x, 0.0, method="ibp", return_intermediate=True)
    z = res.intermediate["1"].lower  # exact (eps 0): the sign of every first-layer neuron
    s = torch.where(z > 0, -1, 1).to(torch.int8)  # every split contradicts the point
    out = ct.bound(model, x, 0.0, method="crown", splits={"1": s}, return_intermediate=True)
    box = out.intermediate["1"]
    assert bool((box.lower > box.upper).any())


@pytest.mark.parametrize("bad, match", [
    ({"nope": torch.zeros(1, 16)}, "does not have"),
    ({"1": torch.zeros(1, 5)}, "must have shape"),
    ({"1": torch.full((1, 16), 2)}, "only -1, 0 and"),
])
def test_bad_splits_are_refused_with_one_line(bad, match):
    model = _net(0)
    x = torch.rand(1, 4, dtype=torch.float64)
    with pytest.raises(CertorchError, match=match):
        ct.bound(model, x, 0.1, method="crown", splits=bad)


def _problem(model, x, y, eps, K: int = 3) -> Problem:
    box = linf_ball(x, eps, 0.0, 1.0)
    C = margin_matrix(y, K).to(torch.float64)
    d = torch.zeros(C.shape[:2], dtype=torch.float64)
    return Problem(model, box, C, d, tuple((r,) for r in range(K - 1)), x=x, y=y, eps=eps)


def _brute_force_min(model, x, eps, y, n=200) -> float:
    """Smallest margin on an n x n grid of a 2-D input box (includes the corners)."""
    box = linf_ball(x, eps, 0.0, 1.0)
    a = torch.linspace(0, 1, n, dtype=torch.float64)
    g0, g1 = torch.meshgrid(a, a, indexing="ij")
    t = torch.stack([g0.flatten(), g1.flatten()], 1)
    pts = box.lower + (box.upper - box.lower) * t
    with torch.no_grad():
        out = model(pts)
    C = margin_matrix(y, 3)[0].to(torch.float64)
    return float((out @ C.T).min())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_bab_on_a_2d_input_agrees_with_brute_force(seed):
    """Input splitting (2 inputs): verified only when the grid's minimum margin is positive,
    falsified only with a point whose margin is <= 0."""
    model = _net(seed % 11, (2, 12, 12, 3))
    x = torch.rand(1, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.05 + 0.2 * (seed % 5) / 4
    r = branch_and_bound(_problem(model, x, y, eps), 0, math.inf, BabOptions(batch=16, iters=5, root_iters=5))
    grid = _brute_force_min(model, x, eps, y)
    assert r.verdict is not None, r.message
    if r.verdict == Verdict.VERIFIED:
        assert grid > 0 and 0 < r.lower <= grid + 1e-9
    else:
        with torch.no_grad():
            v = model(r.counterexample[None]) @ margin_matrix(y, 3)[0].to(torch.float64).T
        assert float(v.min()) <= 0
        assert not grid > 1e-3  # the grid may miss a thin violating region, never a wide one


@pytest.mark.parametrize("candidates", [1, 3])
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.3]))
def test_bab_relu_splitting_equals_milp_on_random_tiny_nets(candidates, seed, eps):
    """ReLU splitting (20 inputs: no input splitting): the same verdict as the complete MILP,
    with the best split by the score and with FSB over 3 candidates (a different search)."""
    model = _net(seed % 13, (20, 24, 16, 3))
    x = torch.rand(2, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    bab = certify_batch(model, x, y, eps, stages=[BabStage(BabOptions(branch_candidates=candidates))], timeout=60)
    milp = certify_batch(model, x, y, eps, stages="milp", timeout=60)
    g = torch.Generator().manual_seed(seed)
    for k, (a, b) in enumerate(zip(bab, milp)):
        assert a.verdict in (Verdict.VERIFIED, Verdict.FALSIFIED), a.message
        assert a.verdict == b.verdict
        if a.verdict == Verdict.VERIFIED:  # never above a sampled margin
            box = linf_ball(x[k : k + 1], eps, 0.0, 1.0)
            pts = box.lower + (box.upper - box.lower) * torch.rand(20_000, 20, generator=g, dtype=torch.float64)
            with torch.no_grad():
                m = model(pts) @ margin_matrix(y[k : k + 1], 3)[0].to(torch.float64).T
            assert a.margin_lb <= float(m.min()) + 1e-9


def test_bab_splits_relus_and_bounds_children_in_one_call_per_step(monkeypatch):
    import certorch.verify.bab as bab

    calls = []
    real = bab.bound_domains

    def counting(problem, i, net, box, *a, **k):
        calls.append(box.lower.shape[0])
        return real(problem, i, net, box, *a, **k)

    monkeypatch.setattr(bab, "bound_domains", counting)
    model = _net(3, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    r = branch_and_bound(_problem(model, x, y, 0.25), 0, math.inf, BabOptions(batch=8, iters=4))
    assert r.verdict == Verdict.VERIFIED
    assert r.domains == sum(calls) and len(calls) >= 2, (r, calls)
    assert max(calls[1:]) > 2  # several parents' children in one batched call
    assert all(c % 2 == 0 for c in calls[1:])


@pytest.mark.parametrize("stages, expected", [("bab", (20, None)), ("alpha-crown,bab", (3, 0.1))])
def test_a_root_warm_started_by_alpha_crown_optimises_at_the_childrens_rate(monkeypatch, stages, expected):
    """Cold, the root runs root_iters at alpha-CROWN's own rate; warm-started from the alpha-CROWN
    stage's slopes, it runs iters at the children's rate (a 0.5 step would throw the warm slopes away)."""
    import certorch.verify.bab as bab

    roots = []
    real = bab.bound_domains

    def recording(problem, i, net, box, splits, given, alpha, iters, deadline, *a, **k):
        if not splits:  # the root: no split yet
            roots.append((iters, k.get("lr")))
        return real(problem, i, net, box, splits, given, alpha, iters, deadline, *a, **k)

    monkeypatch.setattr(bab, "bound_domains", recording)
    model = _net(3, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    r = certify_batch(model, x, y, 0.25, stages=stages, timeout=60)[0]
    assert r.stage == "bab" and roots == [expected]


def test_bab_stops_at_its_memory_bound_with_a_message():
    model = _net(3, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    r = branch_and_bound(_problem(model, x, y, 0.25), 0, math.inf, BabOptions(batch=2, iters=2, max_bytes=1))
    assert r.verdict is None and "memory bound" in r.message


def test_bab_respects_its_deadline():
    model = _net(3, (20, 64, 64, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    import time

    t0 = time.perf_counter()
    r = branch_and_bound(_problem(model, x, y, 0.5), 0, t0 + 0.5, BabOptions(batch=4, iters=2))
    assert time.perf_counter() - t0 < 3.0
    assert r.verdict in (None, Verdict.FALSIFIED)  # 0.5 s is not enough to prove a 0.5 ball


def test_children_cut_by_the_deadline_inside_their_first_pass_do_not_crash_the_search(monkeypatch):
    """A bound call cut by its deadline inside its first pass returns coefficients only for the nodes
    that pass reached; the queue must still concatenate (it raised KeyError before) and the search
    reach the same verdict (coefficients only steer branching and the attack)."""
    import certorch.verify.bab as bab

    model = _net(3, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    opts = BabOptions(batch=2, iters=2)
    full = branch_and_bound(_problem(model, x, y, 0.25), 0, math.inf, opts)
    real, calls = bab.bound_domains, []

    def cut(*a, **k):
        doms = real(*a, **k)
        calls.append(doms.size)
        if len(calls) == 5:  # children queued behind full ones, as if the deadline struck before the pass reached the input
            doms.coeffs = {n: A for n, A in doms.coeffs.items() if n != capture(model, (20,)).nodes[0].name}
        return doms

    monkeypatch.setattr(bab, "bound_domains", cut)
    r = branch_and_bound(_problem(model, x, y, 0.25), 0, math.inf, opts)
    assert len(calls) > 5 and r.verdict == full.verdict == Verdict.VERIFIED, r.message


def test_bab_is_a_pipeline_stage():
    stages = build_stages("pgd,crown,alpha-crown,bab")
    assert [s.name for s in stages] == ["clean", "pgd", "crown", "alpha-crown", "bab"]
    assert isinstance(stages[-1], BabStage)


def test_bab_splits_the_input_of_a_tanh_net_and_agrees_with_brute_force():
    """Nets with activations other than ReLU are split on the input (no ReLU to fix)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double().eval()
    g = torch.Generator().manual_seed(7)
    for k in range(4):
        x = torch.rand(1, 2, generator=g, dtype=torch.float64)
        with torch.no_grad():
            y = model(x).argmax(1)
        r = branch_and_bound(_problem(model, x, y, 0.1), 0, math.inf, BabOptions(batch=16, iters=3, root_iters=5))
        grid = _brute_force_min(model, x, 0.1, y)
        assert r.verdict is not None, r.message
        if r.verdict == Verdict.VERIFIED:
            assert grid > 0 and r.lower <= grid + 1e-9
        else:
            with torch.no_grad():
                v = model(r.counterexample[None]) @ margin_matrix(y, 3)[0].to(torch.float64).T
            assert float(v.min()) <= 0


def test_refined_intermediate_bounds_tighten_the_given_ones_and_stay_sound():
    """``refine_intermediate``: the given (parent) bounds are priors, each node is recomputed under
    the splits and intersected with them; without it the given bounds are used as they are."""
    model = _net(2)
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    root = ct.bound(model, x, 0.3, method="crown", return_intermediate=True, upper=False)
    b1 = root.intermediate["1"]
    s = torch.zeros(1, 16, dtype=torch.int8)
    z1 = capture(model, (4,)).forward(x)[2]
    off = ((b1.lower < 0) & (b1.upper > 0) & (z1 < 0)).nonzero()[:, 1]
    s[0, off] = -1  # the unstable first-layer ReLUs that are off at x: x is in the sub-domain
    given = {k: root.intermediate[k] for k in ("1", "3")}
    kept = ct.bound(model, x, 0.3, method="crown", splits={"1": s}, intermediate_bounds=given,
                    return_intermediate=True, upper=False).intermediate["3"]
    refined = ct.bound(model, x, 0.3, method="crown", splits={"1": s}, intermediate_bounds=given,
                       refine_intermediate=["3"], return_intermediate=True, upper=False).intermediate["3"]
    assert torch.equal(kept.lower, given["3"].lower) and torch.equal(kept.upper, given["3"].upper)
    assert (refined.lower >= given["3"].lower).all() and (refined.upper <= given["3"].upper).all()
    assert float((refined.upper - refined.lower).sum()) < 0.9 * float((kept.upper - kept.lower).sum())
    box = linf_ball(x, 0.3, 0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    pts = box.lower + (box.upper - box.lower) * torch.rand(50_000, 4, generator=g, dtype=torch.float64)
    vals = capture(model, (4,)).forward(pts)
    inside = ((vals[2] * s.to(torch.float64)) >= 0).all(1)  # nodes: input, "0" (flatten), "1", "2", "3"
    z3 = vals[4][inside]
    assert z3.shape[0] > 0
    assert (z3 >= refined.lower - 1e-9).all() and (z3 <= refined.upper + 1e-9).all()
    with pytest.raises(CertorchError, match="refine_intermediate names node 'nope'"):
        ct.bound(model, x, 0.3, method="crown", intermediate_bounds=given, refine_intermediate=["nope"])


def test_children_are_never_bounded_below_their_parent():
    """A child's sub-domain lies in its parent's, so the parent's row bounds hold on it: a few
    warm-started iterations under a new split may land below them (here one iteration does), the
    kept bound never does."""
    from certorch.verify.bab import _Net, bound_domains, branch_relu, settle
    from certorch.verify.stages import crown_intermediate

    model = _net(11, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    p = _problem(model, x, y, 0.25)
    net = _Net(p)
    given = {k: v for k, v in crown_intermediate(p, torch.tensor([0]), math.inf).items() if k in net.pre}
    root = bound_domains(p, 0, net, p.box[0:1], {}, given, None, 20, math.inf)
    root.splits = {q: torch.zeros((1, *net.shape[q]), dtype=torch.int8) for q in net.pre}
    rep, ok, splits = branch_relu(settle(root, net, False), net)
    loose = bound_domains(p, 0, net, rep.box, splits, rep.bounds, rep.alpha, 1, math.inf)
    assert bool((loose.rows < rep.rows - 1e-9).any())  # what the floor is for
    kids = bound_domains(p, 0, net, rep.box, splits, rep.bounds, rep.alpha, 1, math.inf, floor=rep.rows)
    assert (kids.rows >= rep.rows).all() and (kids.lb >= root.lb[0]).all()


def _root_domain():
    """(problem, net, root domain) of a small search that needs several steps (seed 3, eps 0.25)."""
    import certorch.verify.bab as bab
    from certorch.verify.stages import crown_intermediate

    model = _net(3, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    p = _problem(model, x, y, 0.25)
    net = bab._Net(p)
    given = {k: v for k, v in crown_intermediate(p, torch.tensor([0]), math.inf).items() if k in net.pre}
    root = bab.bound_domains(p, 0, net, p.box[0:1], {}, given, None, 20, math.inf)
    root.splits = {q: torch.zeros((1, *net.shape[q]), dtype=torch.int8) for q in net.pre}
    return p, net, root


def test_queued_domains_keep_their_split_choice_not_their_coefficients(monkeypatch):
    """The queue drops each domain's coefficients (S rows per neuron: most of its bytes, copied
    at every step) once its split is chosen; branching uses the choice, made from the same rows,
    bounds and coefficients as before."""
    import certorch.verify.bab as bab

    p, net, root = _root_domain()
    settled = bab.settle(root, net, False)
    assert settled.coeffs == {} and root.coeffs and settled.nbytes() < root.nbytes()
    assert torch.equal(settled.choice, bab.relu_choice(root, net))
    parents_seen = []
    real = bab.branch_relu

    def spy(doms, net_):
        parents_seen.append((dict(doms.coeffs), doms.choice))
        return real(doms, net_)

    monkeypatch.setattr(bab, "branch_relu", spy)
    r = branch_and_bound(p, 0, math.inf, BabOptions(batch=2, iters=2))
    assert r.verdict == Verdict.VERIFIED and len(parents_seen) > 1
    assert all(c == {} and ch is not None for c, ch in parents_seen)


def test_fully_split_domains_are_decided_by_an_exact_lp():
    """Fixed case (found by the MILP comparison above): alpha/beta iterations leave fully split
    domains at about -1e-3, some of them empty (contradictory splits the clamped bounds do not
    reveal). The LP over each such domain is exact, and emptiness is proved by a Farkas
    certificate, so BaB alone verifies what MILP verifies."""
    model = _net(3474 % 13, (20, 24, 16, 3))
    x = torch.rand(2, 20, generator=torch.Generator().manual_seed(3474), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    bab = certify_batch(model, x[:1], y[:1], 0.2, stages="bab", timeout=60)[0]
    milp = certify_batch(model, x[:1], y[:1], 0.2, stages="milp", timeout=60)[0]
    assert milp.verdict == Verdict.VERIFIED
    assert bab.verdict == Verdict.VERIFIED, bab.message
    box = linf_ball(x[:1], 0.2, 0.0, 1.0)
    pts = box.lower + (box.upper - box.lower) * torch.rand(20_000, 20, generator=torch.Generator().manual_seed(0),
                                                           dtype=torch.float64)
    with torch.no_grad():
        m = model(pts) @ margin_matrix(y[:1], 3)[0].to(torch.float64).T
    assert 0 < bab.margin_lb <= float(m.min()) + 1e-9


def _inflate_float32_bounds(monkeypatch, by: float = 100.0, cap: float | None = None,
                            rows: list[int] | None = None) -> list[torch.dtype]:
    """Every float32 ``ct.bound`` call reports lower bounds ``by`` too high (a wrong estimate),
    at most ``cap``, on the spec ``rows`` (all without); returns the list of dtypes the calls ran in."""
    import certorch.bounds.api as api

    real, dtypes = api.bound, []

    def inflated(*a, **k):
        res = real(*a, **k)
        dtypes.append(k.get("dtype"))
        if k.get("dtype") == torch.float32:
            res.lower[:, slice(None) if rows is None else rows] += by
            if cap is not None:
                res.lower.clamp_(max=cap)
        return res

    monkeypatch.setattr(api, "bound", inflated)
    return dtypes


def _float32_case(seed: int, eps: float, sample: int | None = None):
    model = _net(seed % 13, (20, 24, 16, 3)).float()
    x = torch.rand(2, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if sample is not None:
        x = x[sample : sample + 1]
    with torch.no_grad():
        y = model(x.float()).argmax(1)
    return model, x, y, eps


#: (seed, eps, sample): searches of 41 to 385 domains that verify, and two that falsify only after
#: 15 and 39 domains (eps just above the MILP's robust radius, 0.11024 and 0.13042)
SEARCHES = [(3, 0.3, None), (11, 0.3, None), (3, 0.1103, 1), (13, 0.1305, 0)]


def _float32_search(model, x, y, eps) -> list:
    """Verdicts of branch and bound with the float32 search (``low_precision=True``), per example."""
    p = _problem(model, x, y, eps)
    return [branch_and_bound(p, k, math.inf, BabOptions(low_precision=True)) for k in range(x.shape[0])]


def test_float32_search_is_the_default_and_can_be_turned_off():
    assert BabOptions().low_precision is True
    assert BabStage().options.low_precision is True
    assert BabOptions(low_precision=False).low_precision is False


@pytest.mark.parametrize("seed, eps, sample", SEARCHES)
def test_float32_search_reaches_the_milp_verdicts_on_float32_nets(monkeypatch, seed, eps, sample):
    """Children bounded in float32 (confirmed in float64): the same verdicts as the complete MILP."""
    model, x, y, eps = _float32_case(seed, eps, sample)
    dtypes = _inflate_float32_bounds(monkeypatch, by=0.0)  # only records the calls' dtypes
    bab = _float32_search(model, x, y, eps)
    monkeypatch.undo()
    milp = certify_batch(model, x, y, eps, stages="milp", timeout=60)
    assert [a.verdict for a in bab] == [b.verdict for b in milp], [a.message for a in bab]
    assert torch.float32 in dtypes and torch.float64 in dtypes


@pytest.mark.parametrize("seed, eps, sample", SEARCHES)
def test_wrong_float32_estimates_never_prove_a_domain(monkeypatch, seed, eps, sample):
    """Even when every float32 bound is 100 too high (every child looks proved), only the float64
    confirmation proves: the verdicts stay those of the complete MILP."""
    model, x, y, eps = _float32_case(seed, eps, sample)
    _inflate_float32_bounds(monkeypatch)
    bab = _float32_search(model, x, y, eps)
    monkeypatch.undo()
    milp = certify_batch(model, x, y, eps, stages="milp", timeout=60)
    assert [a.verdict for a in bab] == [b.verdict for b in milp], [a.message for a in bab]


def test_a_region_that_turns_positive_in_float32_is_confirmed_at_once_or_dropped(monkeypatch):
    """Only the first spec row's float32 estimate is too high, so children look half proved: that
    row is bounded again in float64 at once (proven rows accumulate down the tree, as in a float64
    search) and never travels down as an estimate. After every step, a region positive in a
    child's rows is positive in its proven rows; the verdict is the MILP's."""
    import certorch.verify.bab as bab

    model = _net(5, (20, 24, 16, 5)).float()  # root: rows 0 and 1 unproven, verified after ~100 domains
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x.float()).argmax(1)
    eps = 0.2
    p = _problem(model, x, y, eps, K=5)
    _inflate_float32_bounds(monkeypatch, rows=[0])
    real, seen = bab.bound_children, []

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(bab, "bound_children", spy)
    r = branch_and_bound(p, 0, math.inf, BabOptions(low_precision=True))
    monkeypatch.undo()
    assert len(seen) > 1
    for kids in seen:
        looks = p.region_max(kids.rows) > 0
        assert not bool((looks & ~(p.region_max(kids.sound) > 0)).any())
    assert r.verdict == certify_batch(model, x, y, eps, stages="milp", timeout=60)[0].verdict


def test_an_undecided_search_reports_a_proven_lower_bound_not_an_estimate(monkeypatch):
    """Stopped by its memory bound after one step, with float32 estimates that are too high but
    never positive (nothing looks proved, the queue holds only estimates): the reported lower
    bound is a float64-proven one, below the margin of the MILP's counterexample."""
    model, x, y, eps = _float32_case(13, 0.1305, 0)
    milp = certify_batch(model, x, y, eps, stages="milp", timeout=60)[0]
    assert milp.verdict == Verdict.FALSIFIED and milp.margin_ub < 0
    _inflate_float32_bounds(monkeypatch, cap=-1e-12)
    r = branch_and_bound(_problem(model, x, y, eps), 0, math.inf, BabOptions(batch=2, iters=2, max_bytes=1,
                                                                                 low_precision=True))
    assert r.verdict is None and "memory bound" in r.message
    assert r.lower <= milp.margin_ub


def test_a_search_cut_while_bounding_children_reports_a_bound_below_the_parents_taken_out(monkeypatch):
    """The parents of the step that ran out of time are out of the queue but still open: the
    lower bound reported must cover them too (they hold the lowest bounds)."""
    import certorch.verify.bab as bab
    from certorch.errors import DeadlineExceeded

    model = _net(3, (20, 24, 16, 3))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    p = _problem(model, x, y, 0.25)
    real, seen = bab.bound_children, []

    def cut(problem, i, net, box, splits, given, alpha, iters, deadline, refine, floor, sound, search, lr=None):
        seen.append(float(problem.region_max(sound).amin(1).min()))  # lowest proven bound among the parents
        if len(seen) == 3:
            raise DeadlineExceeded("cut")
        return real(problem, i, net, box, splits, given, alpha, iters, deadline, refine, floor, sound, search, lr)

    monkeypatch.setattr(bab, "bound_children", cut)
    r = branch_and_bound(p, 0, math.inf, BabOptions(batch=2, iters=2))
    assert len(seen) == 3 and r.timed_out and r.verdict is None
    assert r.lower <= seen[-1]


def test_fsb_picks_the_candidate_whose_worse_child_bounds_best():
    import certorch.verify.bab as bab

    p, net, root = _root_domain()
    settled = bab.settle(root, net, False, 4)
    assert settled.choice.shape == (1, 4)
    assert int(settled.choice[0, 0]) == int(bab.relu_choice(root, net)[0])  # best first
    pick = bab.fsb_choice(p, 0, net, settled, None, math.inf)
    assert int(pick[0]) in settled.choice[0].tolist()
    worse = []
    for c in settled.choice[0].tolist():  # each candidate's children, one by one
        kids, _, splits = bab.branch_relu(settled, net, torch.tensor([c]))
        est = bab.bound_domains(p, 0, net, kids.box, splits, kids.bounds, kids.alpha, 1, math.inf)
        worse.append(float(est.lb.min()))
    assert worse[settled.choice[0].tolist().index(int(pick[0]))] == pytest.approx(max(worse), abs=1e-9)


def test_branch_candidates_must_be_a_positive_integer():
    with pytest.raises(CertorchError, match="branch_candidates"):
        BabOptions(branch_candidates=0)
