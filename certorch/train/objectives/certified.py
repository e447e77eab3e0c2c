"""Certified training with any bound method: IBP, CROWN-IBP, dual (projections), zonotope, ...

The robust loss is the cross-entropy of the *worst-case logits* implied by the margin lower
bounds: ``z_y = 0``, ``z_j = -lower_j`` (Wong & Kolter 2018; Gowal et al. 2018). It is mixed with
the clean loss by a scheduled weight ``kappa`` (1 -> ``kappa_end``):
``kappa * CE(clean) + (1 - kappa) * robust``. For ``crown-ibp`` the margin bound itself is
``beta * crown_ibp + (1 - beta) * ibp`` with ``beta`` scheduled 1 -> 0 (Zhang et al. 2020); both
come from one IBP pass (``ct.bound_many``).

``fusion: true`` (the default of ``crown_ibp``) bounds the loss itself instead of the K-1 margins
(:func:`certorch.train.robust_loss.fused_cross_entropy_bound`: one backward row per example), and
mixes the *loss bounds*: ``beta * fused(bound) + (1 - beta) * robust_ce(ibp)``, both upper bounds of
the loss. The logged ``verified`` is then IBP's (the fused bound has no margins).

Evaluation may use other bounds than training (``eval_bounds``): training on ``dual`` with
``projections: 50`` (estimates) is evaluated with the exact ``dual`` bound (certificates, float64).
The estimate's own verified fraction is logged as ``est_verified_acc`` (never a certificate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certorch.bounds as bounds
from certorch.config.schema import ScheduleConfig
from certorch.domains.zonotope import resolve_projection_dtype
from certorch.errors import require
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective
from certorch.train.robust_loss import fused_cross_entropy_bound, robust_cross_entropy

__all__ = ["CertifiedTraining", "robust_cross_entropy", "verified_accuracies"]


def verified_accuracies(model: nn.Module, x: Tensor, y: Tensor, eps: float, methods: list[str]) -> dict[str, float]:
    """``verified_acc_<method>``: the fraction of (N, ...) ``x`` with (N,) labels ``y`` that
    ``bounds.certified`` proves robust at ``eps`` with each bound method (exact, float64, eval
    semantics: certificates, never training estimates). The one evaluation metric of every
    objective's ``eval_bounds``."""
    return {f"verified_acc_{m}": float(bounds.certified(model, x, y, eps, method=m).float().mean()) for m in methods}


@register_objective("certified")
class CertifiedTraining(Objective):
    """Minimize a certified upper bound of the loss over the eps-ball (any ``bound`` method)."""

    @dataclass(kw_only=True)
    class Params:
        bound: str = "ibp"
        projections: int | None = None  # Cauchy projections for zonotope / dual (training only)
        #: dtype the projected generators are mapped in (auto: bfloat16 where native; null: the model's)
        projection_dtype: Literal["auto", "float32", "float64", "bfloat16"] | None = None
        kappa: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=1.0, end=0.5))
        beta: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(start=1.0, end=0.0))
        eval_bounds: list[str] | None = None  # certify with these at evaluation (default: [bound], exact)
        fusion: bool = False  # bound the loss itself (one spec row) instead of the K-1 margins

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
        return bounds.bound(model, x, eps, method=p.bound, y=y, projections=p.projections, upper=False,
                            projection_dtype=self.projection_dtype(x.device)).lower

    def projection_dtype(self, device: torch.device) -> torch.dtype | None:
        """``params.projection_dtype`` on ``device`` (None without projections)."""
        return resolve_projection_dtype(self.params.projection_dtype, device) if self.params.projections else None

    def fused_loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float) -> tuple[Tensor, Tensor]:
        """Loss-fusion robust loss (scalar) and the IBP margin lower bounds (B, K-1) it used."""
        p = self.params
        ibp = bounds.bound(model, x, eps, method="ibp", y=y, upper=True)
        ibp_loss = robust_cross_entropy(ibp.lower, y)
        method = p.bound if p.bound != "crown-ibp" or beta > 0 else "ibp"
        if method == "ibp":
            return ibp_loss, ibp.lower
        fused, _ = fused_cross_entropy_bound(model, x, y, eps, method, ibp=ibp, projections=p.projections,
                                             projection_dtype=self.projection_dtype(x.device))
        if p.bound == "crown-ibp" and beta < 1:
            return beta * fused.mean() + (1 - beta) * ibp_loss, ibp.lower
        return fused.mean(), ibp.lower

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        logits = model(x)
        clean = F.cross_entropy(logits, y)
        kappa = state.values.get("kappa", 1.0)
        if eps <= 0:
            return LossOutput(clean, {"robust_loss": 0.0}, logits.detach())
        beta = state.values.get("beta", 1.0)
        if self.params.fusion:
            robust, lower = self.fused_loss(model, x, y, eps, beta)
        else:
            lower = self.margin_lower(model, x, y, eps, beta)
            robust = robust_cross_entropy(lower, y)
        metrics = {"robust_loss": robust.detach(), "verified": (lower > 0).all(1).float().mean().detach()}
        return LossOutput(kappa * clean + (1 - kappa) * robust, metrics, logits.detach())

    def eval_metrics(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, float]:
        if eps <= 0:
            return {}
        out = verified_accuracies(model, x, y, eps, self.params.eval_bounds)
        if self.params.projections is not None:  # the training estimate, for comparison (not a certificate)
            with torch.no_grad():
                g = torch.Generator(device=x.device).manual_seed(0)
                est = bounds.bound(model, x, eps, method=self.params.bound, y=y, projections=self.params.projections,
                                   upper=False, generator=g, projection_dtype=self.projection_dtype(x.device)).lower
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
        fusion: bool = True


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
