"""hpo_worker.report on hand-made trial documents in hyperopt's schema (no database)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from hpo_worker.report import format_report, plot, summarize, write_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _trial(tid: int, state: int, loss: float | None, accuracy: float | None = None, **vals: float) -> dict[str, Any]:
    result: dict[str, Any] = {"status": "ok" if state == 2 else "new"}
    if state == 3:
        result = {"status": "fail", "error": "diverged"}
    if loss is not None:
        result["loss"] = loss
    if accuracy is not None:
        result["test_accuracy"] = accuracy
    return {
        "tid": tid,
        "state": state,
        "result": result,
        "misc": {"tid": tid, "vals": {label: [value] for label, value in vals.items()}, "idxs": {}},
    }


# loss, test accuracy, lr, momentum
DONE = [
    (0.9, 0.70, 0.5, 0.9),
    (0.3, 0.91, 0.01, 0.8),
    (0.5, 0.85, 0.001, 0.95),
    (0.2, 0.93, 0.02, 0.85),
    (0.7, 0.75, 0.0001, 0.6),
    (0.4, None, 0.05, 0.7),  # a run that reported no accuracy
]


def _trials() -> list[dict[str, Any]]:
    trials = [_trial(tid, 2, loss, acc, lr=lr, momentum=m) for tid, (loss, acc, lr, m) in enumerate(DONE)]
    # an error with a better-looking loss must never be ranked; nor a done trial whose status is not ok
    trials.append(_trial(6, 3, 0.01, 0.99, lr=0.3, momentum=0.9))
    failed = _trial(7, 2, 0.05, None, lr=0.2, momentum=0.9)
    failed["result"]["status"] = "fail"
    trials.append(failed)
    trials.append(_trial(8, 1, None, lr=0.1, momentum=0.5))  # still running
    trials.append(_trial(9, 2, math.nan, lr=0.1, momentum=0.5))  # diverged: nan loss
    return trials


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sample_std(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_summary_counts_and_best() -> None:
    summary = summarize(_trials(), top_k=100)
    assert summary["n_trials"] == 10
    assert summary["n_done"] == 8  # six ok, one fail status, one nan
    assert summary["n_error"] == 1
    assert summary["n_ranked"] == 6
    assert summary["best"] == {"tid": 3, "loss": 0.2, "test_accuracy": 0.93, "params": {"lr": 0.02, "momentum": 0.85}}
    top = summary["top_k"]
    assert top["k"] == 6 and top["requested"] == 100
    losses = [row[0] for row in DONE]
    assert top["loss_mean"] == pytest.approx(_mean(losses))
    assert top["loss_std"] == pytest.approx(_sample_std(losses))


def test_summary_top_k_ignores_errors() -> None:
    summary = summarize(_trials(), top_k=3)
    top = summary["top_k"]
    # best three by loss among ok trials: 0.2 (acc .93), 0.3 (.91), 0.4 (no accuracy)
    assert top["k"] == 3
    assert top["loss_mean"] == pytest.approx(0.3)
    assert top["loss_std"] == pytest.approx(0.1)
    assert top["test_accuracy_n"] == 2
    assert top["test_accuracy_mean"] == pytest.approx(0.92)
    assert top["test_accuracy_std"] == pytest.approx(_sample_std([0.93, 0.91]))


def test_summary_of_nothing_finished() -> None:
    summary = summarize([_trial(0, 3, None, lr=0.1), _trial(1, 0, None, lr=0.1)], top_k=5)
    assert summary["best"] is None
    assert summary["top_k"]["k"] == 0 and summary["top_k"]["loss_mean"] is None
    assert "no finished trial" in format_report(summary)
    with pytest.raises(ValueError, match="top_k"):
        summarize([], top_k=0)


def test_format_report_shows_the_numbers() -> None:
    text = format_report(summarize(_trials(), top_k=3))
    assert "best: trial 3" in text
    assert "loss 0.2" in text
    assert "top 3 of 6 (requested 3)" in text
    assert "momentum" in text and "0.85" in text
    assert "(2 with accuracy)" in text


def test_write_csv(tmp_path: Path) -> None:
    trials = _trials()
    path = write_csv(list(reversed(trials)), tmp_path / "out" / "trials.csv")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["tid", "state", "loss", "test_accuracy", "lr", "momentum"]
    assert [int(row["tid"]) for row in rows] == list(range(10))
    assert rows[3] == {
        "tid": "3",
        "state": "2",
        "loss": "0.2",
        "test_accuracy": "0.93",
        "lr": "0.02",
        "momentum": "0.85",
    }
    assert rows[5]["test_accuracy"] == ""
    assert rows[6]["state"] == "3"
    assert rows[8]["loss"] == ""


def test_plot_writes_pngs(tmp_path: Path) -> None:
    paths = plot(_trials(), tmp_path / "plots", log_scale_labels={"lr"})
    names = sorted(path.name for path in paths)
    assert names == ["loss_by_trial.png", "param_lr.png", "param_momentum.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 1000


def test_plot_without_known_scales_and_odd_labels(tmp_path: Path) -> None:
    trials = [_trial(i, 2, 1.0 / (i + 1), **{"optim.lr": 10.0**-i}) for i in range(4)]
    paths = plot(trials, tmp_path)
    assert sorted(path.name for path in paths) == ["loss_by_trial.png", "param_optim.lr.png"]
    assert all(path.read_bytes()[:8] == PNG_SIGNATURE for path in paths)
