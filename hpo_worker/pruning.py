"""Pruning: stopping a trial that is clearly behind, from the learning curves in the store (docs/hpo.md).

While a trial trains, its worker stores the trial's intermediate values (:class:`Report`: the objective's metric at
a step, and that step's fraction of the trial's budget; :func:`hpo_worker.trial.intermediate_values`) and asks the
experiment's pruner whether to stop it. A pruner is a pure decision on curves (:func:`prune_reason`), so it is
tested on hand-made curves; the worker (:mod:`hpo_worker.curves`) feeds it what the store holds. Smaller values
are better, as for TPE's loss. Two rules:

- ``median`` (median stopping): after ``warmup_steps``, stop the trial when its best value so far is worse than the
  median of the completed trials' best values up to the same step, once ``min_trials`` trials have completed.
- ``asha`` (asynchronous successive halving): rungs at the budget fractions ``min_fraction * reduction_factor**k``
  below 1. When a trial first reaches a rung, it goes on only if its best value so far is among the best
  ``1/reduction_factor`` of the values of every trial that reached that rung (at least the best one goes on).

And one exact stop for the ``steps_to_target`` objective, with either rule or alone (``behind_best``): a trial that
has not reached the target by the step at which an earlier completed trial (a smaller tid) reached it can no longer
beat that trial, so it stops there. The best of every prefix of the trials, in tid order, is what it would have
been without the stop (:func:`behind_best_reason`).

And one stop for a trial that has not left the bad end of the objective (``threshold``, with either rule or alone;
Optuna's ThresholdPruner, on best-so-far values): once it has trained ``threshold_after`` of its budget, a trial
whose best value so far is still at or above ``threshold`` stops (:func:`threshold_reason`). For steps_to_target,
a threshold of 1 + target - 0.11 stops a 10-class run whose best accuracy is still at most 11%: a collapsed run,
which otherwise trains to the end of its budget because no rule compares it with enough completed trials yet.
Unlike the behind-best stop it is not exact: a trial could leave that end later.

Our choices where the usual descriptions differ: both rules compare best-so-far values, not the value at one
step, so that evaluation noise does not prune a good trial; a completed trial whose curve ended before a step or a
rung (it reached its target and stopped) counts there with its final best value, since it would not get worse.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from hpo_worker.store import TrialState

__all__ = [
    "AT_THRESHOLD", "BEHIND_BEST", "PRUNED_HISTORY", "PRUNERS", "PrunerSettings", "Report", "asha_rungs",
    "behind_best_reason", "check_objective", "curve_of", "prune_reason", "tell_pruned", "threshold_reason",
]  # fmt: skip

PRUNERS: Final = ("none", "median", "asha")
BEHIND_BEST: Final = "behind the best:"  # how the reason of a trial stopped by the behind-best stop begins
AT_THRESHOLD: Final = "threshold:"  # how the reason of a trial stopped by the threshold stop begins
PRUNED_HISTORY: Final = ("last", "ignore")  # what TPE sees of a pruned trial: its last value as its loss, or nothing


@dataclass(frozen=True)
class Report:
    """One intermediate value of a trial: the objective's metric after ``step`` steps, ``fraction`` of its budget."""

    step: int
    fraction: float
    value: float


@dataclass(frozen=True)
class PrunerSettings:
    name: str = "none"
    warmup_steps: int = 0  # median: no decision before this step (required, at least 1)
    min_trials: int = 1  # median: completed trials needed before any decision
    min_fraction: float = 0.1  # asha: the first rung, as a fraction of the budget
    reduction_factor: int = 3  # asha: one trial in reduction_factor goes on at each rung
    pruned_history: str = "last"  # PRUNED_HISTORY
    behind_best: bool = False  # steps_to_target: stop where an earlier completed trial had reached the target
    threshold: float | None = None  # stop a trial whose best value is still >= this ...
    threshold_after: float = 0.0  # ... once it has trained this fraction of its budget

    def __post_init__(self) -> None:
        if not isinstance(self.behind_best, bool):
            raise ValueError(f"behind_best must be true or false, not {self.behind_best!r}")
        self._check_threshold()
        if self.name not in PRUNERS:
            raise ValueError(f"unknown pruner {self.name!r}: choose one of {', '.join(PRUNERS)}")
        if self.pruned_history not in PRUNED_HISTORY:
            raise ValueError(
                f"unknown pruned-trial history {self.pruned_history!r}: choose one of {', '.join(PRUNED_HISTORY)}"
            )
        if self.name == "median" and self.warmup_steps < 1:
            raise ValueError(
                f"the median pruner needs warm-up steps (--prune-warmup-steps, now {self.warmup_steps}): give the "
                "steps every trial trains before it can be stopped, at least 1 (e.g. a tenth of the budget)"
            )
        if self.min_trials < 1:
            raise ValueError(f"--prune-min-trials must be at least 1, not {self.min_trials}")
        if self.name == "asha" and self.reduction_factor < 2:
            raise ValueError(
                f"ASHA's reduction factor must be an integer of at least 2 (--asha-reduction-factor, now "
                f"{self.reduction_factor}): below 2 no trial is ever stopped"
            )
        if self.name == "asha" and not 0 < self.min_fraction < 1:
            raise ValueError(
                f"ASHA's first rung must be a fraction of the budget in (0, 1) (--asha-min-fraction, now "
                f"{self.min_fraction:g})"
            )

    def _check_threshold(self) -> None:
        if self.threshold is None:
            if self.threshold_after:
                raise ValueError("threshold_after needs a threshold (--prune-threshold): give both, or neither")
            return
        if not isinstance(self.threshold, int | float) or not math.isfinite(self.threshold):
            raise ValueError(f"the pruning threshold must be a finite number, not {self.threshold!r}")
        if not 0 <= self.threshold_after < 1:
            raise ValueError(
                f"threshold_after (--prune-threshold-after) is the fraction of its budget a trial trains before the "
                f"threshold applies, in [0, 1), not {self.threshold_after!r}"
            )

    @property
    def active(self) -> bool:
        """Whether any trial can be stopped (a rule, the behind-best stop or the threshold stop)."""
        return self.name != "none" or self.behind_best or self.threshold is not None

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        # Left out when off, as in experiments stored before these stops existed: they compare equal.
        if not self.behind_best:
            del doc["behind_best"]
        if self.threshold is None:
            del doc["threshold"], doc["threshold_after"]
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> PrunerSettings:
        """The settings stored in an experiment document (none: an experiment made without pruning)."""
        return cls(**dict(doc)) if doc else cls()


def check_objective(settings: PrunerSettings, objective: str) -> None:
    """Raises ValueError when ``settings`` do not apply to ``objective``."""
    if settings.behind_best and objective != "steps_to_target":
        raise ValueError(
            f"the behind-best stop needs the steps_to_target objective (it reads a trial's value as the budget "
            f"fraction at which it reached the target), not {objective!r}: drop behind_best or change the objective"
        )


def asha_rungs(settings: PrunerSettings) -> list[float]:
    """The budget fractions at which ASHA decides: min_fraction * reduction_factor**k, below 1."""
    rungs, fraction = [], settings.min_fraction
    while fraction < 1 - 1e-12:
        rungs.append(fraction)
        fraction *= settings.reduction_factor
    return rungs


def curve_of(doc: Mapping[str, Any]) -> list[Report]:
    """A trial document's stored intermediate values (``intermediate``: ``[{step, fraction, value}]``)."""
    return [Report(int(r["step"]), float(r["fraction"]), float(r["value"])) for r in doc.get("intermediate") or []]


def _best(curve: Sequence[Report], *, step: int | None = None, fraction: float | None = None) -> float | None:
    """The best value of the reports up to ``step`` (or up to ``fraction``), None when there is none."""
    values = [
        r.value
        for r in curve
        if (step is None or r.step <= step) and (fraction is None or r.fraction <= fraction + 1e-12)
    ]
    return min(values) if values else None


def _median_reason(
    own: Sequence[Report], completed: Sequence[Sequence[Report]], settings: PrunerSettings
) -> str | None:
    step = own[-1].step
    if step < settings.warmup_steps:
        return None
    others = [value for curve in completed if (value := _best(curve, step=step)) is not None]
    if len(others) < settings.min_trials:
        return None
    median, mine = statistics.median(others), min(r.value for r in own)
    if mine <= median:
        return None
    return (
        f"median stopping: best value {mine:.6g} by step {step} is worse than the median {median:.6g} of "
        f"{len(others)} completed trial(s)"
    )


def _at_rung(curve: Sequence[Report], rung: float, completed: bool) -> float | None:
    """A trial's value at a rung: its best up to its first report at or past the rung; a completed trial that
    stopped before the rung counts with its final best; else None (it has not reached the rung)."""
    reached = [i for i, r in enumerate(curve) if r.fraction >= rung - 1e-12]
    if reached:
        return min(r.value for r in curve[: reached[0] + 1])
    return _best(curve) if completed else None


def _asha_reason(
    own: Sequence[Report], others: Sequence[tuple[Sequence[Report], bool]], settings: PrunerSettings
) -> str | None:
    before = own[-2].fraction if len(own) > 1 else 0.0
    for rung in asha_rungs(settings):
        if not before < rung <= own[-1].fraction + 1e-12:
            continue  # only the rungs this report reaches for the first time
        mine = _at_rung(own, rung, False)
        assert mine is not None
        values = sorted([v for curve, done in others if (v := _at_rung(curve, rung, done)) is not None] + [mine])
        keep = max(len(values) // settings.reduction_factor, 1)
        if mine > values[keep - 1]:
            return (
                f"ASHA: value {mine:.6g} at rung {rung:.3g} of the budget is not among the best {keep} of "
                f"{len(values)} trial(s) there (reduction factor {settings.reduction_factor})"
            )
    return None


def behind_best_reason(own: Sequence[Report], earlier: Sequence[Sequence[Report]]) -> str | None:
    """The exact stop of ``steps_to_target``: ``own`` has not reached the target (its values are 1 + the accuracy
    missing, above 1), and its last report is at or past the budget fraction at which one of the ``earlier``
    completed trials reached it (a value of at most 1). Its steps to target, if it ever reaches it, are then more
    than that trial's, so no prefix of the trials that contains both has a different best without it."""
    if not own or min(r.value for r in own) <= 1.0:
        return None
    reached = [min(curve, key=lambda r: r.value) for curve in earlier if curve]
    reached = [r for r in reached if r.value <= 1.0]
    if not reached:
        return None
    best = min(reached, key=lambda r: r.value)
    if own[-1].fraction < best.value - 1e-12:
        return None
    return (
        f"{BEHIND_BEST} not at the target by step {own[-1].step}, where an earlier trial had reached it "
        f"(step {best.step}); it can no longer need fewer steps"
    )


def threshold_reason(own: Sequence[Report], settings: PrunerSettings) -> str | None:
    """The threshold stop: ``own`` has trained at least ``threshold_after`` of its budget and its best value so far
    is still at or above ``threshold``."""
    if settings.threshold is None or not own or own[-1].fraction < settings.threshold_after - 1e-12:
        return None
    best = min(r.value for r in own)
    if best < settings.threshold:
        return None
    return (
        f"{AT_THRESHOLD} best value {best:.6g} by step {own[-1].step} ({own[-1].fraction:.0%} of the budget) is still "
        f"at or above {settings.threshold:g}"
    )


def prune_reason(
    settings: PrunerSettings,
    own: Sequence[Report],
    others: Sequence[tuple[Sequence[Report], bool]],
    earlier: Sequence[Sequence[Report]] = (),
) -> str | None:
    """Why the trial whose curve is ``own`` should stop now (after its last report), or None to let it go on.

    ``others``: the other trials' curves, each with whether that trial completed (finished its budget or its
    target); running and pruned ones count only where their curves reach. ``earlier``: the curves of the completed
    trials with smaller tids (the behind-best stop)."""
    if not own:
        return None
    if settings.behind_best and (reason := behind_best_reason(own, earlier)) is not None:
        return reason
    if (reason := threshold_reason(own, settings)) is not None:
        return reason
    if settings.name == "none":
        return None
    if settings.name == "median":
        return _median_reason(own, [curve for curve, done in others if done], settings)
    return _asha_reason(own, others, settings)


def tell_pruned(docs: Sequence[Mapping[str, Any]], how: str) -> list[Mapping[str, Any]]:
    """``docs`` as TPE should see pruned trials (``how`` in :data:`PRUNED_HISTORY`): done, with their last value as
    their loss (``last``), or left out (``ignore``). Only the driver's in-memory copy; the store keeps them pruned."""
    if how not in PRUNED_HISTORY:
        raise ValueError(f"unknown pruned-trial history {how!r}: choose one of {', '.join(PRUNED_HISTORY)}")
    told: list[Mapping[str, Any]] = []
    for doc in docs:
        loss = (doc.get("result") or {}).get("loss")
        if doc.get("state") != TrialState.PRUNED:
            told.append(doc)
        elif how == "last" and loss is not None:
            told.append({**doc, "state": TrialState.DONE, "result": {"status": "ok", "loss": float(loss)}})
    return told
