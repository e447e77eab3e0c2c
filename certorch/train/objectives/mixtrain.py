"""MixTrain (Wang, Chen, Abdou, Jana 2018): stochastic output approximation + dynamic mixed training.

* **Stochastic output approximation**: per batch the verified (robust) loss is computed on ``k``
  examples drawn uniformly without replacement from the batch (``k = 1 .. batch size``; the
  paper's Table VII studies k), with any sound bound method by name (default ``symbolic``,
  MixTrain's symbolic linear relaxation). The draw is seeded by (``seed``, global step), so a
  resumed run draws the same examples. ``k`` larger than ``batch_size`` is refused when the
  trainer is built; a smaller last batch of an epoch uses all of its examples.
* **Dynamic mixed training**: ``loss = alpha * verified + (1 - alpha) * natural`` (natural:
  cross-entropy on the whole batch). ``alpha_rule: fixed`` keeps ``alpha``; ``dynamic`` follows
  the paper's rule for CIFAR: start at ``alpha_start`` (0.4), add ``alpha_step`` (0.05) every
  ``alpha_every`` (5) epochs up to ``alpha_max`` (0.8); whenever the held-out accuracy
  (``acc_metric``, default ``nat_acc``) decreased and is below ``acc_target`` (0.7), subtract
  ``alpha_step`` instead (not below ``alpha_min``). alpha is objective state: checkpointed, restored
  by ``--resume``, logged and plotted per epoch.
* Evaluation: verified accuracy with ``eval_bounds`` (default the training bound) and, with
  ``era: true``, the interval attack's estimated robust accuracy (the paper's ERA).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certorch.bounds as bounds
from certorch.errors import CertorchError, require
from certorch.train.objectives.base import LossOutput, Objective, TrainState, register_objective
from certorch.train.objectives.certified import robust_cross_entropy, verified_accuracies


def sample_indices(batch: int, k: int, seed: int, step: int, device: torch.device | str = "cpu") -> Tensor:
    """``k`` distinct indices (k,) in ``range(batch)``, drawn from a generator seeded by (seed, step)."""
    if k > batch:
        raise CertorchError(f"mixtrain: k = {k} examples cannot be drawn from a batch of {batch} (k <= batch size)")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randperm(batch, generator=g)[:k].to(device)


@dataclass
class AlphaRule:
    """The paper's alpha staircase as a pure update: ``next(alpha, epoch, acc, prev_acc)``."""

    step: float = 0.05
    every: int = 5
    maximum: float = 0.8
    minimum: float = 0.0
    target: float = 0.7

    def next(self, alpha: float, epoch: int, acc: float | None, prev_acc: float | None) -> float:
        """alpha after epoch ``epoch`` (1-based) given the held-out accuracy ``acc`` (None if not evaluated)."""
        if acc is not None and prev_acc is not None and acc < prev_acc and acc < self.target:
            return round(max(self.minimum, alpha - self.step), 10)
        if epoch % self.every == 0:
            return round(min(self.maximum, alpha + self.step), 10)
        return alpha


@register_objective("mixtrain")
class MixTrain(Objective):
    """MixTrain: verified loss on k sampled examples per batch, mixed with the natural loss by alpha (fixed or dynamic)."""

    @dataclass(kw_only=True)
    class Params:
        bound: str = "symbolic"
        k: int = 1
        alpha: float = 0.5  # the fixed alpha (alpha_rule: fixed)
        alpha_rule: Literal["fixed", "dynamic"] = "fixed"
        alpha_start: float = 0.4
        alpha_step: float = 0.05
        alpha_every: int = 5
        alpha_max: float = 0.8
        alpha_min: float = 0.0
        acc_target: float = 0.7
        acc_metric: str = "nat_acc"
        seed: int = 0
        eval_bounds: list[str] | None = None
        era: bool = False  # evaluate the interval attack (ERA) too

        def __post_init__(self) -> None:
            m = bounds.get_method(self.bound)
            self.bound = m.name
            self.eval_bounds = [bounds.get_method(b).name for b in (self.eval_bounds or [self.bound])]
            require(self.k >= 1, f"mixtrain: k must be >= 1, got {self.k}")
            for name in ("alpha", "alpha_start", "alpha_step", "alpha_max", "alpha_min", "acc_target"):
                v = getattr(self, name)
                require(0.0 <= v <= 1.0, f"mixtrain: {name} must be in [0, 1], got {v}")
            require(self.alpha_min <= self.alpha_max, "mixtrain: alpha_min must be <= alpha_max")
            require(self.alpha_every >= 1, f"mixtrain: alpha_every must be >= 1, got {self.alpha_every}")
            require(0 <= self.seed < 2**63, f"mixtrain: seed must be in [0, 2^63), got {self.seed}")

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        p = self.params
        self.alpha = p.alpha_start if p.alpha_rule == "dynamic" else p.alpha
        self.prev_acc: float | None = None
        self.rule = AlphaRule(p.alpha_step, p.alpha_every, p.alpha_max, p.alpha_min, p.acc_target)

    def check(self, cfg: Any) -> None:
        if self.params.k > cfg.batch_size:
            raise CertorchError(f"mixtrain: k = {self.params.k} is larger than batch_size = {cfg.batch_size}")

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "_prev_acc": self.prev_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alpha, prev = state.get("alpha"), state.get("_prev_acc")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise CertorchError(f"mixtrain: checkpointed alpha must be a number in [0, 1], got {alpha!r}")
        if prev is not None and (not isinstance(prev, (int, float)) or isinstance(prev, bool)):
            raise CertorchError(f"mixtrain: checkpointed prev_acc must be a number or null, got {prev!r}")
        self.alpha, self.prev_acc = float(alpha), (None if prev is None else float(prev))

    def after_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        if self.params.alpha_rule != "dynamic":
            return
        acc = record.get(self.params.acc_metric)
        acc = float(acc) if isinstance(acc, (int, float)) else None
        self.alpha = self.rule.next(self.alpha, epoch, acc, self.prev_acc)
        if acc is not None:
            self.prev_acc = acc

    # -------------------------------------------------------------- loss
    def verified_loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, step: int) -> tuple[Tensor, Tensor]:
        """Robust CE on k sampled examples of the batch; returns (loss, (k,) certified-by-the-bound)."""
        k = min(self.params.k, x.shape[0])  # a smaller last batch: all of its examples
        idx = sample_indices(x.shape[0], k, self.params.seed, step, x.device)
        lower = bounds.bound(model, x[idx], eps, method=self.params.bound, y=y[idx], upper=False).lower
        return robust_cross_entropy(lower, y[idx]), (lower > 0).all(1)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, state: TrainState) -> LossOutput:
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        if eps <= 0 or self.alpha <= 0:
            return LossOutput(natural, {"natural_loss": natural.detach(), "verified_loss": 0.0}, logits.detach())
        verified, ok = self.verified_loss(model, x, y, eps, state.step)
        loss = self.alpha * verified + (1 - self.alpha) * natural
        metrics = {"natural_loss": natural.detach(), "verified_loss": verified.detach(),
                   "verified": ok.float().mean().detach()}
        return LossOutput(loss, metrics, logits.detach())

    def eval_metrics(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, float]:
        if eps <= 0:
            return {}
        out = verified_accuracies(model, x, y, eps, self.params.eval_bounds)
        if self.params.era:
            from certorch.attacks import build_attack

            res = build_attack("interval", seed=self.params.seed)(model, x, y, eps)
            out["era_acc"] = float((~res.success).float().mean())
        return out
