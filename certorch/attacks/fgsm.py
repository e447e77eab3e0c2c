"""Fast gradient sign method (Goodfellow et al.): one signed-gradient step of size eps."""
from __future__ import annotations

from torch import Tensor

from certorch.attacks.base import Attack, Model
from certorch.attacks.pgd_attack import LOSSES, input_gradient
from certorch.attacks.registry import register_attack
from certorch.domains.box import Box
from certorch.errors import CertorchError

__all__ = ["FGSM"]


@register_attack("fgsm")
class FGSM(Attack):
    """``x_adv = clip_box(x + eps * sign(grad_x loss))``: one forward and one backward pass.

    Keyword-only hyperparameters: ``loss`` (``"ce"`` or ``"margin"``). For the randomly
    initialised variant of fast adversarial training use
    ``PGD(steps=1, rel_step_size=1.25, random_start=True, best_iterate=False)``.
    """

    def __init__(self, *, loss: str = "ce"):
        if loss not in LOSSES:
            raise CertorchError(f"unknown attack loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.loss = loss

    def run(self, model: Model, x: Tensor, y: Tensor, box: Box, eps: float | Tensor) -> Tensor:
        g, _ = input_gradient(model, x, y, self.loss)
        return x + eps * g.sign()
