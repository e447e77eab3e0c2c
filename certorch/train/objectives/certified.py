"""Certified training with any bound method: IBP, CROWN-IBP, dual (projections), zonotope, ...

The robust loss is the cross-entropy of the *worst-case logits* implied by the margin lower
bounds: ``z_y = 0``, ``z_j = -lower_j`` (Wong & Kolter 2018; Gowal et al. 2018). It is mixed with
the clean loss by a scheduled weight ``kappa`` (1 -> ``kappa_end``):
``kappa * CE(clean) + (1 - kappa) * robust``. For ``crown-ibp`` the margin bound itself is
``beta * crown_ibp + (1 - beta) * ibp`` with ``beta`` scheduled 1 -> 0 (Zhang et al. 2020).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certorch.bounds as bounds
from certorch.config.schema import ScheduleConfig
from certorch.errors import require
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective


def robust_cross_entropy(lower: Tensor, y: Tensor) -> Tensor:
    """CE of the worst-case logits: ``lower`` (B, K-1) margin lower bounds -> scalar loss."""
    z = torch.cat([torch.zeros_like(lower[:, :1]), -lower], dim=1)
    return F.cross_entropy(z, torch.zeros_like(y))


@register_objective("certified")
class CertifiedTraining(Objective):
    """Minimize a certified upper bound of the loss over the eps-ball (any ``bound`` method)."""

    @dataclass(kw_only=True)
    class Params:
        bound: str = "ibp"
        projections: int | None = None  # Cauchy projections for zonotope / dual (training only)
        kappa: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=1.0, end=0.5))
        beta: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=1.0, end=0.0))

        def __post_init__(self) -> None:
            m = bounds.get_method(self.bound)
            self.bound = m.name
            require(self.projections is None or self.projections >= 1, "projections must be >= 1 or null")
            require(self.projections is None or m.supports_projections,
                    f"projections need bound zonotope or dual, not {self.bound!r}")
            for name in ("kappa", "beta"):
                s = getattr(self, name)
                require(0 <= s.start <= 1 and 0 <= s.end <= 1, f"{name} must stay in [0, 1]")

    def schedules(self) -> dict[str, ScheduleConfig]:
        return {"kappa": self.params.kappa, "beta": self.params.beta}

    def margin_lower(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float) -> Tensor:
        p = self.params
        lower = bounds.bound(model, x, eps, method=p.bound, y=y, projections=p.projections, upper=False).lower
        if p.bound == "crown-ibp" and beta < 1:
            ibp = bounds.bound(model, x, eps, method="ibp", y=y, upper=False).lower
            lower = beta * lower + (1 - beta) * ibp if beta > 0 else ibp
        return lower

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        logits = model(x)
        clean = F.cross_entropy(logits, y)
        kappa = state.values.get("kappa", 1.0)
        if eps <= 0:
            return LossOutput(clean, {"robust_loss": 0.0}, logits.detach())
        lower = self.margin_lower(model, x, y, eps, state.values.get("beta", 1.0))
        robust = robust_cross_entropy(lower, y)
        metrics = {"robust_loss": robust.detach(), "verified": (lower > 0).all(1).float().mean().detach()}
        return LossOutput(kappa * clean + (1 - kappa) * robust, metrics, logits.detach())

    def eval_metrics(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, float]:
        if eps <= 0:
            return {}
        method = self.params.bound
        ok = bounds.certified(model, x, y, eps, method=method)
        return {f"verified_acc_{method}": float(ok.float().mean())}


@register_objective("ibp")
class IBPTraining(CertifiedTraining):
    """IBP training (Gowal et al. 2018) = ``certified`` with ``bound: ibp``."""

    @dataclass(kw_only=True)
    class Params(CertifiedTraining.Params):
        bound: str = "ibp"


@register_objective("crown_ibp")
class CrownIBPTraining(CertifiedTraining):
    """CROWN-IBP (Zhang et al. 2020) = ``certified`` with ``bound: crown-ibp`` and beta 1 -> 0."""

    @dataclass(kw_only=True)
    class Params(CertifiedTraining.Params):
        bound: str = "crown-ibp"
