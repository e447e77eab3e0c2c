"""Symbolic intervals keep one coefficient tensor for both forms; the result equals the general path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import certorch.bounds as bounds
from certorch.domains.symbolic import AffineForm, SymbolicInterval


class _Residual(nn.Module):
    """conv -> act -> conv (+ skip) -> act -> linear: an add node with two symbolic inputs."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act1, self.act2 = act(), act()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = self.act1(self.c1(x))
        h = self.act2(self.c2(h) + h)
        return self.fc(h.flatten(1))


_from_box = SymbolicInterval.from_box


def _unshared_from_box(box):
    """The input forms with two distinct (equal) coefficient tensors: the general two-map path."""
    s = _from_box(box)
    return SymbolicInterval(s.low, AffineForm(s.up.const, s.up.coef.clone()))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Tanh])
def test_shared_coefficients_give_the_bounds_and_gradients_of_the_general_path(act, monkeypatch):
    torch.manual_seed(0)
    model = _Residual(act).double()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    results = []
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(SymbolicInterval, "from_box", staticmethod(_unshared_from_box))
        model.zero_grad()
        b = bounds.bound(model, x, 0.05, method="symbolic", y=y)
        (b.lower.sum() - b.upper.sum()).backward()
        results.append((b.lower.detach(), b.upper.detach(), [p.grad.clone() for p in model.parameters()]))
    (lo1, up1, g1), (lo2, up2, g2) = results
    assert torch.allclose(lo1, lo2, rtol=0, atol=1e-12) and torch.allclose(up1, up2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_forms_from_a_box_share_one_coefficient_tensor_to_the_output(monkeypatch):
    seen = []
    linear_bounds = SymbolicInterval.linear_bounds

    def spy(self, A, bias=None):
        seen.append((self.shared, self.terms()))
        return linear_bounds(self, A, bias)

    monkeypatch.setattr(SymbolicInterval, "linear_bounds", spy)
    torch.manual_seed(1)
    model = _Residual(nn.ReLU).double()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    bounds.bound(model, x, 0.05, method="symbolic", y=torch.tensor([1, 2]))
    assert seen == [(True, 36)]  # 6 x 6 input pixels, stored once for both forms
