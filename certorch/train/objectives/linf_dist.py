"""Training objectives for L_inf-dist nets (Zhang et al., ICML 2021, Sec. 5 and App. B, D).

* ``linf_hinge`` (pure L_inf-dist Net): multi-class hinge loss with threshold ``theta`` on the
  top-1 margin, ``mean_b max(0, theta - margin_b)``.
* ``linf_mlp`` (L_inf-dist Net+MLP): the IBP loss of Gowal et al. (2018) on the MLP head
  (Eq. 22), ``kappa * CE(z(x), y) + (1 - kappa) * CE(-m_lb, y)``, where ``m_lb`` (B, K-1) are
  IBP lower bounds of the margins ``z_y - z_j`` over the box ``f(x) +- eps * L`` around the
  backbone features (the backbone is L-Lipschitz in L-inf at p = inf, ``L`` = 1 / std of the
  input normalization). The loss back-propagates into the backbone too.

Both share the paper's training recipe (Sec. 5.2, Table 6):

* p schedule: ``p = p_start`` (8) for ``p_hold_epochs`` (e1), then a geometric increase to
  ``p_end`` (1000) over ``p_ramp_epochs`` (e2), then ``p = inf`` for the rest (e3). It is
  declared as the named schedule ``p`` (an ``exp`` :class:`~certorch.train.schedules.Ramp`
  the trainer steps every iteration); the objective switches to ``inf`` at ``t >= e1 + e2``.
* l_p weight decay (Eq. 6) on the L_inf-dist layers, ``lp_weight_decay * sum_i ||w_i||_p^2 / 2``
  at the current p, added as the objective's regularizer; the optimizer's ordinary weight
  decay applies only to the other parameters (the MLP head).
* per-epoch evaluation: ``cert_acc`` (``certorch.nn.linf_dist_cert.certify`` at ``eval_eps``,
  p = inf) and ``inf_nat_acc`` (clean accuracy at p = inf), whatever p training is at.

``theta`` and the IBP radius are in pixel units: with ``pixel_units`` (default) the hinge
threshold is multiplied by the Lipschitz factor ``L`` of the input normalization, so
``theta = 3 * eps`` asks for margins 1.5 times the certified ``2 * eps * L``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certorch.config.schema import ScheduleConfig
from certorch.errors import CertorchError, require
from certorch.nn.linf_dist import (
    linf_dist_layers,
    linf_hinge_loss,
    lp_weight_decay,
    set_p,
    split_backbone_head,
)
from certorch.nn.linf_dist_cert import certify, head_margin_lower_bound, lipschitz_factor
from certorch.spec import margins
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective
from certorch.train.schedules import Ramp

__all__ = ["LInfHinge", "LInfMLP", "p_ramp", "p_at", "ibp_head_loss"]


# ------------------------------------------------------------------ the p schedule
def p_ramp(p_start: float, p_end: float, hold: float, ramp: float) -> Ramp:
    """The finite part of the p schedule: ``p_start`` until ``hold``, geometric to ``p_end`` at ``hold + ramp``."""
    return Ramp(p_start, p_end, "exp", hold, ramp)


def p_at(t: float, p_start: float, p_end: float, hold: float, ramp: float) -> float:
    """p at training time ``t`` (epochs): the :func:`p_ramp` value before ``hold + ramp``, ``inf`` from then on."""
    if t >= hold + ramp:
        return math.inf
    return p_ramp(p_start, p_end, hold, ramp)(t)


@dataclass(kw_only=True)
class _Recipe:
    """Fields shared by both objectives (validated in ``__post_init__``)."""

    p_start: float = 8.0
    p_end: float = 1000.0
    p_hold_epochs: float = 50.0
    p_ramp_epochs: float = 300.0
    lp_weight_decay: float = 0.005

    def __post_init__(self) -> None:
        require(math.isfinite(self.p_start) and self.p_start >= 1, f"p_start must be finite and >= 1, got {self.p_start}")
        require(
            math.isfinite(self.p_end) and self.p_end >= self.p_start,
            f"p_end must be finite and >= p_start, got {self.p_end}",
        )
        require(self.p_hold_epochs >= 0, f"p_hold_epochs must be >= 0, got {self.p_hold_epochs}")
        require(self.p_ramp_epochs >= 0, f"p_ramp_epochs must be >= 0, got {self.p_ramp_epochs}")
        require(
            math.isfinite(self.lp_weight_decay) and self.lp_weight_decay >= 0,
            f"lp_weight_decay must be >= 0, got {self.lp_weight_decay}",
        )


@contextmanager
def _p_inf(model: nn.Module) -> Iterator[None]:
    """Temporarily set every L_inf-dist layer to p = inf (restoring each layer's p after)."""
    layers = linf_dist_layers(model)
    old = [m.p for m in layers]
    set_p(model, math.inf)
    try:
        yield
    finally:
        for m, q in zip(layers, old):
            m.p = q


class _LInfDistObjective(Objective):
    """Shared recipe: p schedule, l_p weight decay, parameter groups, certified evaluation."""

    def schedules(self) -> dict[str, ScheduleConfig]:
        q = self.params
        return {
            "p": ScheduleConfig(
                start=q.p_start, end=q.p_end, kind="exp", warmup_epochs=q.p_hold_epochs, ramp_epochs=q.p_ramp_epochs
            )
        }

    def current_p(self, state: TrainState) -> float:
        """p for this step: the declared ramp's value, ``inf`` once ``t >= e1 + e2``."""
        q = self.params
        if state.t >= q.p_hold_epochs + q.p_ramp_epochs:
            return math.inf
        if "p" in state.values:
            return float(state.values["p"])
        return p_at(state.t, q.p_start, q.p_end, q.p_hold_epochs, q.p_ramp_epochs)

    def prepare(self, model: nn.Module, state: TrainState) -> None:
        """Set the scheduled p on every L_inf-dist layer (error if the model has none)."""
        if not linf_dist_layers(model):
            raise CertorchError(f"objective {self.name!r} needs an L_inf-dist model (linf_dist_net / linf_dist_net_mlp)")
        set_p(model, self.current_p(state))

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """L_inf-dist layer parameters without ordinary decay (they get the l_p decay); the rest with it."""
        dist_ids = {id(p) for m in linf_dist_layers(model) for p in m.parameters()}
        dist = [p for p in model.parameters() if p.requires_grad and id(p) in dist_ids]
        other = [p for p in model.parameters() if p.requires_grad and id(p) not in dist_ids]
        groups = [{"params": dist, "weight_decay": 0.0}]
        if other:
            groups.append({"params": other, "weight_decay": weight_decay})
        return groups

    def regularizer(self, model: nn.Module, state: TrainState) -> Tensor | None:
        c = self.params.lp_weight_decay
        if c <= 0:
            return None
        return c * lp_weight_decay(model)  # at each layer's current p (set by prepare)

    def eval_metrics(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, float]:
        """``cert_acc`` at ``eps`` and ``inf_nat_acc``, both at p = inf, on (N, ...) ``x``, (N,) ``y``."""
        if not linf_dist_layers(model) or len(y) == 0:
            return {}
        with _p_inf(model):
            ok = certify(model, x, y, eps) if eps > 0 else None
            was = model.training
            model.eval()
            with torch.no_grad():
                nat = (model(x).argmax(1) == y).float().mean()
            model.train(was)
        out = {"inf_nat_acc": float(nat)}
        if ok is not None:
            out["cert_acc"] = float(ok.float().mean())
        return out


@register_objective("linf_hinge")
class LInfHinge(_LInfDistObjective):
    """L_inf-dist Net: multi-class hinge loss with threshold theta, p schedule 8 -> 1000 -> inf, l_p decay.

    Params: ``theta`` (paper: 0.9 for MNIST eps 0.3, 0.45 for Fashion-MNIST eps 0.1),
    ``pixel_units`` (multiply theta by the normalization's Lipschitz factor), and the shared
    p schedule / ``lp_weight_decay`` fields (see the module docstring). The model must be a
    pure L_inf-dist net (logits = negated last layer); the margin certificate needs a
    margin above ``2 * eps * L``.
    """

    @dataclass(kw_only=True)
    class Params(_Recipe):
        theta: float = 0.9
        pixel_units: bool = True

        def __post_init__(self) -> None:
            super().__post_init__()
            require(math.isfinite(self.theta) and self.theta > 0, f"theta must be finite and > 0, got {self.theta}")

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        self.prepare(model, state)
        factor = lipschitz_factor(model) if self.params.pixel_units else 1.0
        logits = model(x)  # (B, K)
        loss = linf_hinge_loss(logits, y, self.params.theta * factor)
        with torch.no_grad():
            m = margins(logits, y).min(dim=1).values
            metrics = {"margin_ok": (m > 2.0 * eps * lipschitz_factor(model)).float().mean()} if eps > 0 else {}
        return LossOutput(loss, metrics, logits.detach())


def ibp_head_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, kappa: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 22 on a Net+MLP: ``(loss, clean logits (B, K), margin lower bounds (B, K-1))``.

    The features ``f`` (B, F) of the backbone (in the model's current mode) are boxed by
    ``+- eps * L`` and the head is bounded by IBP with the margin matrix merged into its
    last Linear; the robust term is the cross-entropy of ``[0, -m_lb]`` with class 0.
    """
    features, head = split_backbone_head(model)
    f = features(x).flatten(1)
    logits = head(f)
    clean = F.cross_entropy(logits, y)
    if eps <= 0 or kappa >= 1:
        lb = margins(logits, y)
        return clean, logits, lb
    delta = eps * lipschitz_factor(model)
    lb = head_margin_lower_bound(head, f - delta, f + delta, y)  # (B, K-1)
    worst = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
    robust = F.cross_entropy(worst, torch.zeros_like(y))
    return kappa * clean + (1.0 - kappa) * robust, logits, lb


@register_objective("linf_mlp")
class LInfMLP(_LInfDistObjective):
    """L_inf-dist Net+MLP: IBP loss on the MLP head over the feature box +- eps*L (Eq. 22), p schedule, l_p decay.

    Params: ``kappa`` (weight of the clean cross-entropy, fixed; paper 0.5 for MNIST and
    Fashion-MNIST) and the shared p schedule / ``lp_weight_decay`` fields. The training eps
    (paper: 0.35 for MNIST, 0.11 for Fashion-MNIST, linear warmup over the first e1 epochs)
    comes from the trainer's ``eps`` schedule; ordinary ``optim.weight_decay`` decays the head.
    """

    @dataclass(kw_only=True)
    class Params(_Recipe):
        kappa: float = 0.5

        def __post_init__(self) -> None:
            super().__post_init__()
            require(0 <= self.kappa <= 1, f"kappa must be in [0, 1], got {self.kappa}")

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        self.prepare(model, state)
        loss, logits, lb = ibp_head_loss(model, x, y, eps, self.params.kappa)
        metrics = {"ibp_ok": (lb.detach() > 0).all(dim=1).float().mean()} if eps > 0 else {}
        return LossOutput(loss, metrics, logits.detach())

