"""Bound engine behaviour: API contract, exactness and tightness relations, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certorch as ct
from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.models import build

METHODS = ["ibp", "zonotope", "symbolic", "crown", "crown-ibp", "dual"]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build("mnist_small", dataset="mnist").eval().double()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    return model, x, y


@pytest.mark.parametrize("method", METHODS)
def test_margins_have_shape_batch_by_classes_minus_one(method, small):
    model, x, y = small
    b = ct.bound(model, x, 0.01, method=method, y=y)
    assert b.lower.shape == (4, 9) and b.upper.shape == (4, 9)
    assert (b.lower <= b.upper).all()


@pytest.mark.parametrize("method", METHODS)
def test_without_spec_bounds_are_on_the_logits(method, small):
    model, x, _ = small
    b = ct.bound(model, x, 0.01, method=method)
    out = model(x)
    assert b.lower.shape == (4, 10)
    assert (b.lower <= out + 1e-9).all() and (out <= b.upper + 1e-9).all()


@pytest.mark.parametrize("method", METHODS)
def test_zero_eps_gives_the_network_output(method, small):
    model, x, y = small
    b = ct.bound(model, x, 0.0, method=method, y=y)
    m = ct.margins(model(x), y)
    assert torch.allclose(b.lower, m, atol=1e-9) and torch.allclose(b.upper, m, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_single_linear_layer_is_bounded_exactly(method):
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).double()
    model = nn.Sequential(lin)
    x = torch.rand(5, 6, dtype=torch.float64)
    C = torch.randn(2, 3, dtype=torch.float64)
    b = ct.bound(model, x, 0.1, method=method, C=C)
    box = ct.linf_ball(x, 0.1)
    W = C @ lin.weight
    center = box.center @ W.T + C @ lin.bias
    rad = box.radius @ W.abs().T
    assert torch.allclose(b.lower, center - rad, atol=1e-12)
    assert torch.allclose(b.upper, center + rad, atol=1e-12)


def test_dual_equals_zonotope_and_crown_with_parallel_slopes(small):
    """Wong-Kolter's dual network, DeepZ and a backward pass with u/(u-l) slopes are the same bound."""
    model, x, y = small
    dual = ct.bound(model, x, 0.02, method="dual", y=y)
    zono = ct.bound(model, x, 0.02, method="zonotope", y=y)
    crown_par = ct.bound(model, x, 0.02, method="crown", y=y, slope="parallel")
    assert torch.allclose(dual.lower, zono.lower, atol=1e-9)
    assert torch.allclose(dual.upper, zono.upper, atol=1e-9)
    assert torch.allclose(dual.lower, crown_par.lower, atol=1e-9)


def test_crown_is_tighter_than_ibp_on_average_on_a_trained_net(trained_mlp):
    model, x, y = trained_mlp
    crown = ct.bound(model, x, 0.03, method="crown", y=y).lower
    ibp = ct.bound(model, x, 0.03, method="ibp", y=y).lower
    assert crown.mean() >= ibp.mean()
    assert (crown - ibp).mean() > 0


def test_crown_ibp_final_layer_is_no_looser_than_ibp(trained_mlp):
    model, x, y = trained_mlp
    assert (ct.bound(model, x, 0.03, method="crown-ibp", y=y).lower >= ct.bound(model, x, 0.03, method="ibp", y=y).lower - 1e-9).all()


def test_bounds_are_differentiable_wrt_parameters(small):
    model, x, y = small
    for method in METHODS:
        model.zero_grad()
        loss = -ct.bound(model, x, 0.01, method=method, y=y).lower.mean()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), method
        assert any(g.abs().sum() > 0 for g in grads), method


def test_certified_needs_a_correct_prediction_and_positive_margins(small):
    model, x, y = small
    pred = model(x).argmax(1)
    ok = ct.certified(model, x, pred, 0.0, method="crown")
    assert ok.all()
    wrong = (pred + 1) % 10
    assert not ct.certified(model, x, wrong, 0.0, method="crown").any()


def test_float64_mode_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = build("digits_mlp", dataset="digits").eval()
    x = torch.rand(2, 1, 8, 8)
    b = ct.bound(model, x, 0.01, method="crown", dtype=torch.float64)
    assert b.lower.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32


def test_projected_dual_estimates_the_exact_bound(small):
    model, x, y = small
    exact = ct.bound(model, x, 0.02, method="dual", y=y).lower
    est = ct.bound(model, x, 0.02, method="dual", y=y, projections=500, generator=torch.Generator().manual_seed(0)).lower
    assert ((est - exact).abs().mean() / exact.abs().mean()) < 0.15


def test_intermediate_bounds_are_exposed_per_layer(small):
    model, x, y = small
    res = ct.bound(model, x, 0.01, method="crown", y=y, return_intermediate=True)
    assert "1" in res.intermediate and res.intermediate["1"].lower.shape == (4, 16, 14, 14)
    zres = ct.bound(model, x, 0.01, method="zonotope", y=y, return_intermediate=True)
    z = zres.regions["3"]  # the second conv layer's convex region a + A e
    box = z.box()
    assert (box.lower <= box.upper).all()


def test_residual_network_bounds_contain_samples():
    torch.manual_seed(0)
    from certorch.models.wong import ResBlock

    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), ResBlock(3, 4, downsample=True), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5)).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    box = ct.linf_ball(x, 0.05)
    pts = box.lower + (box.upper - box.lower) * torch.rand(3000, *x.shape, dtype=torch.float64)
    with torch.no_grad():
        out = model(pts.reshape(-1, 1, 8, 8)).reshape(3000, 2, 5)
        for method in METHODS:
            b = ct.bound(model, x, 0.05, method=method)
            assert (out >= b.lower - 1e-9).all() and (out <= b.upper + 1e-9).all(), method


def test_avgpool_batchnorm_and_tanh_are_supported_by_ibp_and_crown():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    b = ct.bound(model, x, 0.05, method="ibp")
    box = ct.linf_ball(x, 0.05)
    pts = box.lower + (box.upper - box.lower) * torch.rand(2000, *x.shape, dtype=torch.float64)
    with torch.no_grad():
        out = model(pts.reshape(-1, 1, 8, 8)).reshape(2000, 2, 3)
    assert (out >= b.lower - 1e-9).all() and (out <= b.upper + 1e-9).all()
    for method in ("crown", "zonotope"):  # tanh through its relaxation object (certorch.relax.sshape)
        c = ct.bound(model, x, 0.05, method=method)
        assert (out >= c.lower - 1e-9).all() and (out <= c.upper + 1e-9).all()


# --- bad input ----------------------------------------------------------------------------

def test_negative_eps_is_rejected(small):
    model, x, y = small
    with pytest.raises(CertorchError, match="eps must be >= 0"):
        ct.bound(model, x, -0.1, y=y)


def test_lo_above_hi_is_rejected(small):
    model, x, y = small
    with pytest.raises(CertorchError, match="lo must be <= hi"):
        ct.bound(model, x, 0.1, y=y, lo=1.0, hi=0.0)


def test_nan_input_is_rejected(small):
    model, x, y = small
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CertorchError, match="NaN"):
        ct.bound(model, bad, 0.1, y=y)


def test_nan_weights_are_rejected():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(CertorchError, match="0.weight"):
        ct.bound(model, torch.rand(1, 3), 0.1)


def test_huge_finite_weights_are_accepted():
    """Finite weights whose float32 sum overflows: the fast NaN check falls back to an exact one
    (it raised StopIteration before)."""
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(3e38)
        model[0].bias.zero_()
    b = ct.bound(model, torch.zeros(1, 2), 0.0, method="ibp")
    assert torch.equal(b.lower, torch.zeros(1, 2))


def test_label_out_of_range_is_rejected(small):
    model, x, _ = small
    with pytest.raises(CertorchError, match="labels"):
        ct.bound(model, x, 0.1, y=torch.tensor([0, 1, 2, 10]))


def test_input_shape_mismatch_is_rejected(small):
    model, _, y = small
    with pytest.raises(CertorchError, match="shape"):
        ct.bound(model, torch.rand(4, 1, 27, 27), 0.1, y=y)


def test_unsupported_module_names_the_module_and_the_supported_list():
    model = nn.Sequential(nn.Linear(4, 4), nn.MaxPool1d(2))
    with pytest.raises(UnsupportedOperationError, match=r"'1' \(MaxPool1d\); supported: .*Conv2d"):
        ct.bound(model, torch.rand(2, 4), 0.1)


def test_unknown_method_lists_the_valid_ones(small):
    model, x, y = small
    with pytest.raises(CertorchError, match="valid: ibp, zonotope"):
        ct.bound(model, x, 0.1, y=y, method="deeppoly2")


def test_projections_cannot_certify(small):
    model, x, y = small
    with pytest.raises(CertorchError, match="projections"):
        ct.certified(model, x, y, 0.1, method="dual", projections=10)


def test_certified_uses_the_margin_certificate_for_linf_dist_nets():
    from certorch.nn.linf_dist import set_p
    from certorch.nn.linf_dist_cert import certify

    torch.manual_seed(0)
    net = build("linf_dist_net", dataset="digits", width=16, depth=2).eval()
    set_p(net, float("inf"))
    x = torch.rand(6, 1, 8, 8)
    y = net(x).argmax(1)
    assert torch.equal(ct.certified(net, x, y, 0.001), certify(net, x, y, 0.001))
    assert ct.certified(net, x, y, 0.0).all()


@pytest.mark.parametrize("method", METHODS)
def test_lower_only_bounds_equal_the_full_call(method, small):
    model, x, y = small
    full = ct.bound(model, x, 0.01, method=method, y=y)
    low = ct.bound(model, x, 0.01, method=method, y=y, upper=False)
    assert torch.allclose(low.lower, full.lower, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_a_spec_without_rows_computes_only_the_activations_input_bounds(method, small):
    """C with no rows: (B, 0) bounds, and the ReLUs' input bounds of the full call."""
    model, x, y = small
    full = ct.bound(model, x, 0.01, method=method, y=y, return_intermediate=True)
    none = ct.bound(model, x, 0.01, method=method, C=torch.zeros(0, 10, dtype=torch.float64), return_intermediate=True)
    assert none.lower.shape == (4, 0) and none.upper.shape == (4, 0)
    relu_inputs = ["1", "3", "6"]  # mnist_small: conv, conv, linear before each ReLU
    for name in relu_inputs:
        assert torch.allclose(none.intermediate[name].lower, full.intermediate[name].lower, atol=1e-12), name
        assert torch.allclose(none.intermediate[name].upper, full.intermediate[name].upper, atol=1e-12), name
    assert "7" not in none.regions and "7" not in none.intermediate  # the last ReLU is never reached


@pytest.mark.parametrize("method", METHODS)
def test_intermediate_boxes_without_regions(method, small):
    """``return_intermediate="boxes"``: the same bounds and intermediate boxes as ``True``, and
    no forward regions kept (each is freed once its users are computed)."""
    model, x, y = small
    full = ct.bound(model, x, 0.01, method=method, y=y, return_intermediate=True)
    boxes = ct.bound(model, x, 0.01, method=method, y=y, return_intermediate="boxes")
    assert torch.equal(boxes.lower, full.lower) and torch.equal(boxes.upper, full.upper)
    assert boxes.intermediate.keys() == full.intermediate.keys() and boxes.regions == {}
    for name, b in full.intermediate.items():
        assert torch.equal(boxes.intermediate[name].lower, b.lower) and torch.equal(boxes.intermediate[name].upper, b.upper)


def test_return_intermediate_takes_true_false_or_boxes(small):
    model, x, y = small
    with pytest.raises(CertorchError, match="return_intermediate must be True, False or 'boxes', got 'regions'"):
        ct.bound(model, x, 0.01, y=y, return_intermediate="regions")
