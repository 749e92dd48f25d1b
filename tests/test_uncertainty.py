"""Intervals of the critical-batch study (study/uncertainty.py), checked for coverage on synthetic data whose true
values are known. Coverage is a rate, so each check runs many synthetic experiments; the bounds allow the Monte
Carlo error of that many (about 3 standard errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study.uncertainty import bootstrap_best_of_trials, bootstrap_mean, budget_halves, fit_interval

TRUE_S_MIN, TRUE_B_CRIT = 100.0, 500.0
BATCHES = [32 * 2**k for k in range(9)]  # 32 .. 8192, the study's batch sizes


def test_mean_interval_covers_the_true_value_at_about_the_stated_rate() -> None:
    """Five seeds per setting, multiplicative noise of 20%: the 90% interval holds the true geometric mean in 84-96%
    of 300 experiments (the expanded percentile bootstrap; a plain percentile one falls below this at 5 values)."""
    rng = np.random.default_rng(7)
    experiments = 300
    hits = sum(
        bootstrap_mean(120.0 * np.exp(rng.normal(0.0, 0.2, 5)), level=0.9, resamples=2000, seed=i).contains(120.0)
        for i in range(experiments)
    )
    assert 0.84 <= hits / experiments <= 0.96


def test_mean_interval_narrows_with_more_seeds_and_refuses_one_value() -> None:
    rng = np.random.default_rng(3)
    few = bootstrap_mean(100 * np.exp(rng.normal(0, 0.2, 4)))
    many = bootstrap_mean(100 * np.exp(rng.normal(0, 0.2, 40)))
    assert many.high - many.low < few.high - few.low
    with pytest.raises(ValueError, match="at least 2 positive finite values"):
        bootstrap_mean([100.0])


def test_fit_interval_contains_the_known_critical_batch() -> None:
    """S(B) = 100 (1 + 500 / B) at B = 32 .. 8192, five repeats per batch with 15% noise: the 90% interval on B_crit
    holds 500 in at least 75% of 20 synthetic studies, and every interval lies inside the measured range's order."""
    rng = np.random.default_rng(11)
    studies, hits = 20, 0
    for i in range(studies):
        repeats = {b: TRUE_S_MIN * (1 + TRUE_B_CRIT / b) * np.exp(rng.normal(0.0, 0.15, 5)) for b in BATCHES}
        intervals = fit_interval(repeats, level=0.9, resamples=100, seed=i)
        hits += intervals["b_crit"].contains(TRUE_B_CRIT)
        assert intervals["s_min"].low < intervals["s_min"].estimate < intervals["s_min"].high
        assert intervals["b_crit"].low > 50 and intervals["b_crit"].high < 5000
    assert hits / studies >= 0.75


def test_best_of_trials_and_budget_halves() -> None:
    """The best is the fewest steps among the trials that reached the target; resampling keeps it inside the trials'
    range, and an unreached trial (None) counts as never."""
    steps = [400, None, 250, 300, 180, None, 500, 210]
    interval = bootstrap_best_of_trials(steps, level=0.9)
    assert interval.estimate == 180 and interval.low == 180 and 180 < interval.high <= 500
    assert budget_halves(steps) == (250.0, 180.0)  # the second half of the budget found 180
    assert budget_halves([None, None, None, 90]) == (math.inf, 90.0)
    with pytest.raises(ValueError, match="at least one trial"):
        bootstrap_best_of_trials([])


def test_best_of_trials_when_most_trials_missed_the_target() -> None:
    """Resamples that hold no trial that reached the target give an infinite bound, never NaN (inf - inf)."""
    interval = bootstrap_best_of_trials([None] * 9 + [63], level=0.9)
    assert interval.estimate == 63 and interval.low == 63 and interval.high == math.inf
    assert interval.text() == "63 [63, ∞]"
    assert bootstrap_best_of_trials([None, None]).text() == "∞ [∞, ∞]"
