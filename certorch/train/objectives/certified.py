"""Certified training with any bound method: IBP, CROWN-IBP, dual (projections), zonotope, ...

The robust loss is the cross-entropy of the *worst-case logits* implied by the margin lower
bounds: ``z_y = 0``, ``z_j = -lower_j`` (Wong & Kolter 2018; Gowal et al. 2018). It is mixed with
the clean loss by a scheduled weight ``kappa`` (1 -> ``kappa_end``):
``kappa * CE(clean) + (1 - kappa) * robust``. For ``crown-ibp`` the margin bound itself is
``beta * crown_ibp + (1 - beta) * ibp`` with ``beta`` scheduled 1 -> 0 (Zhang et al. 2020); both
come from one IBP pass (``ct.bound_many``).

Evaluation may use other bounds than training (``eval_bounds``): training on ``dual`` with
``projections: 50`` (estimates) is evaluated with the exact ``dual`` bound (certificates, float64).
The estimate's own verified fraction is logged as ``est_verified_acc`` (never a certificate).
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
        eval_bounds: list[str] | None = None  # certify with these at evaluation (default: [bound], exact)

        def __post_init__(self) -> None:
            m = bounds.get_method(self.bound)
            self.bound = m.name
            self.eval_bounds = [bounds.get_method(b).name for b in (self.eval_bounds or [self.bound])]
            require(len(self.eval_bounds) > 0, "eval_bounds must name at least one bound method")
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
        if p.bound == "crown-ibp" and beta < 1:
            if beta <= 0:
                return bounds.bound(model, x, eps, method="ibp", y=y, upper=False).lower
            both = bounds.bound_many(model, x, eps, ("crown-ibp", "ibp"), y=y, upper=False)
            return beta * both["crown-ibp"].lower + (1 - beta) * both["ibp"].lower
        return bounds.bound(model, x, eps, method=p.bound, y=y, projections=p.projections, upper=False).lower

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
        out = {}
        for method in self.params.eval_bounds:
            ok = bounds.certified(model, x, y, eps, method=method)
            out[f"verified_acc_{method}"] = float(ok.float().mean())
        if self.params.projections is not None:  # the training estimate, for comparison (not a certificate)
            with torch.no_grad():
                g = torch.Generator(device=x.device).manual_seed(0)
                est = bounds.bound(model, x, eps, method=self.params.bound, y=y, projections=self.params.projections,
                                   upper=False, generator=g).lower
                clean = model(x).argmax(1) == y
            out["est_verified_acc"] = float((clean & (est > 0).all(1)).float().mean())
        return out


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


@register_objective("convex_adversarial")
class ConvexAdversarialTraining(CertifiedTraining):
    """Wong et al. 2018: robust CE on the dual-network bound, r Cauchy projections in training, exact evaluation.

    ``certified`` with ``bound: dual``, ``projections: 50`` (the paper's default) and the pure
    robust loss (``kappa`` 0); schedule eps linearly from 0.01 (``eps.start``) as the paper does.
    """

    @dataclass(kw_only=True)
    class Params(CertifiedTraining.Params):
        bound: str = "dual"
        projections: int | None = 50
        kappa: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=0.0, end=0.0))
