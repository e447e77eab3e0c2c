"""PGD adversarial training (Madry et al. 2018): minimize the loss at PGD examples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.attacks import PGD
from certorch.errors import require
from certorch.nn.mode import eval_mode
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective


@register_objective("pgd")
class PGDTraining(Objective):
    """Madry adversarial training: cross-entropy at L-inf PGD examples of the scheduled eps.

    ``step_size`` null means ``2.5 * eps / steps``. ``natural_weight`` mixes in the clean
    loss: ``(1 - w) * adv_loss + w * clean_loss`` (0 = pure Madry). While the scheduled
    eps is 0 the attack is skipped (natural training).
    """

    @dataclass(kw_only=True)
    class Params:
        steps: int = 10
        step_size: float | None = None
        restarts: int = 1
        random_start: bool = True
        loss: Literal["ce", "margin"] = "ce"
        natural_weight: float = 0.0

        def __post_init__(self) -> None:
            require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
            require(self.restarts >= 1, f"restarts must be >= 1, got {self.restarts}")
            require(self.step_size is None or self.step_size > 0, f"step_size must be > 0, got {self.step_size}")
            require(self.restarts == 1 or self.random_start, "restarts > 1 needs random_start: true")
            require(0 <= self.natural_weight <= 1, f"natural_weight must be in [0, 1], got {self.natural_weight}")

    def attack(self) -> PGD:
        p = self.params
        return PGD(
            steps=p.steps,
            step_size=p.step_size,
            restarts=p.restarts,
            random_start=p.random_start,
            loss=p.loss,
            best_iterate=False,
        )

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        w = self.params.natural_weight
        if eps <= 0:
            logits = model(x)
            return LossOutput(F.cross_entropy(logits, y), {"adv_acc": (logits.argmax(1) == y).float().mean()}, logits.detach())
        with eval_mode(model):  # no BatchNorm statistics / dropout noise; each module's flag restored (frozen prefixes)
            x_adv = self.attack()(model, x, y, eps).x_adv.detach()
        if w > 0:
            logits_all = model(torch.cat([x, x_adv]))
            clean, adv = logits_all[: x.shape[0]], logits_all[x.shape[0] :]
            loss = (1 - w) * F.cross_entropy(adv, y) + w * F.cross_entropy(clean, y)
        else:
            clean, adv = None, model(x_adv)
            loss = F.cross_entropy(adv, y)
        metrics = {"adv_acc": (adv.argmax(1) == y).float().mean().detach()}
        return LossOutput(loss, metrics, None if clean is None else clean.detach())
