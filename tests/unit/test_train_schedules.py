"""Schedules: values at key points, monotonicity, smoothness."""
from __future__ import annotations

import math

import pytest

from certorch.config import EpsConfig, LRScheduleConfig, ScheduleConfig
from certorch.train.schedules import Ramp, eps_schedule, lr_factor, named_schedule, smooth_ramp

GRID = [i / 100 for i in range(0, 1001)]  # 0 .. 10 epochs


def test_linear_eps_key_points():
    r = eps_schedule(EpsConfig(value=0.3, schedule="linear", warmup_epochs=2, ramp_epochs=4))
    assert r(0) == 0 and r(1.99) == 0 and r(2) == 0
    assert r(4) == pytest.approx(0.15)
    assert r(6) == pytest.approx(0.3) and r(9) == pytest.approx(0.3)


@pytest.mark.parametrize("kind", ["linear", "smooth"])
def test_eps_monotone_and_bounded(kind):
    r = eps_schedule(EpsConfig(value=0.1, schedule=kind, warmup_epochs=1, ramp_epochs=5))
    vals = [r(t) for t in GRID]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert min(vals) == 0 and max(vals) == pytest.approx(0.1)


def test_smooth_ramp_is_c1_and_hits_endpoints():
    beta, mid = 4.0, 0.25
    assert smooth_ramp(0.0, beta, mid) == 0 and smooth_ramp(1.0, beta, mid) == pytest.approx(1.0)
    h = 1e-6
    left = (smooth_ramp(mid - h, beta, mid) - smooth_ramp(mid - 2 * h, beta, mid)) / h
    right = (smooth_ramp(mid + 2 * h, beta, mid) - smooth_ramp(mid + h, beta, mid)) / h
    assert left == pytest.approx(right, rel=1e-3)
    assert smooth_ramp(0.1, beta, mid) < 0.1  # slow start, below the linear ramp


def test_smooth_with_zero_mid_is_linear():
    assert smooth_ramp(0.37, 4.0, 0.0) == pytest.approx(0.37)


def test_constant_schedule_is_target_from_start():
    r = eps_schedule(EpsConfig(value=0.2, schedule="constant", warmup_epochs=3, ramp_epochs=3))
    assert r(0) == 0.2 and r(10) == 0.2


def test_exp_schedule_is_geometric():
    r = Ramp(8.0, 1000.0, "exp", warmup=0, length=2)
    assert r(0) == pytest.approx(8.0) and r(2) == pytest.approx(1000.0)
    assert r(1) == pytest.approx(math.sqrt(8.0 * 1000.0))


def test_named_schedule_follows_eps_lengths():
    eps = EpsConfig(value=0.1, warmup_epochs=1, ramp_epochs=2)
    kappa = named_schedule(ScheduleConfig(start=1.0, end=0.0), eps)
    assert kappa(0.5) == 1.0 and kappa(2) == pytest.approx(0.5) and kappa(5) == 0.0
    vals = [kappa(t) for t in GRID]
    assert all(b <= a for a, b in zip(vals, vals[1:]))


def test_lr_step_and_warmup():
    cfg = LRScheduleConfig(kind="step", milestones=[3, 6], gamma=0.1, warmup_epochs=1)
    assert lr_factor(cfg, 0.5, 10) == pytest.approx(0.5)
    assert lr_factor(cfg, 2, 10) == 1.0
    assert lr_factor(cfg, 3, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 7, 10) == pytest.approx(0.01)


def test_lr_cosine_endpoints():
    cfg = LRScheduleConfig(kind="cosine", min_lr=0.001)
    assert lr_factor(cfg, 0, 10, base_lr=0.1) == pytest.approx(1.0)
    assert lr_factor(cfg, 5, 10, base_lr=0.1) == pytest.approx(0.505)
    assert lr_factor(cfg, 10, 10, base_lr=0.1) == pytest.approx(0.01)
