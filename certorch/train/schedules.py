"""Schedules: pure functions of training time, measured in (fractional) epochs.

The trainer evaluates every schedule at ``t = epoch + step_in_epoch / steps_per_epoch``
before each step, so schedules carry no state and resuming from a checkpoint needs only
the epoch/step counters.

* :class:`Ramp`: the one ramp used for eps and for the named scalar schedules objectives
  declare (kappa 1 -> 0, an L_p exponent, ...): ``start`` during a warmup, then a ramp
  (constant / linear / smooth / exp / cosine shape) to ``end``, then constant.
* :func:`eps_schedule`: the :class:`Ramp` of a :class:`certorch.config.EpsConfig`.
* :func:`lr_factor`: learning-rate multiplier (constant, step, cosine, warmup).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from certorch.config.schema import EpsConfig, LRScheduleConfig, ScheduleConfig
from certorch.errors import require

__all__ = ["Ramp", "smooth_ramp", "ramp_shape", "eps_schedule", "named_schedule", "lr_factor"]


def smooth_ramp(u: float, beta: float = 4.0, mid: float = 0.25) -> float:
    """Smooth ramp on ``u`` in [0, 1] with value in [0, 1] (Shi et al. 2021's eps ramp).

    ``a * u**beta`` for ``u < mid`` then the tangent line at ``mid``, which reaches 1 at
    ``u = 1``: continuous with a continuous derivative. ``a = 1 / (mid**(beta-1) *
    (mid + beta * (1 - mid)))`` follows from ``f(1) = 1``. ``mid = 0`` is the linear ramp.
    """
    u = min(max(u, 0.0), 1.0)
    if mid <= 0.0:
        return u
    a = 1.0 / (mid ** (beta - 1.0) * (mid + beta * (1.0 - mid)))
    if u < mid:
        return a * u**beta
    return a * mid**beta + a * beta * mid ** (beta - 1.0) * (u - mid)


def ramp_shape(kind: str, u: float, beta: float = 4.0, mid: float = 0.25) -> float:
    """Fraction of the way from start to end at ramp progress ``u`` in [0, 1]."""
    u = min(max(u, 0.0), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "smooth":
        return smooth_ramp(u, beta, mid)
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * u))
    return u  # linear, and exp (interpolated geometrically by Ramp)


@dataclass(frozen=True)
class Ramp:
    """``start`` for ``t < warmup``, ramp to ``end`` over ``[warmup, warmup + length]``, then ``end``.

    ``kind``: ``constant`` (``end`` from t = 0), ``linear``, ``smooth`` (see
    :func:`smooth_ramp`), ``cosine`` (half cosine), ``exp`` (geometric interpolation;
    needs start, end > 0). ``t`` in epochs (float). A zero-length ramp jumps at ``warmup``.
    """

    start: float
    end: float
    kind: str = "linear"
    warmup: float = 0.0
    length: float = 0.0
    beta: float = 4.0
    mid: float = 0.25

    def __post_init__(self) -> None:
        require(self.kind in ("constant", "linear", "smooth", "exp", "cosine"), f"unknown ramp kind {self.kind!r}")
        require(self.warmup >= 0 and self.length >= 0, "ramp warmup and length must be >= 0")
        if self.kind == "exp":
            require(self.start > 0 and self.end > 0, "an exp ramp needs start > 0 and end > 0")

    def progress(self, t: float) -> float:
        """Ramp progress in [0, 1] at time ``t`` (epochs)."""
        if self.kind == "constant":
            return 1.0
        if t < self.warmup:
            return 0.0
        if self.length <= 0:
            return 1.0
        return min((t - self.warmup) / self.length, 1.0)

    def __call__(self, t: float) -> float:
        """Value at time ``t`` in epochs."""
        u = self.progress(t)
        if self.kind == "exp":
            return self.start * (self.end / self.start) ** u
        if u >= 1.0:
            return self.end
        return self.start + (self.end - self.start) * ramp_shape(self.kind, u, self.beta, self.mid)


def eps_schedule(cfg: EpsConfig) -> Ramp:
    """The training-eps :class:`Ramp`: ``cfg.start`` -> ``cfg.value``."""
    return Ramp(cfg.start, cfg.value, cfg.schedule, cfg.warmup_epochs, cfg.ramp_epochs, cfg.beta, cfg.mid)


def named_schedule(cfg: ScheduleConfig, eps: EpsConfig) -> Ramp:
    """A declared scalar schedule; null warmup/ramp lengths follow the eps schedule's."""
    warmup = eps.warmup_epochs if cfg.warmup_epochs is None else cfg.warmup_epochs
    length = eps.ramp_epochs if cfg.ramp_epochs is None else cfg.ramp_epochs
    return Ramp(cfg.start, cfg.end, cfg.kind, warmup, length, cfg.beta, cfg.mid)


def lr_factor(cfg: LRScheduleConfig, t: float, total_epochs: float, base_lr: float = 1.0) -> float:
    """Multiplier of the base learning rate at time ``t`` (epochs) of a ``total_epochs`` run.

    ``constant``: 1. ``step``: ``gamma ** (number of milestones <= t)``. ``cosine``: from 1
    to ``min_lr / base_lr`` along a half cosine over the epochs after warmup and ``hold_epochs``. ``warmup``:
    constant after warmup. Every kind starts with a linear warmup over ``warmup_epochs``
    (factor ``t / warmup_epochs``; the trainer evaluates the LR of a step at the step's end,
    so the first step never has learning rate 0).
    """
    w = cfg.warmup_epochs
    if w > 0 and t < w:
        return max(t / w, 0.0)
    if cfg.kind == "step":
        return cfg.gamma ** bisect.bisect_right(list(cfg.milestones), t)
    if cfg.kind == "cosine":
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        h = w + cfg.hold_epochs  # full lr until warmup + hold, then the half cosine
        span = max(total_epochs - h, 1e-12)
        u = min(max((t - h) / span, 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * u))
    return 1.0
