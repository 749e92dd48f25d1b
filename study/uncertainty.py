"""How sure a critical-batch study is: intervals on each cell's steps to target and on the S(B) fit.

Three sources of uncertainty, each with its own interval:

- **The search.** A cell's best steps to target is the minimum over its tuning trials; another search of the same
  budget would have drawn other trials. :func:`bootstrap_best_of_trials` resamples the trials with replacement and
  takes the minimum each time. A bootstrap of a minimum is biased towards the observed best (the best trial is in
  most resamples), so it shows the spread of the search, not a calibrated interval. :func:`budget_halves` adds the
  plain check: the best of the first half of the trials against the best of all.
- **The seed.** The best setting is trained again over several seeds; :func:`bootstrap_mean` gives the interval of
  the mean steps to target. It is the *expanded percentile* bootstrap (Hesterberg 2015, "What teachers should know
  about the bootstrap", section 6.2): the percentile interval of the resampled means of the logarithms, with its
  tail probability narrowed so that it widens like a t interval for few seeds; plain percentile intervals cover too
  rarely below about 20 values. Steps are positive and their noise multiplicative, hence the logarithms.
- **The fit.** :func:`fit_interval` refits S(B) = S_min (1 + B_crit / B) to resampled seed repeats of every batch
  size (each cell resampled on its own) and reports percentile intervals of B_crit and S_min.

Coverage of the first and the last is checked on synthetic data with known values (``tests/test_uncertainty.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from study.fit import fit_steps_to_target

__all__ = ["Interval", "bootstrap_best_of_trials", "bootstrap_mean", "budget_halves", "fit_interval"]


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval at ``level`` (0.9 = 90%); ``low``/``high`` may be inf (none reached)."""

    estimate: float
    low: float
    high: float
    level: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def text(self, digits: int = 0) -> str:
        """``"120 [104, 141]"``: the estimate and the interval, for reports (∞: none reached the target)."""

        def number(value: float) -> str:
            return f"{value:.{digits}f}" if math.isfinite(value) else "∞"

        return f"{number(self.estimate)} [{number(self.low)}, {number(self.high)}]"


def _reached(steps: Sequence[float | None]) -> np.ndarray:
    """Steps as floats, with runs that never reached the target (None, NaN, not positive) as +inf."""
    values = [float(s) if s is not None and math.isfinite(float(s)) and float(s) > 0 else math.inf for s in steps]
    return np.asarray(values, dtype=float)


def _expanded_alpha(level: float, n: int) -> float:
    """The two-sided tail probability the expanded percentile interval uses for ``n`` values (Hesterberg 2015)."""
    from scipy import stats  # the analysis's dependency (the study extra), as in study/fit.py

    t = stats.t.ppf(1 - (1 - level) / 2, n - 1)
    return float(2 * stats.norm.sf(math.sqrt(n / (n - 1)) * t))


def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean(log(values))) of positive ``values``: the mean of steps to target, which spread multiplicatively."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, level: float = 0.9, resamples: int = 4000, seed: int = 0
) -> Interval:
    """The geometric mean of positive ``values`` (e.g. steps to target over seeds) with its expanded percentile
    bootstrap interval. Needs at least 2 values."""
    data = np.log(np.asarray(values, dtype=float))
    if len(data) < 2 or not np.all(np.isfinite(data)):
        raise ValueError(f"bootstrap_mean needs at least 2 positive finite values, got {list(values)}")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    alpha = _expanded_alpha(level, len(data))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(math.exp(data.mean())), float(math.exp(low)), float(math.exp(high)), level)


def bootstrap_best_of_trials(
    steps: Sequence[float | None], level: float = 0.9, resamples: int = 4000, seed: int = 0
) -> Interval:
    """The fewest steps to target among a cell's trials, and the percentile interval of that minimum over trials
    resampled with replacement (inf where a resample holds no trial that reached the target)."""
    data = _reached(steps)
    if len(data) == 0:
        raise ValueError("bootstrap_best_of_trials needs at least one trial")
    rng = np.random.default_rng(seed)
    best = data[rng.integers(0, len(data), size=(resamples, len(data)))].min(axis=1)
    # Order statistics without interpolation: between two resamples that missed, inf - inf would give NaN.
    low, high = np.quantile(best, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return Interval(float(data.min()), float(low), float(high), level)


def budget_halves(steps_in_trial_order: Sequence[float | None]) -> tuple[float, float]:
    """The best steps to target of the first half of the trials (in the order the search ran them) and of all:
    equal when the second half of the budget found nothing better (inf: none reached the target)."""
    data = _reached(steps_in_trial_order)
    if len(data) < 2:
        raise ValueError("budget_halves needs at least 2 trials")
    return float(data[: len(data) // 2].min()), float(data.min())


def fit_interval(
    repeats: Mapping[int, Sequence[float] | np.ndarray], level: float = 0.9, resamples: int = 1000, seed: int = 0
) -> dict[str, Interval]:
    """Intervals on the S(B) fit's ``b_crit`` and ``s_min`` from the seed repeats of each batch size's best setting.

    Each resample draws, for every batch size, its repeats with replacement, and fits S(B) to the geometric means;
    the estimate is the fit to the geometric means of all repeats. Batch sizes need at least one repeat each (one
    repeat contributes no spread), and at least two batch sizes are needed.
    """
    batches = sorted(b for b, values in repeats.items() if len(values) > 0)
    logs = {b: np.log(np.asarray(repeats[b], dtype=float)) for b in batches}
    estimate = fit_steps_to_target(batches, [math.exp(logs[b].mean()) for b in batches])
    rng = np.random.default_rng(seed)
    b_crit, s_min = [], []
    for _ in range(resamples):
        steps = [math.exp(logs[b][rng.integers(0, len(logs[b]), len(logs[b]))].mean()) for b in batches]
        fit = fit_steps_to_target(batches, steps)
        b_crit.append(fit.b_crit)
        s_min.append(fit.s_min)
    tails = [(1 - level) / 2, (1 + level) / 2]
    b_low, b_high = np.quantile(b_crit, tails)
    s_low, s_high = np.quantile(s_min, tails)
    return {
        "b_crit": Interval(estimate.b_crit, float(b_low), float(b_high), level),
        "s_min": Interval(estimate.s_min, float(s_low), float(s_high), level),
    }
