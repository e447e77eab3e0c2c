"""Projected gradient descent (Madry et al.) in L-inf, with restarts and step-size schedules.

The module is named ``pgd_attack`` (not ``pgd``) so that the functional shortcut
``certorch.attacks.pgd(...)`` never collides with a submodule attribute of the package.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from certorch.attacks.base import Attack, AttackResult, Model, project, worst_margin
from certorch.attacks.registry import register_attack
from certorch.domains.box import Box
from certorch.errors import CertorchError

__all__ = ["PGD", "pgd", "LOSSES", "SCHEDULES", "attack_loss", "step_factor", "input_gradient", "uniform_in_box"]

LOSSES = ("ce", "margin")
SCHEDULES = ("constant", "cosine", "step")


def attack_loss(logits: Tensor, y: Tensor, loss: str, kappa: float = math.inf) -> Tensor:
    """Per-example loss to MAXIMIZE, shape (B,), from (B, K) ``logits`` and (B,) ``y``.

    ``"ce"``: cross-entropy. ``"margin"``: ``-min_{j != y}(logit[y] - logit[j])`` (CW loss),
    clamped at ``kappa`` (no clamp by default: keeps pushing past the decision boundary).
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    neg_margin = -worst_margin(logits, y)
    return neg_margin.clamp(max=kappa) if math.isfinite(kappa) else neg_margin


def step_factor(schedule: str, t: int, steps: int) -> float:
    """Multiplier of the base step size at step ``t`` in ``[0, steps)``.

    ``constant``: 1. ``cosine``: ``(1 + cos(pi t / steps)) / 2``. ``step``: x0.1 after 50 % and
    again after 75 % of the steps.
    """
    if schedule == "constant" or steps <= 0:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / steps))
    return 0.1 ** ((t >= 0.5 * steps) + (t >= 0.75 * steps))


def uniform_in_box(box: Box, generator: torch.Generator | None = None) -> Tensor:
    """A point drawn uniformly from ``box`` (shape of ``box.lower``)."""
    lo = box.lower
    u = torch.rand(lo.shape, generator=generator, device=lo.device, dtype=lo.dtype)
    return lo + (box.upper - lo) * u


def input_gradient(model: Model, x: Tensor, y: Tensor, loss: str, kappa: float = math.inf) -> tuple[Tensor, Tensor]:
    """Gradient of the summed :func:`attack_loss` w.r.t. (B, *in) ``x``, and the (B, K) logits.

    Only ``x`` receives a gradient (``torch.autograd.grad``), never the model parameters.
    NaN/inf gradient entries are replaced by 0.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (g,) = torch.autograd.grad(attack_loss(logits, y, loss, kappa).sum(), x)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), logits.detach()


MAX_SEED = 2**64 - 1  # torch generators take seeds in [0, 2^64)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CertorchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_seed(seed) -> int | None:
    """``None`` or an integer seed in ``[0, 2^64)`` (what a torch generator accepts)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise CertorchError(f"seed must be an integer in [0, 2^64 - 1], got {seed!r}")
    return seed


def _check_positive(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CertorchError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@register_attack("pgd")
class PGD(Attack):
    """L-inf PGD with sign-gradient ascent steps, projected onto ball ∩ [lo, hi].

    Keyword-only hyperparameters (validated here, not mid-run):
        steps: gradient steps per restart (>= 1; 0 steps would not be an attack: a random point
            could be classified correctly where ``x`` is not and inflate robust accuracy).
        step_size: absolute step size; default ``2.5 * eps / steps``.
        rel_step_size: step size as a fraction of eps (exclusive with ``step_size``); handy
            when eps follows a schedule during training.
        restarts: independent runs (>= 1); per example the run with the lowest margin wins.
        random_start: start uniformly in the ball ∩ box (else at ``x``).
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (CW-style ``-min_j logit_y - logit_j``).
        schedule: ``"constant"``, ``"cosine"`` or ``"step"`` (see :func:`step_factor`).
        best_iterate: return per example the lowest-margin iterate seen (free: the margin comes
            from the forward pass that computes the gradient); ``False`` = last iterate (Madry).
        seed: seed of a private generator for the random starts (deterministic calls); ``None``
            uses torch's global RNG.

    Cost: ``restarts * (steps + 1)`` forward passes and ``restarts * steps`` backward passes.
    """

    def __init__(
        self,
        *,
        steps: int = 40,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        loss: str = "ce",
        schedule: str = "constant",
        best_iterate: bool = True,
        seed: int | None = None,
    ):
        self.steps = _check_int("steps", steps, 1)
        self.restarts = _check_int("restarts", restarts, 1)
        self.step_size = _check_positive("step_size", step_size)
        self.rel_step_size = _check_positive("rel_step_size", rel_step_size)
        if step_size is not None and rel_step_size is not None:
            raise CertorchError("give at most one of step_size and rel_step_size")
        if not isinstance(random_start, bool):
            raise CertorchError(f"random_start must be True or False, got {random_start!r}")
        if restarts > 1 and not random_start:
            raise CertorchError("restarts > 1 needs random_start=True (deterministic restarts are identical)")
        if loss not in LOSSES:
            raise CertorchError(f"unknown attack loss {loss!r}; valid: {', '.join(LOSSES)}")
        if schedule not in SCHEDULES:
            raise CertorchError(f"unknown step-size schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        seed = _check_seed(seed)
        self.random_start = random_start
        self.loss = loss
        self.schedule = schedule
        self.best_iterate = bool(best_iterate)
        self.seed = seed
        self.kappa = math.inf

    def base_step_size(self, eps: float | Tensor) -> float | Tensor:
        """Step size before the schedule: absolute, relative to eps, or ``2.5 * eps / steps``."""
        if self.step_size is not None:
            return self.step_size
        if self.rel_step_size is not None:
            return self.rel_step_size * eps
        return 2.5 * eps / max(self.steps, 1)

    def run(self, model: Model, x: Tensor, y: Tensor, box: Box, eps: float | Tensor) -> Tensor:
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        alpha = self.base_step_size(eps)
        best_x = x.clone()
        best_m = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
        for _ in range(self.restarts):
            x_r, m_r = self._one_restart(model, x, y, box, alpha, gen)
            better = m_r < best_m
            best_m = torch.where(better, m_r, best_m)
            best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_r, best_x)
        return best_x

    def _one_restart(
        self, model: Model, x: Tensor, y: Tensor, box: Box, alpha: float | Tensor, gen: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """One PGD run: returns (B, *in) iterate and its (B,) margin (best or last iterate)."""
        x_t = uniform_in_box(box, gen) if self.random_start else x.clone()
        best_x, best_m = x_t, torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
        shape = (-1, *([1] * (x.dim() - 1)))
        for t in range(self.steps + 1):
            if t < self.steps:
                g, logits = input_gradient(model, x_t, y, self.loss, self.kappa)
            elif not self.best_iterate and self.restarts == 1:
                return x_t, torch.zeros_like(best_m)  # nothing to compare: skip the extra forward
            else:
                with torch.no_grad():
                    logits = model(x_t)
            m = worst_margin(logits, y)
            if self.best_iterate:
                better = m < best_m
                best_m = torch.where(better, m, best_m)
                best_x = torch.where(better.view(shape), x_t, best_x)
            else:
                best_x, best_m = x_t, m
            if t < self.steps:
                x_t = project(x_t + step_factor(self.schedule, t, self.steps) * alpha * g.sign(), box)
        return best_x, best_m


def pgd(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    lo: float | Tensor = 0.0,
    hi: float | Tensor = 1.0,
    **kwargs,
) -> AttackResult:
    """Functional shortcut: ``PGD(**kwargs)(model, x, y, eps, lo, hi)``."""
    return PGD(**kwargs)(model, x, y, eps, lo, hi)
