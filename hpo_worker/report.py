"""Reports on an experiment's trials: best trial, mean of the top k, CSV export, plots.

Everything works on trial documents in hyperopt's schema (``tid``, ``state``, ``result`` with ``loss``, ``status``
and optionally ``test_accuracy``, ``misc.vals`` as ``{label: [value]}``), so it runs on a list of dicts as well as
on what the store reads from MongoDB.

The top-k mean follows the skip-connection study (``../shared/seeds/000_*.txt``, section on the experiments): 300
trials per setting, the mean over the best 100. That study ranks by training accuracy; here trials are ranked by
their ``loss``, the objective TPE minimised.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hpo_worker.store import TrialState
from jobs.files import atomic_write_text

__all__ = [
    "format_report", "mean_std", "plot", "summarize", "trial_params", "trials_json", "write_csv", "write_trials_json",
]  # fmt: skip


def trial_params(trial: Mapping[str, Any]) -> dict[str, Any]:
    """``misc.vals`` as ``{label: value}``; labels with an empty list (inactive in a conditional space) are left out."""
    vals = trial.get("misc", {}).get("vals", {})
    params: dict[str, Any] = {}
    for label, value in vals.items():
        if isinstance(value, list | tuple):
            if value:
                params[label] = value[0]
        elif value is not None:
            params[label] = value
    return params


def _loss(trial: Mapping[str, Any]) -> float | None:
    """The trial's loss if it finished with status ok and a finite loss; None otherwise."""
    if trial.get("state") != TrialState.DONE:
        return None
    result = trial.get("result") or {}
    if result.get("status") != "ok":
        return None
    loss = result.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, int | float) or not math.isfinite(loss):
        return None
    return float(loss)


def _accuracy(trial: Mapping[str, Any]) -> float | None:
    value = (trial.get("result") or {}).get("test_accuracy")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _ranked(trials: Iterable[Mapping[str, Any]]) -> list[tuple[float, Mapping[str, Any]]]:
    """Finished trials with a loss, best first (ties by tid, so the order is stable)."""
    scored = [(loss, trial) for trial in trials if (loss := _loss(trial)) is not None]
    scored.sort(key=lambda pair: (pair[0], pair[1].get("tid", 0)))
    return scored


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(trials: Sequence[Mapping[str, Any]], top_k: int = 100) -> dict[str, Any]:
    """Counts, the best trial and the mean/std of loss and test accuracy over the ``top_k`` best finished trials.

    Trials in error, pruned, still running, or done without an ok status and a finite loss are counted but never
    ranked.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ranked = _ranked(trials)
    top = ranked[:top_k]
    losses = [loss for loss, _ in top]
    accuracies = [acc for _, trial in top if (acc := _accuracy(trial)) is not None]
    loss_mean, loss_std = mean_std(losses)
    acc_mean, acc_std = mean_std(accuracies)
    best = None
    if ranked:
        best_loss, best_trial = ranked[0]
        best = {
            "tid": best_trial.get("tid"),
            "loss": best_loss,
            "test_accuracy": _accuracy(best_trial),
            "params": trial_params(best_trial),
        }
    states = [trial.get("state") for trial in trials]
    return {
        "n_trials": len(trials),
        "n_done": states.count(TrialState.DONE),
        "n_error": states.count(TrialState.ERROR),
        "n_pruned": states.count(TrialState.PRUNED),  # stopped early: counted, never ranked
        "n_ranked": len(ranked),
        "best": best,
        "top_k": {
            "requested": top_k,
            "k": len(top),  # fewer than requested when fewer trials finished
            "loss_mean": loss_mean,
            "loss_std": loss_std,
            "test_accuracy_n": len(accuracies),
            "test_accuracy_mean": acc_mean,
            "test_accuracy_std": acc_std,
        },
    }


def _timestamp(value: Any) -> str | None:
    """ISO text of a stored time (a datetime from MongoDB; some servers hand back text already)."""
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def trials_json(trials: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One plain-JSON record per trial (learning curves left out): what other programs (``study``) read."""
    records = []
    for trial in trials:
        result = {k: v for k, v in (trial.get("result") or {}).items() if k != "learning_curve"}
        records.append(
            {
                "tid": trial.get("tid"),
                "state": trial.get("state"),
                "params": trial_params(trial),
                "overrides": list((trial.get("spec") or {}).get("overrides", [])),
                "result": result,
                "error": (trial.get("misc") or {}).get("error"),
                "owner": trial.get("owner"),
                "attempts": trial.get("attempts"),
                **{k: _timestamp(trial.get(k)) for k in ("book_time", "refresh_time")},
            }
        )
    return records


def write_trials_json(trials: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """:func:`trials_json` of ``trials`` written to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(trials_json(trials), indent=1) + "\n")
    return path


def _param_labels(trials: Iterable[Mapping[str, Any]]) -> list[str]:
    labels: set[str] = set()
    for trial in trials:
        labels.update(trial_params(trial))
    return sorted(labels)


def write_csv(trials: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per trial in tid order: tid, state, loss, test_accuracy, then every parameter (empty if unset)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = _param_labels(trials)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tid", "state", "loss", "test_accuracy", *labels])
        for trial in sorted(trials, key=lambda t: t.get("tid", 0)):
            result = trial.get("result") or {}
            params = trial_params(trial)
            loss = result.get("loss")
            accuracy = result.get("test_accuracy")
            writer.writerow(
                [
                    trial.get("tid"),
                    trial.get("state"),
                    "" if loss is None else loss,
                    "" if accuracy is None else accuracy,
                    *("" if params.get(label) is None else params[label] for label in labels),
                ]
            )
    return path


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _wants_log_axis(values: Sequence[float]) -> bool:
    """Without knowledge of the distribution: log when all values are positive and span two decades or more."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def plot(
    trials: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    log_scale_labels: Collection[str] | None = None,
) -> list[Path]:
    """PNG plots in ``out_dir``: ``loss_by_trial.png`` and ``param_<label>.png`` (loss against each parameter).

    ``log_scale_labels`` are the labels drawn on a log x-axis (``SearchSpace.log_scale_labels``); when None, a
    parameter gets a log axis if its values are positive and span at least two decades. Only ranked trials (done,
    status ok, finite loss) are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot's import
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranked = sorted(_ranked(trials), key=lambda pair: pair[1].get("tid", 0))
    written: list[Path] = []

    figure, axes = plt.subplots(figsize=(7, 4))
    tids = [trial.get("tid", 0) for _, trial in ranked]
    losses = [loss for loss, _ in ranked]
    axes.scatter(tids, losses, s=12, label="trial")
    best_so_far = [min(losses[: i + 1]) for i in range(len(losses))]
    axes.plot(tids, best_so_far, color="tab:red", label="best so far")
    axes.set_xlabel("trial id")
    axes.set_ylabel("loss")
    axes.set_title("loss by trial")
    if ranked:
        axes.legend()
    path = out / "loss_by_trial.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    written.append(path)

    for label in _param_labels(trial for _, trial in ranked):
        points = [
            (float(value), loss)
            for loss, trial in ranked
            if isinstance(value := trial_params(trial).get(label), int | float) and not isinstance(value, bool)
        ]
        if not points:  # e.g. a choice of strings: nothing to put on a numeric axis
            continue
        xs = [x for x, _ in points]
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.scatter(xs, [y for _, y in points], s=12)
        log_x = label in log_scale_labels if log_scale_labels is not None else _wants_log_axis(xs)
        if log_x and min(xs) > 0:
            axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.set_ylabel("loss")
        axes.set_title(f"loss against {label}")
        path = out / f"param_{_file_name(label)}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _number(value: float | None, spec: str = ".6g") -> str:
    return "-" if value is None else format(value, spec)


def format_report(summary: Mapping[str, Any]) -> str:
    """The summary as a text table for the terminal."""
    top = summary["top_k"]
    lines = [
        f"trials: {summary['n_trials']}  done: {summary['n_done']}  pruned: {summary.get('n_pruned', 0)}  "
        f"error: {summary['n_error']}  ranked: {summary['n_ranked']}",
    ]
    best = summary.get("best")
    if best is None:
        lines.append("best: no finished trial yet")
    else:
        lines.append(
            f"best: trial {best['tid']}  loss {_number(best['loss'])}  "
            f"test accuracy {_number(best.get('test_accuracy'))}"
        )
        width = max((len(label) for label in best["params"]), default=0)
        lines += [
            f"  {label:<{width}}  {_number(value) if isinstance(value, int | float) else value}"
            for label, value in sorted(best["params"].items())
        ]
    lines.append(f"top {top['k']} of {summary['n_ranked']} (requested {top['requested']}):")
    lines.append(f"  {'':<14}{'mean':>14}{'std':>14}")
    lines.append(f"  {'loss':<14}{_number(top['loss_mean']):>14}{_number(top['loss_std']):>14}")
    lines.append(
        f"  {'test accuracy':<14}{_number(top['test_accuracy_mean']):>14}{_number(top['test_accuracy_std']):>14}"
        + (f"  ({top['test_accuracy_n']} with accuracy)" if top["test_accuracy_n"] != top["k"] else "")
    )
    return "\n".join(lines)
