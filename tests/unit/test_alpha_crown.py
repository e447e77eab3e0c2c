"""alpha-CROWN: between CROWN and the triangle LP, sound on random nets, warm starts, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import certorch as ct
from certorch.bounds.alpha import AlphaState
from certorch.errors import CertorchError
from certorch.graph.capture import capture
from tests.soundness.bound_checks import assert_within, pgd_points, sample_box, spec_values
from tests.soundness.test_bounds_hypothesis import _conv, _dense, _residual


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, widths=(16, 24, 24, 24, 5)) -> nn.Module:
    torch.manual_seed(seed)
    return _dense(list(widths)).double().eval()


def _inputs(seed: int, B: int = 3, shape=(1, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, *shape, generator=g, dtype=torch.float64)
    return x, torch.arange(B) % 5


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_alpha_crown_is_never_looser_than_crown(kind):
    if kind == "dense":
        model, (x, y), eps = _mlp(0), _inputs(0), 0.1
    else:
        torch.manual_seed(1)
        model, eps = _conv(3).double().eval(), 0.08
        x, y = _inputs(1, 2, (1, 8, 8))
        y = y % 4
    c = ct.bound(model, x, eps, method="crown", y=y)
    a = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=8)
    assert (a.lower >= c.lower - 1e-12).all() and (a.upper <= c.upper + 1e-12).all()
    assert a.lower.mean() > c.lower.mean() + 1e-4  # the optimisation does improve on these nets


def _lp_minimum(model, x_b, box_b, bounds, C_row) -> float:
    """Triangle-LP minimum of ``C_row . f`` on one example with the given node bounds."""
    from certorch.verify.encode import encode
    from certorch.verify.solve import minimize_region

    graph = capture(model, tuple(x_b.shape))
    enc = encode(graph, box_b.lower.flatten().numpy(), box_b.upper.flatten().numpy(), bounds)
    out = minimize_region(enc, enc.var_of[graph.output], C_row[None].numpy(), np.zeros(1), integer=False,
                          early_stop=False)
    assert out.solver_status == "optimal", out
    return float(out.value)


def test_alpha_crown_is_never_tighter_than_the_triangle_lp():
    model, (x, y), eps = _mlp(2, (16, 12, 12, 5)), _inputs(2, 2), 0.15
    a = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False, alpha_iters=30, return_intermediate=True)
    c = ct.bound(model, x, eps, method="crown", y=y, upper=False)
    graph = capture(model, tuple(x.shape[1:]))
    names = {n.name: n.index for n in graph.nodes}
    box = ct.linf_ball(x, eps)
    C = ct.margin_matrix(y, 5).to(torch.float64)
    gaps = []
    for b in range(x.shape[0]):
        bounds = {names[k]: (v.lower[b].flatten().numpy(), v.upper[b].flatten().numpy())
                  for k, v in a.intermediate.items()}
        for s in range(C.shape[1]):
            lp = _lp_minimum(model, x[b], box[b], bounds, C[b, s])
            assert a.lower[b, s] <= lp + 1e-7
            gaps.append(lp - float(a.lower[b, s]))
    assert (a.lower > c.lower + 1e-6).any()  # strictly between CROWN and the LP somewhere
    assert max(gaps) > 1e-6


SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _problems(draw):
    kind = draw(st.sampled_from(["dense", "conv", "residual"]))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    if kind == "dense":
        model = _dense([16] + draw(st.lists(st.integers(2, 10), min_size=1, max_size=3)) + [4])
    elif kind == "conv":
        model = _conv(draw(st.integers(1, 3)))
    else:
        model = _residual(draw(st.integers(1, 2)))
    model = model.double().eval()
    scale = draw(st.floats(0.5, 3.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    x.view(2, -1)[:, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    if kind == "dense":
        x = x[:, :, :4, :4].contiguous()
    eps = draw(st.sampled_from([0.0, 0.02, 0.1, 0.3]))
    return model, x, eps, g


@SETTINGS
@given(_problems())
def test_alpha_crown_bounds_contain_samples_and_pgd_points(problem):
    model, x, eps, g = problem
    C = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    b = ct.bound(model, x, eps, method="alpha-crown", C=C, alpha_iters=4)
    pts = torch.cat([sample_box(ct.linf_ball(x, eps), 600, g), pgd_points(model, x, eps, C, steps=10)])
    assert_within(spec_values(model, pts, C), b.lower, b.upper)


def test_warm_start_is_at_least_as_tight_as_a_cold_start():
    model, (x, y), eps = _mlp(3), _inputs(3, 4), 0.12
    cold = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False, alpha_iters=5)
    warm = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False, alpha_iters=5,
                    alpha_state=cold.extra["alpha"])
    assert (warm.lower.sum(1) >= cold.lower.sum(1) - 1e-12).all()
    assert warm.lower.mean() > cold.lower.mean()


def test_with_fixed_intermediate_bounds_the_state_reproduces_every_rows_best_bound():
    """Intermediate bounds given: each spec row's bound depends on its own slopes and multipliers,
    so one pass from the exported state gives every row's best bound over the iterations (branch
    and bound's float64 confirmation of a float32 search relies on it), not only the best sum's."""
    model, (x, y), eps = _mlp(5), _inputs(5, 4), 0.15
    crown = ct.bound(model, x, eps, method="crown", y=y, upper=False, return_intermediate=True).intermediate
    given = {k: crown[k] for k in ("1", "3", "5")}  # the ReLUs' inputs
    kw = dict(method="alpha-crown", y=y, upper=False, intermediate_bounds=given)
    cold = ct.bound(model, x, eps, alpha_iters=12, **kw)
    again = ct.bound(model, x, eps, alpha_iters=1, alpha_state=cold.extra["alpha"], **kw)
    assert (again.lower >= cold.lower - 1e-9).all()


def test_rows_where_the_crown_reference_was_not_beaten_export_unknown_slopes():
    """A warm start from slopes worse than CROWN's keeps CROWN's bound (the reference) and must
    export CROWN's slopes (unknown, NaN), not the worse ones: branch and bound's children start
    from the exported state, and from the worse slopes they would keep losing to the reference.
    Rows where the warm slopes won keep them."""
    model, (x, y), eps = _mlp(5), _inputs(5, 4), 0.15
    crown = ct.bound(model, x, eps, method="crown", y=y, upper=False, return_intermediate=True)
    given = {k: crown.intermediate[k] for k in ("1", "3", "5")}
    kw = dict(method="alpha-crown", y=y, upper=False, intermediate_bounds=given)
    state = ct.bound(model, x, eps, alpha_iters=12, **kw).extra["alpha"]
    zeros = AlphaState(state.signature, state.batch,
                       {side: {k: (ids, torch.zeros_like(v)) for k, (ids, v) in d.items()} for side, d in state.sides.items()})
    warm = ct.bound(model, x, eps, alpha_iters=1, alpha_state=zeros, **kw)
    lost = warm.lower <= crown.lower.detach()  # (B, S): the zero slopes did not beat CROWN's
    assert lost.any() and not lost.all()
    for (ids, slopes) in warm.extra["alpha"].sides["lower"].values():
        assert torch.equal(torch.isnan(slopes).all(-1), lost[:, ids])
        assert not torch.isnan(slopes[~lost[:, ids]]).any()


def _small_map_conv(seed: int) -> nn.Module:
    """Conv rows on a 4x4 map: a conv target's windows turn dense two ReLUs back (too wide)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5)).double().eval()


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_warm_start_matches_rows_by_identity_after_selecting_examples(kind):
    """A state selected for a sub-batch (whose IBP-unstable rows differ) gives each example the
    same bound as the full batch's warm start."""
    model, (x, y), eps = _mlp(4), _inputs(4, 4), 0.1
    if kind == "conv":
        model, eps = _small_map_conv(4), 0.1
    state = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False, alpha_iters=6).extra["alpha"]
    full = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False, alpha_iters=1, alpha_state=state)
    idx = torch.tensor([3, 1, 1])
    sub = ct.bound(model, x[idx], eps, method="alpha-crown", y=y[idx], upper=False, alpha_iters=1,
                   alpha_state=state.select(idx))
    assert torch.allclose(sub.lower, full.lower[idx], atol=1e-10, rtol=0)


def test_state_cat_and_select_round_trip():
    model, (x, y), eps = _mlp(5), _inputs(5, 3), 0.1
    s = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=2).extra["alpha"]
    back = AlphaState.cat([s.select(slice(0, 1)), s.select(slice(1, 3))])
    assert back.batch == 3 and back.sides.keys() == s.sides.keys()
    for side in s.sides:
        for key, (ids, v) in s.sides[side].items():
            ids2, v2 = back.sides[side][key]
            a, b = torch.argsort(ids), torch.argsort(ids2)
            assert torch.equal(ids2[b], ids[a]) and torch.equal(v2[:, b], v[:, a])


def test_state_cat_of_different_rows_marks_the_unknown_ones_nan():
    model, (x, y), eps = _mlp(5), _inputs(5, 3), 0.1
    s = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=2).extra["alpha"]
    side = next(iter(s.sides))
    key, (ids, v) = next(iter(s.sides[side].items()))
    first = AlphaState(s.signature, 1, {side: {key: (ids[:2], v[:1, :2])}})
    second = AlphaState(s.signature, 2, {side: {key: (ids[1:], v[1:3, 1:])}})
    ids2, v2 = AlphaState.cat([first, second]).sides[side][key]
    assert torch.equal(ids2, torch.unique(ids))
    pos = torch.searchsorted(ids2, ids)
    assert torch.equal(v2[0, pos[:2]], v[0, :2]) and torch.isnan(v2[0, pos[2:]]).all()
    assert torch.equal(v2[1:, pos[1:]], v[1:3, 1:]) and torch.isnan(v2[1:, pos[0]]).all()


def test_chunked_rows_and_dense_coefficients_give_the_same_bounds():
    """Spec chunks (checkpointed under autograd) and window vs dense rows do not change the result."""
    torch.manual_seed(6)
    model = _conv(3).double().eval()
    x, y = _inputs(6, 2, (1, 8, 8))
    y = y % 4
    ref = ct.bound(model, x, 0.08, method="alpha-crown", y=y, alpha_iters=4)
    chunked = ct.bound(model, x, 0.08, method="alpha-crown", y=y, alpha_iters=4, max_elements=300)
    dense = ct.bound(model, x, 0.08, method="alpha-crown", y=y, alpha_iters=4, patches=False)
    for other in (chunked, dense):
        assert torch.allclose(other.lower, ref.lower, atol=1e-9, rtol=0)
        assert torch.allclose(other.upper, ref.upper, atol=1e-9, rtol=0)


def test_example_chunks_give_the_same_bounds_and_one_state():
    """A memory budget that splits the batch into chunks of examples changes nothing per example;
    the chunks' states are concatenated and serve as a warm start of the whole batch."""
    model, (x, y), eps = _mlp(3), _inputs(3, 4), 0.12
    whole = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=3)
    chunked = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=3, memory_budget=900_000)
    assert torch.allclose(chunked.lower, whole.lower, atol=1e-12, rtol=0)
    assert chunked.extra["alpha"].batch == 4
    warm = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=3, alpha_state=chunked.extra["alpha"])
    assert warm.lower.mean() > whole.lower.mean()


def test_slopes_stay_in_the_unit_interval():
    model, (x, y), eps = _mlp(7), _inputs(7), 0.2
    s = ct.bound(model, x, eps, method="alpha-crown", y=y, alpha_iters=6, alpha_lr=5.0).extra["alpha"]
    for side in s.sides.values():
        for _, v in side.values():
            assert (v >= 0).all() and (v <= 1).all()


@pytest.mark.parametrize("kwargs, msg", [
    (dict(alpha_iters=0), "alpha_iters"),
    (dict(alpha_iters=2.5), "alpha_iters"),
    (dict(alpha_lr=-1.0), "alpha_lr"),
    (dict(alpha_lr=float("nan")), "alpha_lr"),
    (dict(alpha_state={"lower": {}}), "AlphaState"),
])
def test_bad_options_are_one_line_errors(kwargs, msg):
    model, (x, y) = _mlp(8), _inputs(8)
    with pytest.raises(CertorchError, match=msg):
        ct.bound(model, x, 0.1, method="alpha-crown", y=y, **kwargs)


def test_alpha_options_with_another_method_are_refused():
    model, (x, y) = _mlp(8), _inputs(8)
    with pytest.raises(CertorchError, match="alpha-crown"):
        ct.bound(model, x, 0.1, method="crown", y=y, alpha_iters=3)


def test_state_of_another_network_or_batch_is_refused():
    model, (x, y) = _mlp(9), _inputs(9)
    s = ct.bound(model, x, 0.1, method="alpha-crown", y=y, alpha_iters=1).extra["alpha"]
    with pytest.raises(CertorchError, match="another network"):
        ct.bound(_mlp(9, (16, 8, 5)), x, 0.1, method="alpha-crown", y=y, alpha_state=s)
    with pytest.raises(CertorchError, match="examples"):
        ct.bound(model, x[:2], 0.1, method="alpha-crown", y=y[:2], alpha_state=s)


def test_verifier_alpha_crown_stage_verifies_what_crown_cannot():
    from certorch.verify import certify_batch
    from certorch.verify.pipeline import build_stages
    from certorch.verify.stages import AlphaCrownStage

    assert isinstance(build_stages(["alpha-crown"])[-1], AlphaCrownStage)
    model, (x, _), eps = _mlp(10), _inputs(10, 6), 0.15
    with torch.no_grad():
        y = model(x).argmax(1)
    c = ct.bound(model, x, eps, method="crown", y=y, upper=False).lower.amin(1)
    a = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False).lower.amin(1)
    res = certify_batch(model, x, y, eps, stages=("alpha-crown",), timeout=30)
    verified = torch.tensor([r.verdict.name == "VERIFIED" for r in res])
    assert torch.equal(verified, a > 0)
    assert verified.sum() > (c > 0).sum()  # here CROWN proves 3 of 6, alpha-CROWN all 6


def _float32_problem(seed: int = 4, B: int = 3, eps: float = 0.08):
    """A float32 conv net and its classification problem as the pipeline builds it (float64 box)."""
    from certorch.spec import linf_ball, margin_matrix
    from certorch.verify.stages import Problem

    torch.manual_seed(seed)
    model = _conv(3).float().eval()
    x, y = _inputs(seed, B, (1, 8, 8))
    y = y % 4
    C = margin_matrix(y, 4).to(torch.float64)
    problem = Problem(model, linf_ball(x, eps, 0.0, 1.0), C, torch.zeros(C.shape[:2], dtype=torch.float64),
                      tuple((r,) for r in range(3)), x=x, y=y, eps=eps)
    return model, x, y, eps, problem


def test_verifier_stage_optimises_slopes_in_the_model_dtype_and_bounds_in_float64(monkeypatch):
    import certorch.bounds.api as api
    from certorch.verify.stages import AlphaCrownStage

    model, x, y, eps, problem = _float32_problem()
    calls, real = [], api.bound

    def spy(*args, **kwargs):
        calls.append((kwargs["dtype"], kwargs.get("alpha_iters"), kwargs.get("alpha_state") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "bound", spy)
    idx = torch.arange(problem.batch)
    out = AlphaCrownStage(iters=10).run(problem, idx, np.full(problem.batch, 60.0))
    assert calls == [(torch.float32, 10, False), (torch.float64, 1, True)]
    monkeypatch.setattr(api, "bound", real)
    crown64 = ct.bound(model, x, eps, method="crown", y=y, upper=False, dtype=torch.float64).lower.amin(1)
    full64 = ct.bound(model, x, eps, method="alpha-crown", y=y, upper=False, dtype=torch.float64,
                      alpha_iters=10).lower.amin(1)
    assert out.lower.dtype == torch.float64
    assert (out.lower >= crown64).all()  # the float64 pass keeps the maximum with CROWN's rows
    assert out.lower.mean() > crown64.mean() + 1e-3  # and the float32 slopes do improve on it
    assert torch.allclose(out.lower, full64, atol=1e-3 * float(full64.abs().max()))  # as good as optimising in float64


def test_float32_optimised_slopes_give_sound_float64_bounds():
    from certorch.verify.stages import AlphaCrownStage

    model, x, y, eps, problem = _float32_problem(seed=5, B=4, eps=0.1)
    out = AlphaCrownStage(iters=10).run(problem, torch.arange(problem.batch), np.full(problem.batch, 60.0))
    net = model.double()
    pts = torch.cat([sample_box(problem.box, 256, torch.Generator().manual_seed(0)),
                     pgd_points(net, x, eps, problem.C, steps=20)], 0)
    values = spec_values(net, pts, problem.C)  # (N, B, S)
    assert (out.lower[None, :] <= values.amin(2) + 1e-9).all()


def test_verifier_stage_of_a_float64_model_optimises_in_float64_directly(monkeypatch):
    import certorch.bounds.api as api
    from certorch.verify.stages import AlphaCrownStage

    _, _, _, _, problem = _float32_problem()
    problem.model = problem.model.double()
    calls, real = [], api.bound
    monkeypatch.setattr(api, "bound", lambda *a, **k: calls.append((k["dtype"], k.get("alpha_iters"))) or real(*a, **k))
    AlphaCrownStage(iters=4).run(problem, torch.arange(problem.batch), np.full(problem.batch, 60.0))
    assert calls == [(torch.float64, 4)]
