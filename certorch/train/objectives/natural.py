"""Natural (standard) training: cross-entropy on clean inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from certorch.errors import require
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective


@register_objective("natural")
class Natural(Objective):
    """Standard training: cross-entropy on clean inputs (eps is ignored)."""

    @dataclass(kw_only=True)
    class Params:
        label_smoothing: float = 0.0

        def __post_init__(self) -> None:
            require(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        logits = model(x)  # (B, K)
        loss = F.cross_entropy(logits, y, label_smoothing=self.params.label_smoothing)
        return LossOutput(loss, {}, logits.detach())
