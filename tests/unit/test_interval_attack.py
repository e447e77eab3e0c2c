"""Interval attack (MixTrain Alg. 1): registry, threat-set invariant, strength vs PGD, validation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certorch.attacks import PGD, IntervalAttack, build_attack, list_attacks
from certorch.attacks.interval import interval_gradient, symbolic_loss_bound
from certorch.domains.box import Box
from certorch.errors import CertorchError


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 10-class blobs in [0, 1]^32 (shared centres)."""
    centres = torch.rand(10, 32, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return (centres[y] + 0.15 * torch.randn(n, 32, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained (full batch, Adam) on blobs, plus held-out data."""
    x, y = _data(512, 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = _data(100, 2)
    return net.eval(), xt, yt


def test_registered_and_buildable():
    assert "interval" in list_attacks()
    atk = build_attack("interval", steps=3, pgd_steps=2)
    assert isinstance(atk, IntervalAttack) and atk.name == "interval"


def test_never_leaves_the_eps_ball(trained):
    net, x, y = trained
    eps = 0.07
    res = IntervalAttack(steps=4, pgd_steps=4, pgd_restarts=2, seed=0)(net, x[:40], y[:40], eps)
    assert float((res.x_adv - x[:40]).abs().max()) <= eps + 1e-6
    assert bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())


def test_per_example_eps_respected(trained):
    net, x, y = trained
    eps = torch.linspace(0.0, 0.1, 20)
    res = IntervalAttack(steps=3, pgd_steps=3)(net, x[:20], y[:20], eps)
    dist = (res.x_adv - x[:20]).flatten(1).abs().amax(dim=1)
    assert bool((dist <= eps + 1e-6).all())


def test_at_least_as_strong_as_pgd(trained):
    """Same final PGD budget; the interval phase adds successes on this net (82 vs 76 of 100)."""
    net, x, y = trained
    pgd = PGD(steps=20, seed=0)(net, x, y, 0.15)
    itv = IntervalAttack(steps=5, pgd_steps=20, seed=0)(net, x, y, 0.15)
    assert int(itv.success.sum()) >= int(pgd.success.sum())


def test_success_recomputed_by_forward_pass(trained):
    net, x, y = trained
    res = IntervalAttack(steps=5, pgd_steps=5)(net, x[:30], y[:30], 0.08)
    with torch.no_grad():
        pred = net(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y[:30])


def test_loss_bound_is_an_upper_bound_and_gradient_shape(trained):
    net, x, y = trained
    x, y = x[:8], y[:8]
    box = Box((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1))
    ub, m_lb = symbolic_loss_bound(net, x, torch.full((8,), 0.02), box, y, "margin")
    pts = (x.unsqueeze(1) + 0.02 * (2 * torch.rand(8, 64, 32) - 1)).clamp(0, 1).flatten(0, 1)
    with torch.no_grad():
        logits = net(pts).view(8, 64, 10)
    true = logits.gather(2, y.view(8, 1, 1).expand(8, 64, 1))
    worst = (logits - true).max(dim=2).values.max(dim=1).values  # max_j logit_j - logit_y (j = y gives 0)
    assert bool((worst <= ub.clamp(min=0) + 1e-5).all())
    g = interval_gradient(net, x, torch.full((8,), 0.02), box, y)
    assert g.shape == x.shape and bool(torch.isfinite(g).all())


def test_rejects_non_module_and_bad_hyperparameters(trained):
    net, x, y = trained
    with pytest.raises(CertorchError, match="nn.Module"):
        IntervalAttack(steps=1)(lambda t: net(t), x[:2], y[:2], 0.1)
    with pytest.raises(CertorchError, match="growth"):
        IntervalAttack(growth=1.0)
    with pytest.raises(CertorchError, match="delta0"):
        IntervalAttack(delta0=2.0)
    with pytest.raises(CertorchError, match="loss"):
        IntervalAttack(loss="hinge")
    with pytest.raises(CertorchError, match="at most one"):
        IntervalAttack(step_size=0.1, rel_step_size=0.1)
