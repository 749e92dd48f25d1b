"""The critical-batch fit of steps to target: S(B) = S_min * (1 + B_crit / B).

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", eq. 2.11): with tuned hyperparameters the number
of optimizer steps to reach a fixed target falls like 1/B for B << B_crit (perfect scaling) and flattens at S_min for
B >> B_crit. B_crit is where doubling the batch stops paying for itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ScalingFit", "fit_steps_to_target"]


@dataclass(frozen=True)
class ScalingFit:
    """S(B) = s_min * (1 + b_crit / B), fitted on ``points`` (batch size, steps) pairs."""

    s_min: float
    b_crit: float
    rms_log_residual: float  # sqrt(mean((log S_fit - log S)^2)): ~ the typical relative error of the fit
    points: int

    def predict(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """Steps to target predicted at ``batch_size`` (a number or an array of them)."""
        if isinstance(batch_size, np.ndarray):
            return self.s_min * (1.0 + self.b_crit / batch_size.astype(float))
        return self.s_min * (1.0 + self.b_crit / float(batch_size))


def _initial_guess(batch: np.ndarray, steps: np.ndarray) -> tuple[float, float]:
    """S_min and B_crit from the linear fit S = a + b / B (a = S_min, b = S_min * B_crit), kept positive.

    The linear fit weights the large step counts (small batches) most, which is why it is only a starting point.
    """
    inv = 1.0 / batch
    b, a = np.polyfit(inv, steps, 1)
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        # Steps flat or rising with B (or the curve is all perfect scaling): start in the middle of the data instead.
        a = float(np.min(steps)) / 2.0
        b = a * float(np.exp(np.mean(np.log(batch))))
    return float(a), float(b / a)


def fit_steps_to_target(batch_sizes: Sequence[float], steps: Sequence[float | None]) -> ScalingFit:
    """Least-squares fit of S(B) = S_min (1 + B_crit / B) in log space (relative error), on log-parameters.

    Pairs whose steps are not positive and finite (e.g. runs that never reached the target) are dropped; several
    pairs may share a batch size. Raises ValueError when fewer than 2 distinct batch sizes remain.
    """
    from scipy.optimize import least_squares  # scipy is only needed by the analysis, not by training

    if len(batch_sizes) != len(steps):
        raise ValueError(f"got {len(batch_sizes)} batch sizes but {len(steps)} step counts: pass one per run")
    pairs = [
        (float(b), float(s))
        for b, s in zip(batch_sizes, steps, strict=True)
        if s is not None and math.isfinite(float(s)) and float(s) > 0 and math.isfinite(float(b)) and float(b) > 0
    ]
    distinct = sorted({b for b, _ in pairs})
    if len(distinct) < 2:
        raise ValueError(
            f"the critical-batch fit needs steps to target at >= 2 distinct batch sizes, got {len(distinct)} "
            f"({distinct or 'none'}) with positive finite steps: run more batch sizes, or lower the target accuracy "
            "so that more of them reach it"
        )
    batch = np.array([b for b, _ in pairs])
    log_steps = np.log(np.array([s for _, s in pairs]))
    s0, c0 = _initial_guess(batch, np.exp(log_steps))

    def residual(p: np.ndarray) -> np.ndarray:
        # log S_min + log(1 + B_crit / B) - log S; logaddexp keeps it finite for any B_crit.
        return p[0] + np.logaddexp(0.0, p[1] - np.log(batch)) - log_steps

    # Bounds keep B_crit from running off to 0 or infinity when the data show no knee: far outside the measured
    # range the fit is flat in B_crit anyway, and a finite value is easier to report than 1e-300.
    lo_b, hi_b = math.log(batch.min()) - 20.0, math.log(batch.max()) + 20.0
    x0 = np.array([math.log(s0), min(max(math.log(c0), lo_b + 1e-6), hi_b - 1e-6)])
    result = least_squares(
        residual,
        x0,
        bounds=([-np.inf, lo_b], [np.inf, hi_b]),
        method="trf",
        x_scale=1.0,
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )
    res = residual(result.x)
    return ScalingFit(
        s_min=float(math.exp(result.x[0])),
        b_crit=float(math.exp(result.x[1])),
        rms_log_residual=float(math.sqrt(float(np.mean(res**2)))),
        points=len(pairs),
    )
