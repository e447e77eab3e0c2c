"""certorch IBP / CROWN / CROWN-IBP bounds equal auto_LiRPA 0.3's (float64, 1e-4 absolute).

Zoo nets with random weights are built with ``normalize=False``: auto_LiRPA 0.3 cannot bound
our Normalize layer's 3-d buffers (that is a limitation of the peer, not of the net).
"""
from __future__ import annotations

import pytest
import torch

import certorch as ct
from certorch.models import build
from tests.reference.peers import auto_lirpa

CASES = [
    ("mnist_small", "mnist", (1, 28, 28), 0.02),
    ("mnist_fc1", "mnist", (1, 28, 28), 0.01),
    ("cifar_small", "cifar10", (3, 32, 32), 2 / 255),
    ("dm_small", "cifar10", (3, 32, 32), 2 / 255),
    ("colt_mnist", "mnist", (1, 28, 28), 0.01),
]
METHODS = [("IBP", "ibp"), ("CROWN", "crown"), ("CROWN-IBP", "crown-ibp")]
SLOW = {("dm_small", "crown"), ("colt_mnist", "crown")}  # > 15 s each on 2 cores (auto_LiRPA's side)
PARAMS = [
    pytest.param(*case, *meth, id=f"{meth[1]}-{case[0]}", marks=[pytest.mark.slow] if (case[0], meth[1]) in SLOW else [])
    for meth in METHODS
    for case in CASES
]


def _lirpa_bounds(model, x, eps, C, method):
    lirpa = auto_lirpa()
    bm = lirpa.BoundedModule(model, torch.zeros(1, *x.shape[1:], dtype=x.dtype))
    ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    lb, ub = bm.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), method=method, C=C)
    return lb.detach(), ub.detach()


@pytest.mark.parametrize("name,dataset,shape,eps,peer_method,method", PARAMS)
def test_bounds_equal_auto_lirpa(name, dataset, shape, eps, peer_method, method):
    auto_lirpa()
    torch.manual_seed(0)
    model = build(name, dataset=dataset, normalize=False).eval().double()
    x = torch.rand(3, *shape, dtype=torch.float64)
    y = torch.tensor([0, 3, 7])
    C = ct.margin_matrix(y, 10).double()
    lb, ub = _lirpa_bounds(model, x, eps, C, peer_method)
    with torch.no_grad():
        ours = ct.bound(model, x, eps, method=method, y=y)
    assert torch.allclose(ours.lower, lb, atol=1e-4, rtol=0), (ours.lower - lb).abs().max()
    assert torch.allclose(ours.upper, ub, atol=1e-4, rtol=0), (ours.upper - ub).abs().max()


def test_crown_matches_on_a_trained_net():
    """On a trained net most neurons are stable and CROWN is much tighter than IBP; still equal."""
    auto_lirpa()
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    ).double()
    X = torch.rand(256, 1, 4, 4, dtype=torch.float64)
    Y = (X.flatten(1)[:, :8].sum(1) > X.flatten(1)[:, 8:].sum(1)).long() + (X[:, 0, 0, 0] > 0.8).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    x, y = X[:8], Y[:8]
    C = ct.margin_matrix(y, 3).double()
    lb, ub = _lirpa_bounds(model, x, 0.05, C, "CROWN")
    ours = ct.bound(model, x, 0.05, method="crown", y=y)
    assert torch.allclose(ours.lower, lb, atol=1e-4, rtol=0)
    assert torch.allclose(ours.upper, ub, atol=1e-4, rtol=0)
