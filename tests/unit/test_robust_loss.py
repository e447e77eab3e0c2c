"""Loss fusion (issue 11, Performance): the fused robust cross-entropy is an upper bound of the
loss at every point of the ball, whatever the bound method of its single spec row."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certorch as ct
from certorch.train.robust_loss import exp_chord, fused_cross_entropy_bound, robust_cross_entropy
from tests.soundness.bound_checks import sample_box


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 10)).double().eval()


def _data(seed: int = 1, batch: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 10, (batch,), generator=g)


def _worst_ce_by_pgd(model, x, y, eps, steps=40):
    """Per-example CE at PGD points maximising the loss inside the ball (B,)."""
    box = ct.linf_ball(x, eps)
    z = box.center.clone()
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)
        z = torch.minimum(torch.maximum(z + 2.5 * eps / steps * g.sign(), box.lower), box.upper)
    with torch.no_grad():
        return F.cross_entropy(model(z), y, reduction="none")


@pytest.mark.parametrize("method", ["crown-ibp", "crown", "ibp", "zonotope"])
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_fused_bound_is_above_the_loss_at_sampled_and_pgd_points(method, eps):
    model, (x, y) = _net(), _data()
    with torch.no_grad():
        bound, _ = fused_cross_entropy_bound(model, x, y, eps, method)
    pts = sample_box(ct.linf_ball(x, eps), 2000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ce = F.cross_entropy(model(pts.flatten(0, 1)), y.repeat(pts.shape[0]), reduction="none").view(pts.shape[0], -1)
    assert (ce <= bound + 1e-9).all(), float((ce - bound).max())
    assert (_worst_ce_by_pgd(model, x, y, eps) <= bound + 1e-9).all()


def test_fused_with_ibp_equals_the_margin_robust_loss_with_ibp():
    model, (x, y) = _net(), _data()
    lower = ct.bound(model, x, 0.1, method="ibp", y=y).lower
    margin = torch.stack([robust_cross_entropy(lower[i:i + 1], y[i:i + 1]) for i in range(len(y))])
    fused, _ = fused_cross_entropy_bound(model, x, y, 0.1, "ibp")
    assert torch.allclose(fused, margin, atol=1e-12)


def test_fused_crown_ibp_is_never_looser_than_ibp():
    model, (x, y) = _net(3), _data(4)
    ibp, _ = fused_cross_entropy_bound(model, x, y, 0.05, "ibp")
    fused, _ = fused_cross_entropy_bound(model, x, y, 0.05, "crown-ibp")
    assert (fused <= ibp + 1e-12).all()


def test_exp_chord_lies_above_exp_and_is_stable_on_a_point():
    lo = torch.tensor([-30.0, -2.0, -1e-3, -5.0, -1000.0], dtype=torch.float64)
    hi = torch.tensor([0.0, -1.0, 0.0, -5.0, 0.0], dtype=torch.float64)
    a, b = exp_chord(lo, hi)
    t = lo + (hi - lo) * torch.linspace(0, 1, 101, dtype=torch.float64).unsqueeze(1)
    assert (torch.exp(t) <= a * t + b + 1e-12).all()
    assert torch.isfinite(a).all() and torch.isclose(a[3], torch.exp(torch.tensor(-5.0, dtype=torch.float64)))


def test_an_untrained_conv_net_at_a_large_eps_gives_a_finite_bound():
    from certorch.models import build

    torch.manual_seed(0)
    model = build("mnist_small", dataset="mnist")
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss, _ = fused_cross_entropy_bound(model, x, y, 0.1, "crown-ibp")
    assert torch.isfinite(loss).all()


def test_huge_logit_gaps_do_not_overflow_and_gradients_are_finite():
    model, (x, y) = _net(), _data()
    with torch.no_grad():
        model[-1].weight.mul_(200.0)
    loss, _ = fused_cross_entropy_bound(model, x, y, 0.3, "crown-ibp")
    assert torch.isfinite(loss).all() and (loss > 10).all()
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_crown_ibp_objective_fuses_by_default_and_its_robust_loss_bounds_the_worst_ce(beta):
    from certorch.train.objectives import TrainState, build_objective

    obj = build_objective("crown_ibp", {})
    assert obj.params.fusion and not build_objective("crown_ibp", {"fusion": False}).params.fusion
    model, (x, y) = _net(), _data()
    out = obj(model, x, y, 0.1, TrainState(step=0, values={"kappa": 0.0, "beta": beta}))
    assert float(out.loss.detach()) >= float(_worst_ce_by_pgd(model, x, y, 0.1).mean()) - 1e-9
