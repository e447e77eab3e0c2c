"""The triangle LP bound (``method="triangle"``): equal to a direct LP solve, never looser than
CROWN, sound under sampling and PGD, its gradient that of the LP optimum, trainable, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import certorch as ct
import certorch.bounds as bounds
from certorch.errors import CertorchError, UnsupportedOperationError
from certorch.graph.capture import capture
from certorch.verify.encode import encode
from certorch.verify.solve import minimize_region
from tests.soundness.bound_checks import assert_within, pgd_points, sample_box, spec_values
from tests.soundness.test_bounds_hypothesis import _conv, _dense


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = _dense([16, 12, 10, 4]) if kind == "dense" else _conv(3)
    return net.double().eval()


def _inputs(seed: int, B: int = 3, kind: str = "dense") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = 4 if kind == "dense" else 8
    return torch.rand(B, 1, side, side, generator=g, dtype=torch.float64), torch.arange(B) % 4


def _direct_lp(net, x, y, eps) -> np.ndarray:
    """(B, S) minima of the margins by HiGHS on the verifier's triangle encoding (hidden boxes kept),
    with CROWN's intermediate bounds, read from the LP's weak-duality bound."""
    crown = ct.bound(net, x, eps, method="crown", y=y, upper=False, return_intermediate=True)
    graph = capture(net, tuple(x.shape[1:]))
    C = ct.margin_matrix(y, 4).double()
    box = ct.linf_ball(x, eps)
    out = np.zeros(C.shape[:2])
    for i in range(x.shape[0]):
        nb = {}
        for a in graph.activation_nodes():
            b = crown.intermediate[graph.nodes[a.inputs[0]].name]
            nb[a.inputs[0]] = (b.lower[i].detach().flatten().numpy(), b.upper[i].detach().flatten().numpy())
        enc = encode(graph, box.lower[i].flatten().numpy(), box.upper[i].flatten().numpy(), nb, None)
        for s in range(C.shape[1]):
            res = minimize_region(enc, enc.var_of[graph.output], C[i, s : s + 1].numpy(), np.zeros(1), integer=False)
            assert res.solver_status == "optimal"
            out[i, s] = res.lower
    return out


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triangle_equals_a_direct_lp_solve(kind, seed):
    net, (x, y) = _net(kind, seed), _inputs(seed, kind=kind)
    tri = ct.bound(net, x, 0.1, method="triangle", y=y, upper=False).lower.detach().numpy()
    np.testing.assert_allclose(tri, _direct_lp(net, x, y, 0.1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_triangle_is_never_looser_than_crown_and_strictly_tighter_somewhere(kind):
    tighter = False
    for seed in range(3):
        net, (x, y) = _net(kind, seed), _inputs(seed, kind=kind)
        res = bounds.bound_many(net, x, 0.1, ("crown", "triangle"), y=y)
        cr, tr = res["crown"], res["triangle"]
        assert (tr.lower >= cr.lower - 1e-9).all() and (tr.upper <= cr.upper + 1e-9).all()
        tighter |= bool((tr.lower > cr.lower + 1e-6).any())
    assert tighter


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_triangle_is_sound_under_sampling_and_pgd(kind):
    net, (x, y) = _net(kind, 3), _inputs(3, B=4, kind=kind)
    eps = 0.15
    r = ct.bound(net, x, eps, method="triangle", y=y)
    C = ct.margin_matrix(y, 4).double()
    pts = torch.cat([sample_box(ct.linf_ball(x, eps), 400, torch.Generator().manual_seed(0)),
                     pgd_points(net, x, eps, C)])
    assert_within(spec_values(net, pts, C), r.lower.detach(), r.upper.detach())


def test_triangle_gradient_equals_finite_differences_of_the_lp_optimum():
    net, (x, y) = _net("conv", 1), _inputs(1, B=2, kind="conv")
    eps = 0.1

    def value() -> torch.Tensor:
        return ct.bound(net, x, eps, method="triangle", y=y, upper=False).lower.sum()

    net.zero_grad()
    value().backward()
    h = 1e-6
    for p in (net[0].weight, net[-1].weight):  # through the intermediate bounds, and the last layer
        grad = p.grad.clone()
        for idx in [tuple(0 for _ in p.shape), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += h
                up = value().item()
                p[idx] -= 2 * h
                down = value().item()
                p[idx] += h
            assert abs(grad[idx].item() - (up - down) / (2 * h)) < 1e-6


def test_certified_training_on_the_triangle_bound_lowers_its_loss():
    from certorch.train.objectives import build_objective
    from certorch.train.objectives.base import TrainState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    x = (0.25 + 0.5 * y[:, None].float() + 0.05 * torch.randn(16, 4, generator=g)).clamp(0, 1)
    obj = build_objective("certified", {"bound": "triangle"})
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for step in range(20):
        out = obj(model, x, y, 0.05, TrainState(step=step, values={"kappa": 0.5, "beta": 0.5}))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_triangle_is_listed_with_the_bound_methods():
    assert "triangle" in bounds.list_methods()
    assert bounds.get_method("Triangle").intermediate == "crown"


def test_triangle_refuses_other_activations_and_train_mode_batchnorm():
    x = torch.rand(2, 4, dtype=torch.float64)
    tanh = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with pytest.raises((UnsupportedOperationError, CertorchError)):
        ct.bound(tanh, x, 0.1, method="triangle")
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).double().train()
    with pytest.raises(CertorchError, match="BatchNorm"):
        ct.bound(bn, x, 0.1, method="triangle")
