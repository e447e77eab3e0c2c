"""Latent attack (COLT): points stay in the zonotope region, sub-network evaluation, re-checks, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certorch as ct
from certorch.attacks import PGD, forward_from, latent_attack
from certorch.attacks.latent import latent_region
from certorch.errors import CertorchError
from certorch.graph import capture


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _data(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


def _layer(net, kind: str, k: int = 0) -> str:
    g = capture(net, (3, 4))
    return [n.name for n in g.nodes if n.op.kind == kind][k]


def test_shapes_and_coefficients_in_unit_box():
    net, (x, y) = _net(), _data()
    layer = _layer(net, "relu", 0)
    res = latent_attack(net, x, y, 0.05, layer, steps=10, seed=0)
    a, A = latent_region(net, x, 0.05, layer)
    assert res.latent.shape == (16, 16) and res.coefficients.shape == (16, A.shape[1])
    assert float(res.coefficients.abs().max()) <= 1.0
    assert torch.allclose(res.latent, a + torch.einsum("bm,bmi->bi", res.coefficients, A), atol=1e-6)
    assert res.logits.dtype == torch.float64 and res.layer == layer


def test_latent_points_inside_the_zonotope_bounds():
    net, (x, y) = _net(), _data()
    layer = _layer(net, "relu", 1)
    res = latent_attack(net, x, y, 0.1, layer, steps=15, seed=0)
    box = ct.bound(net, x, 0.1, method="zonotope", return_intermediate=True).regions[layer].box()
    assert bool(((res.latent >= box.lower - 1e-5) & (res.latent <= box.upper + 1e-5)).all())


def test_forward_from_matches_the_model():
    net, (x, _) = _net(), _data()
    g = capture(net, (3, 4))
    layer = _layer(net, "linear", 1)
    values = g.forward(x)
    idx = g.node(layer).index
    assert torch.allclose(forward_from(g, layer, values[idx]), net(x), atol=1e-6)


def test_success_rechecked_in_float64_and_margin_consistent():
    net, (x, y) = _net(2), _data(32, 3)
    res = latent_attack(net, x, y, 0.1, _layer(net, "relu", 0), steps=20, seed=0)
    g = capture(net, (3, 4))
    with torch.no_grad():
        logits = forward_from(g, res.layer, res.latent.double())
    assert torch.allclose(logits, res.logits)
    assert torch.equal(res.success, res.margin < 0)


def test_first_affine_layer_matches_input_space_attack():
    """The zonotope of an affine layer (before any ReLU) is the exact image of the input box,
    so every input-space PGD success is reachable: the latent attack finds at least as many."""
    net, (x, y) = _net(4), _data(64, 5)
    eps = 0.15
    pgd = PGD(steps=20, restarts=2, seed=0)(net, x, y, eps)
    lat = latent_attack(net, x, y, eps, _layer(net, "linear", 0), steps=40, restarts=2, seed=0)
    assert int(lat.success.sum()) >= int(pgd.success.sum()) - 1


def test_deeper_layers_find_more_violations():
    net, (x, y) = _net(4), _data(64, 5)
    eps = 0.15
    first = latent_attack(net, x, y, eps, _layer(net, "relu", 0), steps=30, seed=0)
    clean_wrong = net(x).argmax(1) != y
    assert bool((first.success | ~clean_wrong).all())  # misclassified clean points stay violations
    assert first.latent_robust_accuracy <= float((~clean_wrong).float().mean())


def test_parameters_untouched_and_no_grad_written():
    net, (x, y) = _net(), _data()
    before = [p.detach().clone() for p in net.parameters()]
    latent_attack(net, x, y, 0.05, _layer(net, "relu", 0), steps=5, seed=0)
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_deterministic_with_seed():
    net, (x, y) = _net(), _data()
    layer = _layer(net, "relu", 0)
    a = latent_attack(net, x, y, 0.05, layer, steps=5, seed=7)
    b = latent_attack(net, x, y, 0.05, layer, steps=5, seed=7)
    assert torch.equal(a.latent, b.latent)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat, self.a, self.relu, self.b, self.head = nn.Flatten(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.Linear(12, 2)

    def forward(self, x):
        h = self.flat(x)
        return self.head(self.b(self.relu(self.a(h))) + h)


def test_non_cut_layer_and_output_layer_rejected():
    x, _ = _data(4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(CertorchError, match="not a cut"):
        latent_attack(_Residual().eval(), x, y, 0.05, "relu", steps=2)
    net = _net()
    with pytest.raises(CertorchError, match="output"):
        latent_attack(net, x, y, 0.05, _layer(net, "linear", 2), steps=2)
    with pytest.raises(KeyError):
        latent_attack(net, x, y, 0.05, "no_such_layer", steps=2)


def test_bad_arguments():
    net, (x, y) = _net(), _data(4)
    layer = _layer(net, "relu", 0)
    with pytest.raises(CertorchError, match="steps"):
        latent_attack(net, x, y, 0.05, layer, steps=-1)
    with pytest.raises(CertorchError, match="labels"):
        latent_attack(net, x, y.float(), 0.05, layer)
    with pytest.raises(CertorchError, match="loss"):
        latent_attack(net, x, y, 0.05, layer, loss="hinge")
