"""Relaxations of every activation through one protocol (ReLU, LeakyReLU, Sigmoid, Tanh): lines
sound under dense sampling (saturated and zero-width boxes included), bounds of every backward
method sound on nets built from each activation, clear refusals where a method lacks a rule.
Generated from the op registry's activations x the bound methods."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certorch as ct
from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.relax import leaky_relu, relu, sshape
from tests.soundness.bound_checks import assert_within, pgd_points, sample_box, spec_values

RELAXATIONS = {
    "relu": relu,
    "leaky_relu_0.1": leaky_relu.make(0.1),
    "leaky_relu_0": leaky_relu.make(0.0),
    "sigmoid": sshape.sigmoid,
    "tanh": sshape.tanh,
}
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown", "zonotope", "symbolic", "dual"]
POOL_METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown", "dual"]  # max pooling has no parallel lines


pytestmark = pytest.mark.usefixtures("one_thread")


def _boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) pre-activation bounds: random mixed / one-sided boxes, saturated ones far out,
    boxes touching 0, tiny and zero-width boxes."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, generator=g, dtype=torch.float64) * 4
    b = a + torch.rand(400, generator=g, dtype=torch.float64) * 8
    special = torch.tensor([[-40.0, -25.0], [25.0, 40.0], [-40.0, 40.0], [-30.0, 0.5], [-0.5, 30.0], [0.0, 3.0],
                            [-3.0, 0.0], [0.0, 0.0], [1.5, 1.5], [-2.0, -2.0], [-1e-9, 1e-9], [2.0, 2.0 + 1e-12],
                            [-1e-3, 5.0], [-5.0, 1e-3]], dtype=torch.float64)
    return torch.cat([a, special[:, 0]]), torch.cat([b, special[:, 1]])


@pytest.mark.parametrize("name", list(RELAXATIONS))
def test_lines_bound_the_activation_at_dense_samples_of_every_box(name):
    rel = RELAXATIONS[name]
    l, u = _boxes()
    s_low, ds, b_up, b_low = rel.backward_lines(l, u, "adaptive")
    b_low = torch.zeros_like(l) if b_low is None else b_low
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    z = l + t * (u - l)  # (2001, n), both ends included
    f = rel.fn(z)
    low, up = s_low * z + b_low, (s_low + ds) * z + b_up
    tol = 1e-12 * (1 + f.abs())
    assert (low <= f + tol).all(), name
    assert (up >= f - tol).all(), name


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_s_shaped_lines_are_not_trivially_loose(name):
    """Each line touches the function somewhere on its box (chords at both ends, tangents at
    their point, anchored lines at the anchor): the relaxation is the one described, not a box."""
    rel = RELAXATIONS[name]
    l, u = _boxes()
    s_low, b_low, s_up, b_up = rel.lines(l, u)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    z = l + t * (u - l)
    f = rel.fn(z)
    gap_low = (f - (s_low * z + b_low)).min(0).values
    gap_up = ((s_up * z + b_up) - f).min(0).values
    assert (gap_low < 1e-6).all() and (gap_up < 1e-6).all()


def _net(act: str, kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    A = ACTIVATIONS[act]
    if kind == "dense":
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 20), A(), nn.Linear(20, 12), A(), nn.Linear(12, 4))
    else:
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), A(), nn.Conv2d(4, 4, 3, stride=2, padding=1), A(),
                            nn.Flatten(), nn.Linear(16, 4))
    net = net.double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # steep enough to reach saturation and many unstable neurons
    return net


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_bounds_contain_sampled_and_pgd_points(act, kind, method):
    net = _net(act, kind, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    eps = 0.1
    r = ct.bound(net, x, eps, method=method, y=y)
    C = ct.margin_matrix(y, 4).double()
    pts = torch.cat([sample_box(ct.linf_ball(x, eps), 600, torch.Generator().manual_seed(2)),
                     pgd_points(net, x, eps, C, steps=20)])
    assert_within(spec_values(net, pts, C), r.lower.detach(), r.upper.detach())


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "leaky_relu"])
def test_crown_is_tighter_than_ibp_on_every_activation(act):
    net = _net(act, "dense", 3)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    ibp = ct.bound(net, x, 0.05, method="ibp", y=y)
    crown = ct.bound(net, x, 0.05, method="crown", y=y)
    assert (crown.upper - crown.lower).mean() < (ibp.upper - ibp.lower).mean()


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_a_zero_width_box_gives_the_exact_output(act):
    net = _net(act, "dense", 4)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    r = ct.bound(net, x, 0.0, method="crown")
    with torch.no_grad():
        f = net(x)
    assert torch.allclose(r.lower, f, atol=1e-9) and torch.allclose(r.upper, f, atol=1e-9)


@pytest.mark.parametrize("method,kw", [("zonotope", {}), ("symbolic", {}), ("dual", {"projections": 5})])
def test_forward_methods_refuse_maxpool_in_one_line(method, kw):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 2), nn.ReLU(),
                        nn.Flatten()).double()  # the second ReLU's bounds need the region through the pool
    with pytest.raises(UnsupportedOperationError, match="maxpool"):
        ct.bound(net, torch.rand(2, 1, 8, 8, dtype=torch.float64), 0.1, method=method, **kw)


@pytest.mark.parametrize("name", list(RELAXATIONS))
def test_parallel_lines_bound_the_activation_at_dense_samples_of_every_box(name):
    rel = RELAXATIONS[name]
    l, u = _boxes()
    lam, b_low, b_up = rel.parallel_lines(l, u)
    assert (lam >= 0).all() and (b_low <= b_up).all()
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    z = l + t * (u - l)
    f = rel.fn(z)
    tol = 1e-12 * (1 + f.abs())
    assert (lam * z + b_low <= f + tol).all() and (lam * z + b_up >= f - tol).all()


def test_leaky_relu_with_a_slope_above_one_is_refused():
    net = nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(2.0), nn.Linear(3, 2)).double()
    with pytest.raises(CertorchError, match="negative slope"):
        ct.bound(net, torch.rand(1, 4, dtype=torch.float64), 0.1, method="crown")


# --- max pooling: a window op with its own backward rule ---------------------------------------

POOLS = [dict(kernel_size=2), dict(kernel_size=3, stride=1), dict(kernel_size=(2, 3), stride=(2, 1)),
         dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=1, padding=1)]
POOL_IDS = ["2x2", "3x3s1", "2x3", "3x3s2p1", "2x2s1p1"]


@pytest.mark.parametrize("pool", POOLS, ids=POOL_IDS)
def test_maxpool_backward_rule_lower_bounds_every_sampled_point(pool):
    from certorch.relax import maxpool

    rel = maxpool.make(**{"stride": None, **pool})
    g = torch.Generator().manual_seed(0)
    l = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    u = l + torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64) * torch.tensor([0.0, 0.3, 3.0]).view(1, 3, 1, 1).double()
    out_shape = rel.fn(l).shape[1:]
    A = torch.randn(2, 5, *out_shape, generator=g, dtype=torch.float64)
    A_in, const = rel.backward(A, l, u)
    r = torch.rand(3000, *l.shape, generator=g, dtype=torch.float64)
    r = torch.where(torch.arange(3000).view(-1, 1, 1, 1, 1) < 1500, (r > 0.5).double(), r)  # half corners
    x = l + r * (u - l)
    val = torch.einsum("bs...,nb...->nbs", A.flatten(2), rel.fn(x.flatten(0, 1)).view(3000, 2, -1))
    lin = torch.einsum("bsi,nbi->nbs", A_in.flatten(2), x.flatten(2)) + const
    assert (val >= lin - 1e-9).all()
    iv = rel.interval(ct.Box(l, u))
    fx = rel.fn(x.flatten(0, 1)).view(3000, *iv.lower.shape)
    assert (fx >= iv.lower - 1e-12).all() and (fx <= iv.upper + 1e-12).all()


@pytest.mark.parametrize("method", POOL_METHODS)
@pytest.mark.parametrize("pool", POOLS, ids=POOL_IDS)
def test_bounds_through_maxpool_contain_sampled_and_pgd_points(pool, method):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(**pool), nn.Conv2d(3, 2, 2), nn.ReLU(),
                         nn.Flatten()).double()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        n_out = body(x).shape[1]
    net = nn.Sequential(*body, nn.Linear(n_out, 4)).double().eval()
    y = torch.tensor([0, 1, 2])
    r = ct.bound(net, x, 0.1, method=method, y=y)
    C = ct.margin_matrix(y, 4).double()
    pts = torch.cat([sample_box(ct.linf_ball(x, 0.1), 600, torch.Generator().manual_seed(2)),
                     pgd_points(net, x, 0.1, C, steps=20)])
    assert_within(spec_values(net, pts, C), r.lower.detach(), r.upper.detach())


def test_maxpool_with_dilation_or_ceil_mode_is_refused_in_one_line():
    for pool in (nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(3, ceil_mode=True)):
        net = nn.Sequential(nn.Conv2d(1, 2, 3), pool, nn.Flatten()).double()
        with pytest.raises(UnsupportedOperationError, match="MaxPool2d"):
            ct.bound(net, torch.rand(1, 1, 8, 8, dtype=torch.float64), 0.1, method="ibp")


def test_alpha_crown_optimises_leaky_relu_slopes_and_is_never_looser_than_crown():
    net = _net("leaky_relu", "dense", 5)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    crown = ct.bound(net, x, 0.1, method="crown", y=y)
    alpha = ct.bound(net, x, 0.1, method="alpha-crown", y=y, alpha_iters=30)
    assert (alpha.lower >= crown.lower - 1e-9).all() and (alpha.upper <= crown.upper + 1e-9).all()
    assert (alpha.lower > crown.lower + 1e-6).any()  # the slopes in [a, 1] are free parameters
