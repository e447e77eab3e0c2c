"""certorch's exact ``dual`` bounds equal convex_adversarial 0.4.4's DualNetwork (float64, 1e-4)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certorch as ct
from certorch.models import build
from tests.reference.peers import convex_adversarial


def _dual_objective(seq, x, eps, C, **kw):
    ca = convex_adversarial()
    with torch.no_grad():
        return ca.DualNetwork(seq, x, eps, bounded_input=True, **kw)(C)


@pytest.mark.parametrize("name,dataset,shape,eps", [("mnist_small", "mnist", (1, 28, 28), 0.02),
                                                    ("cifar_small", "cifar10", (3, 32, 32), 2 / 255)])
def test_exact_dual_equals_convex_adversarial(name, dataset, shape, eps):
    convex_adversarial()
    torch.manual_seed(0)
    model = build(name, dataset=dataset, normalize=False).eval().double()
    x = torch.rand(2, *shape, dtype=torch.float64)
    y = torch.tensor([1, 8])
    C = ct.margin_matrix(y, 10).double()
    expected = _dual_objective(model, x, eps, C)
    with torch.no_grad():
        ours = ct.bound(model, x, eps, method="dual", y=y)
    assert torch.allclose(ours.lower, expected, atol=1e-4, rtol=0), (ours.lower - expected).abs().max()


def _to_dense_sequential(resnet: nn.Sequential):
    """Rewrite certorch's cifar_resnet as convex_adversarial's DenseSequential (same weights)."""
    ca = convex_adversarial()
    from convex_adversarial.utils import Dense, DenseSequential

    layers = []
    for mod in resnet:
        if hasattr(mod, "conv_skip"):  # ResBlock: h = relu(a(x)); out = relu(skip(x) + b(h))
            layers += [Dense(mod.conv_a), nn.ReLU(), Dense(mod.conv_skip, None, mod.conv_b), nn.ReLU()]
        else:
            layers.append(mod)
    del ca
    return DenseSequential(*layers)


def test_exact_dual_equals_convex_adversarial_on_resnet():
    convex_adversarial()
    torch.manual_seed(0)
    # A narrower stand-in for the exact dual's memory on 2 cores: same block structure, 8x8 input.
    from certorch.models.wong import ResBlock

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), ResBlock(4, 4), ResBlock(4, 8, downsample=True),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 10),
    ).double().eval()
    dense = _to_dense_sequential(model)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(dense(x), model(x))
    y = torch.tensor([2, 5])
    C = ct.margin_matrix(y, 10).double()
    expected = _dual_objective(dense, x, 0.01, C)
    with torch.no_grad():
        ours = ct.bound(model, x, 0.01, method="dual", y=y)
    assert torch.allclose(ours.lower, expected, atol=1e-4, rtol=0), (ours.lower - expected).abs().max()


def test_projected_dual_estimates_track_convex_adversarial():
    """With Cauchy projections both libraries give random estimates of the same exact bound:
    check both land near the exact value (median estimates are unbiased in the median)."""
    convex_adversarial()
    torch.manual_seed(0)
    model = build("mnist_small", dataset="mnist", normalize=False).eval().double()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    C = ct.margin_matrix(y, 10).double()
    exact = ct.bound(model, x, 0.02, method="dual", y=y).lower
    ours = ct.bound(model, x, 0.02, method="dual", y=y, projections=200, generator=torch.Generator().manual_seed(0)).lower
    peer = _dual_objective(model, x, 0.02, C, proj=200, norm_type="l1_median")
    scale = exact.abs().mean()
    assert (ours - exact).abs().mean() / scale < 0.25
    assert (peer - exact).abs().mean() / scale < 0.25
