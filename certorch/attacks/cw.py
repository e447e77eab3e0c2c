"""Carlini-Wagner style L-inf attack: PGD on the margin (CW) loss, with defaults tuned for evaluation."""
from __future__ import annotations

import math

from certorch.attacks.pgd_attack import PGD
from certorch.attacks.registry import register_attack
from certorch.errors import CertorchError

__all__ = ["CW"]


@register_attack("cw")
class CW(PGD):
    """PGD maximizing ``max_{j != y} logit[j] - logit[y]`` (the CW margin loss).

    Same keyword-only hyperparameters as :class:`PGD` except ``loss`` (always ``"margin"``),
    with evaluation defaults: 100 steps, cosine step-size decay from ``2.5 * eps / 20``
    (so the iterate can cross the ball several times early and settles late), best iterate
    kept. ``kappa`` (> 0, default inf) caps the loss: once an example's margin is below
    ``-kappa`` it receives no gradient, the classic CW confidence parameter.
    """

    def __init__(
        self,
        *,
        steps: int = 100,
        step_size: float | None = None,
        rel_step_size: float | None = 0.125,
        restarts: int = 1,
        random_start: bool = True,
        schedule: str = "cosine",
        best_iterate: bool = True,
        kappa: float = math.inf,
        seed: int | None = None,
    ):
        if step_size is not None:
            rel_step_size = None  # an absolute step size overrides the relative default
        super().__init__(
            steps=steps,
            step_size=step_size,
            rel_step_size=rel_step_size,
            restarts=restarts,
            random_start=random_start,
            loss="margin",
            schedule=schedule,
            best_iterate=best_iterate,
            seed=seed,
        )
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or math.isnan(kappa) or kappa <= 0:
            raise CertorchError(f"kappa must be a number > 0 (inf = no cap), got {kappa!r}")
        self.kappa = float(kappa)
