"""The sampled estimate of `certorch certify --sample`: sound bounds, exact when the whole pool is run,
an interval that covers the truth at its nominal rate."""
from __future__ import annotations

import random

import pytest

from certorch.cli.certify import sample_indices, sampled_estimate


def _rows(verdicts):
    return [{"verdict": v} for v in verdicts]


def test_sample_indices_is_a_seeded_prefix_of_one_permutation():
    pool = list(range(100, 200))
    small, big = sample_indices(pool, 10, seed=3), sample_indices(pool, 30, seed=3)
    assert big[:10] == small and len(set(big)) == 30 and set(big) <= set(pool)
    assert sample_indices(pool, 10, seed=3) == small and sample_indices(pool, 10, seed=4) != small
    assert sample_indices(pool, None, seed=3) == pool and sample_indices(pool, 500, seed=3) == pool


def test_whole_pool_sampled_gives_the_exact_count():
    carried = _rows(["verified"] * 3 + ["falsified"] * 2)
    sampled = _rows(["verified"] * 4 + ["timeout"] * 1)
    est = sampled_estimate(carried, sampled, population=10, pool=5)
    assert est["certified_estimate"] == est["certified_lower"] == 0.7
    assert est["certified_ci95"] == [0.7, 0.7] and est["certified_upper"] == 0.8


def test_bounds_are_the_proved_and_the_not_refuted_counts():
    carried = _rows(["verified"] * 10 + ["falsified"] * 5 + ["not_verified"] * 5)
    sampled = _rows(["verified"] * 5 + ["timeout"] * 3 + ["falsified"] * 2)
    est = sampled_estimate(carried, sampled, population=100, pool=80)
    assert est["certified_lower"] == pytest.approx(0.15) and est["certified_upper"] == pytest.approx(0.88)
    assert est["certified_estimate"] == pytest.approx((10 + 80 * 0.5) / 100)
    lo, hi = est["certified_ci95"]
    assert 0.15 <= lo < est["certified_estimate"] < hi <= 0.88


def test_a_sample_of_most_of_the_pool_gives_a_narrow_interval_around_the_estimate():
    """The finite-population correction shrinks the interval, around the sample's own fraction."""
    est = sampled_estimate([], _rows(["verified"] * 45 + ["timeout"] * 45), population=100, pool=100)
    lo, hi = est["certified_ci95"]
    assert est["certified_estimate"] == pytest.approx(0.5)
    assert 0.46 < lo < 0.5 < hi < 0.54


def test_interval_covers_the_truth_at_about_95_percent():
    rng = random.Random(0)
    pool = ["verified"] * 300 + ["timeout"] * 700
    truth = 300 / 1000
    covered = 0
    for _ in range(400):
        est = sampled_estimate([], _rows(rng.sample(pool, 60)), population=1000, pool=1000)
        lo, hi = est["certified_ci95"]
        covered += lo <= truth <= hi
    assert 0.91 <= covered / 400 <= 0.99


def test_nothing_sampled_gives_only_the_bounds():
    est = sampled_estimate(_rows(["verified"]), [], population=4, pool=3)
    assert est["certified_ci95"] == [0.25, 1.0] and est["certified_estimate"] != est["certified_estimate"]


def test_an_empty_pool_gives_the_exact_count():
    est = sampled_estimate(_rows(["verified", "falsified"]), [], population=2, pool=0)
    assert est["certified_estimate"] == 0.5 and est["certified_ci95"] == [0.5, 0.5]
