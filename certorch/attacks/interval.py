"""Interval attack (MixTrain, Wang et al. 2018, Algorithm 1).

Gradient attacks follow the slope of the loss at one point and stall in local maxima. The
interval attack follows the *interval gradient*: the gradient, w.r.t. the center of a small box
around the current point, of a sound upper bound of the loss over that box (from symbolic
interval analysis, ``ct.bound(method="symbolic")``). Per step and per example:

1. grow the box radius ``delta`` (from ``delta0``, times ``growth``) until the symbolic bound
   shows a possible violation (some margin lower bound < 0), at most up to ``eps``;
2. move ``x`` by ``step_size * sign(interval gradient)`` and clip into the threat set;
3. stop moving examples that are already misclassified.

Finally a PGD run started at the reached points (not at random) locates a concrete violation
(Algorithm 1, line 12). The returned point is the better (lower-margin) of the interval-phase
and PGD results.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.attacks.base import Attack, Model, project, worst_margin
from certorch.attacks.pgd_attack import PGD, _check_int, _check_positive, _check_seed
from certorch.attacks.registry import register_attack
from certorch.bounds.api import bound
from certorch.domains.box import Box
from certorch.errors import CertorchError

__all__ = ["IntervalAttack", "interval_gradient", "symbolic_loss_bound"]

INTERVAL_LOSSES = ("ce", "margin")


def symbolic_loss_bound(model: nn.Module, center: Tensor, radius: Tensor, box: Box, y: Tensor, loss: str = "ce") -> tuple[Tensor, Tensor]:
    """Upper bound of the loss over ``[center - radius, center + radius] ∩ box`` (symbolic intervals).

    ``center``: (B, *in); ``radius``: (B,) or broadcastable to ``center``; ``y``: (B,).
    Returns ``(loss_ub (B,), margin_lb (B, K-1))``. ``ce``: cross-entropy of the worst-case
    logits ``-margin_lb`` (an upper bound of the CE loss); ``margin``: ``-min_j margin_lb_j``.
    Differentiable w.r.t. ``center``.
    """
    r = radius.view(-1, *([1] * (center.dim() - 1))) if radius.dim() == 1 else radius
    sub = Box(torch.maximum(center - r, box.lower), torch.minimum(center + r, box.upper))
    m_lb = bound(model, center, method="symbolic", y=y, box=sub).lower
    if loss == "margin":
        return -m_lb.min(dim=1).values, m_lb
    z = torch.cat([torch.zeros_like(m_lb[:, :1]), -m_lb], dim=1)  # worst logits, true class at 0
    return F.cross_entropy(z, torch.zeros_like(y), reduction="none"), m_lb


def interval_gradient(model: nn.Module, x: Tensor, radius: Tensor, box: Box, y: Tensor, loss: str = "ce") -> Tensor:
    """(B, *in) gradient w.r.t. the box center ``x`` of :func:`symbolic_loss_bound` (NaN -> 0)."""
    c = x.detach().requires_grad_(True)
    ub, _ = symbolic_loss_bound(model, c, radius, box, y, loss)
    (g,) = torch.autograd.grad(ub.sum(), c)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


@register_attack("interval")
class IntervalAttack(Attack):
    """MixTrain's interval attack; keyword-only hyperparameters:

        steps: interval-gradient steps (>= 0; ``steps + pgd_steps >= 1``, else nothing attacks).
        step_size: absolute step; ``rel_step_size`` (default 0.25): fraction of eps.
        delta0: initial box radius as a fraction of eps (default 0.01).
        growth: factor by which the radius grows while the bound shows no violation (> 1).
        loss: ``"ce"`` (upper bound of the cross-entropy) or ``"margin"`` (negated margin bound).
        pgd_steps / pgd_restarts: final PGD run from the reached points (``pgd_steps=0``: none).
        seed: seed of the PGD restarts beyond the first (which starts at the reached point).

    Needs an ``nn.Module`` the bound engine supports. Cost per step: up to
    ``ceil(log(1/delta0)/log(growth)) + 1`` symbolic bounds and one bound + backward.
    """

    def __init__(
        self,
        *,
        steps: int = 20,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        delta0: float = 0.01,
        growth: float = 2.0,
        loss: str = "ce",
        pgd_steps: int = 20,
        pgd_restarts: int = 1,
        seed: int | None = None,
    ):
        self.steps = _check_int("steps", steps, 0)
        self.step_size = _check_positive("step_size", step_size)
        self.rel_step_size = _check_positive("rel_step_size", rel_step_size)
        if step_size is not None and rel_step_size is not None:
            raise CertorchError("give at most one of step_size and rel_step_size")
        if self.step_size is None and self.rel_step_size is None:
            self.rel_step_size = 0.25
        self.delta0 = _check_positive("delta0", delta0)
        if self.delta0 > 1:
            raise CertorchError(f"delta0 is a fraction of eps and must be <= 1, got {delta0}")
        self.growth = _check_positive("growth", growth)
        if self.growth <= 1:
            raise CertorchError(f"growth must be > 1, got {growth}")
        if loss not in INTERVAL_LOSSES:
            raise CertorchError(f"unknown interval-attack loss {loss!r}; valid: {', '.join(INTERVAL_LOSSES)}")
        self.loss = loss
        self.pgd_steps = _check_int("pgd_steps", pgd_steps, 0)
        self.pgd_restarts = _check_int("pgd_restarts", pgd_restarts, 1)
        if self.steps + self.pgd_steps < 1:
            raise CertorchError("steps and pgd_steps are both 0: the interval attack would not move (give steps >= 1)")
        self.seed = _check_seed(seed)

    def _radius(self, model: nn.Module, x: Tensor, y: Tensor, box: Box, eps_b: Tensor) -> Tensor:
        """(B,) smallest ``delta0 * eps * growth^k`` whose box may contain a violation (capped at eps)."""
        delta = self.delta0 * eps_b
        searching = torch.ones_like(delta, dtype=torch.bool)
        rounds = math.ceil(math.log(1.0 / self.delta0) / math.log(self.growth)) + 1
        with torch.no_grad():
            for _ in range(rounds):
                _, m_lb = symbolic_loss_bound(model, x, delta, box, y, self.loss)
                searching &= (m_lb >= 0).all(dim=1) & (delta < eps_b)
                if not bool(searching.any()):
                    break
                delta = torch.where(searching, torch.minimum(delta * self.growth, eps_b), delta)
        return delta

    def run(self, model: Model, x: Tensor, y: Tensor, box: Box, eps: float | Tensor) -> Tensor:
        if not isinstance(model, nn.Module):
            raise CertorchError("the interval attack needs an nn.Module (it bounds the model symbolically)")
        B = x.shape[0]
        shape = (-1, *([1] * (x.dim() - 1)))
        eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        eps_b = torch.broadcast_to(eps_t, x.shape).reshape(B, -1).amax(dim=1)  # (B,) radius per example
        alpha = self.step_size if self.step_size is not None else self.rel_step_size * eps_t
        x_t = x.clone()
        with torch.no_grad():
            done = model(x_t).argmax(dim=1) != y
        for _ in range(self.steps):
            if bool(done.all()):
                break
            delta = self._radius(model, x_t, y, box, eps_b)
            g = interval_gradient(model, x_t, delta, box, y, self.loss)
            x_new = project(x_t + alpha * g.sign(), box)
            x_t = torch.where(done.view(shape), x_t, x_new)
            with torch.no_grad():
                done |= model(x_t).argmax(dim=1) != y
        if self.pgd_steps == 0 or bool(done.all()):
            return x_t
        pgd = PGD(steps=self.pgd_steps, restarts=1, random_start=False, loss="margin" if self.loss == "margin" else "ce")
        best = pgd.run(model, x_t, y, box, eps)
        with torch.no_grad():
            best_m = worst_margin(model(best), y)
            cur_m = worst_margin(model(x_t), y)
        if self.pgd_restarts > 1:
            rnd = PGD(steps=self.pgd_steps, restarts=self.pgd_restarts - 1, seed=self.seed)
            other = rnd.run(model, x, y, box, eps)
            with torch.no_grad():
                other_m = worst_margin(model(other), y)
            better = other_m < best_m
            best, best_m = torch.where(better.view(shape), other, best), torch.where(better, other_m, best_m)
        keep = done | (cur_m <= best_m)
        return torch.where(keep.view(shape), x_t, best)
