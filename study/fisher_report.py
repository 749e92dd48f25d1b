"""The report of ``python -m study fisher``: seed 003's figures from the runs' ``"fisher"`` records (docs/fisher.md).

Inputs: the study's run rows (``study.runner``); from each run its metrics (the ``"fisher"`` and ``"eval"`` records,
one of each per epoch) and its ``fisher/step_<N>.pt`` files (every example's projection ``a_i`` and gradient norm).
Outputs in the study folder: ``fisher.csv`` (one row per run and record), ``fisher_*.png`` and ``fisher.md``, with
the paper's Figure 6 beside ours and a verdict per claim. "Best" is the epoch of the lowest validation loss (the
paper's "汎化性能が最も高い点", read as the lowest validation loss: our reading).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from jobs.diagnostics import load_fisher_values
from study.report import markdown_table, mean_se, read_metrics_file

__all__ = ["PAPER_FIGURE6", "RunTrace", "load_trace", "record_rows", "write_fisher_report"]

#: The paper's Figure 6: (data set, batch) -> (top eigenvalue over all data, without the top 10% of |a_i|).
PAPER_FIGURE6: Final[dict[tuple[str, int], tuple[float, float]]] = {
    ("cifar10", 16): (76.53, 30.60),
    ("cifar10", 256): (407.6, 55.66),
    ("mnist", 16): (0.3659, 1e-6),
    ("mnist", 256): (2.063, 0.2182),
}
DATASET_LABELS: Final = {"mnist": "MNIST", "cifar10": "CIFAR-10", "fashion-mnist": "Fashion-MNIST"}
NEAR_ZERO: Final = 0.1  # the paper's interval (-0.1, 0.1) of "a_i near 0"
CSV_COLUMNS: Final = (
    "dataset", "batch_size", "seed", "epoch", "step", "fisher_top", "fisher_trimmed_fixed",
    "fisher_trimmed_recomputed", "reduction_fixed", "reduction_recomputed", "near_zero_fraction", "max_abs_a",
    "median_abs_a", "grad_norm_median", "grad_norm_mad", "outliers_above", "outliers_deviating", "val_loss",
    "val_accuracy", "best", "seconds",
)  # fmt: skip


@dataclass
class RunTrace:
    """One run's diagnostics by epoch: its ``"fisher"`` and ``"eval"`` records and saved per-example values."""

    dataset: str
    batch_size: int
    seed: int | None
    fisher: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    values: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def epochs(self) -> list[int]:
        return sorted(self.fisher)

    @property
    def best_epoch(self) -> int | None:
        """The recorded epoch of the lowest validation loss."""
        scored = [(self.evals[e]["test_loss"], e) for e in self.epochs if e in self.evals]
        return min(scored)[1] if scored else None


def load_trace(row: Mapping[str, Any], dataset: str) -> RunTrace | None:
    """The trace of a study row's run; None when it has no ``"fisher"`` record."""
    records = read_metrics_file(row.get("metrics_path", ""))
    trace = RunTrace(dataset=dataset, batch_size=int(row["batch_size"]), seed=row.get("seed"))
    for record in records:
        if record.get("kind") in ("fisher", "eval"):
            (trace.fisher if record["kind"] == "fisher" else trace.evals)[int(record["epoch"])] = record
    if not trace.fisher:
        return None
    for values in load_fisher_values(Path(row["metrics_path"]).parent):
        trace.values[int(values["epoch"])] = values
    return trace


def _reduction(full: float, trimmed: float) -> float | None:
    return 1.0 - trimmed / full if full > 0 else None


def _projection_fields(values: Mapping[str, torch.Tensor] | None) -> dict[str, float | None]:
    if values is None:
        return {"near_zero_fraction": None, "max_abs_a": None, "median_abs_a": None}
    magnitude = values["projection"].abs().double()
    return {
        "near_zero_fraction": float((magnitude < NEAR_ZERO).double().mean()),
        "max_abs_a": float(magnitude.max()),
        "median_abs_a": float(magnitude.median()),
    }


def record_rows(trace: RunTrace) -> list[dict[str, Any]]:
    """One CSV row per epoch of the trace."""
    rows = []
    for epoch in trace.epochs:
        record, evaluation = trace.fisher[epoch], trace.evals.get(epoch, {})
        full = record["fisher_top"]
        rows.append(
            {
                "dataset": trace.dataset, "batch_size": trace.batch_size, "seed": trace.seed, "epoch": epoch,
                "step": record["step"], "fisher_top": full, "fisher_trimmed_fixed": record["fisher_trimmed_fixed"],
                "fisher_trimmed_recomputed": record["fisher_trimmed_recomputed"],
                "reduction_fixed": _reduction(full, record["fisher_trimmed_fixed"]),
                "reduction_recomputed": _reduction(full, record["fisher_trimmed_recomputed"]),
                **_projection_fields(trace.values.get(epoch)),
                "grad_norm_median": record["grad_norm_median"], "grad_norm_mad": record["grad_norm_mad"],
                "outliers_above": record["outliers_above"], "outliers_deviating": record["outliers_deviating"],
                "val_loss": evaluation.get("test_loss"), "val_accuracy": evaluation.get("test_accuracy"),
                "best": epoch == trace.best_epoch, "seconds": record.get("seconds"),
            }
        )  # fmt: skip
    return rows


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in CSV_COLUMNS} for row in rows)


# ----------------------------------------------------------------------------------------------------------- numbers


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _mean_pm(values: Iterable[float | None], spec: str = ".4g", scale: float = 1.0) -> str:
    """``mean ± SE`` over seeds (``mean`` alone for one seed)."""
    present = [v * scale for v in values if v is not None and math.isfinite(v)]
    mean, se = mean_se(present) if present else (None, None)
    return _fmt(mean, spec) + (f" ± {_fmt(se, '.0f' if se >= 10 else '.2g')}" if se is not None else "")


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return sum(present) / len(present) if present else None


def _at(rows: Sequence[Mapping[str, Any]], batch: int, which: str) -> list[Mapping[str, Any]]:
    """Each seed's row at its best epoch (``which="best"``) or its last one (``"last"``)."""
    by_seed: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["batch_size"] == batch:
            by_seed.setdefault(row["seed"], []).append(row)
    if which == "best":
        return [next(r for r in seed_rows if r["best"]) for seed_rows in by_seed.values()]
    return [max(seed_rows, key=lambda r: r["epoch"]) for seed_rows in by_seed.values()]


def _figure6_rows(rows: Sequence[Mapping[str, Any]], dataset: str, batches: Sequence[int]) -> list[list[str]]:
    table = []
    for batch in batches:
        paper = PAPER_FIGURE6.get((dataset, batch))
        paper_cells = [_fmt(paper[0]), _fmt(paper[1]), _fmt(100 * (1 - paper[1] / paper[0]), ".6g")] if paper else []
        for which in ("best", "last"):
            chosen = _at(rows, batch, which)
            table.append(
                [
                    DATASET_LABELS.get(dataset, dataset), str(batch), which,
                    _mean_pm(r["epoch"] for r in chosen), *(paper_cells or ["–"] * 3),
                    _mean_pm(r["fisher_top"] for r in chosen),
                    _mean_pm(r["fisher_trimmed_fixed"] for r in chosen),
                    _mean_pm((r["reduction_fixed"] for r in chosen), ".6g", 100),
                    _mean_pm(r["fisher_trimmed_recomputed"] for r in chosen),
                    _mean_pm((r["reduction_recomputed"] for r in chosen), ".4g", 100),
                ]
            )  # fmt: skip
    return table


FIGURE6_HEADER: Final = (
    "data", "batch", "point", "epoch", "paper: all (A)", "paper: trimmed (B)", "paper: reduction %", "ours: all (A)",
    "ours: trimmed, v1 kept", "reduction %", "ours: trimmed, recomputed", "reduction %",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ claims


Verdict = tuple[str, str]  # (agree | disagree | inconclusive | partly, the numbers behind it)


def _claim_few_examples(rows: Sequence[Mapping[str, Any]], batch: int) -> Verdict:
    """Claim 1: at the small batch, over training, more than 10% of a_i in (-0.1, 0.1), the largest |a_i| hundreds
    of times or more above the typical one."""
    chosen = [r for r in rows if r["batch_size"] == batch and r["near_zero_fraction"] is not None]
    if not chosen:
        return "inconclusive", "no saved projections (fisher.save = false)"
    near = min(r["near_zero_fraction"] for r in chosen)
    ratios = sorted(r["max_abs_a"] / max(r["median_abs_a"], 1e-30) for r in chosen)
    ratio = ratios[len(ratios) // 2]
    largest = sorted(r["max_abs_a"] for r in chosen)
    text = (
        f"batch {batch}, every record of every seed: at least {100 * near:.1f}% of the a_i in (-0.1, 0.1); "
        f"max|a_i| from {largest[0]:.3g} to {largest[-1]:.3g}; max|a_i| / median|a_i| has median {ratio:.3g} over "
        f"the records (range {ratios[0]:.3g} to {ratios[-1]:.3g})"
    )
    return ("agree" if near > 0.10 and ratio >= 100 else "disagree"), text


def _claim_batches(rows: Sequence[Mapping[str, Any]], small: int, large: int) -> Verdict:
    """Claim 2: at the best epoch the small batch has more a_i near 0 and a smaller maximum than the large."""
    fields = ("near_zero_fraction", "max_abs_a")
    means = {b: {f: _mean(r[f] for r in _at(rows, b, "best")) for f in fields} for b in (small, large)}
    if any(v is None for m in means.values() for v in m.values()):
        return "inconclusive", "no saved projections (fisher.save = false)"
    more_near = means[small]["near_zero_fraction"] > means[large]["near_zero_fraction"]  # type: ignore[operator]
    smaller_max = means[small]["max_abs_a"] < means[large]["max_abs_a"]  # type: ignore[operator]
    text = (
        f"near-zero fraction {100 * means[small]['near_zero_fraction']:.1f}% (batch {small}) against "  # type: ignore[operator]
        f"{100 * means[large]['near_zero_fraction']:.1f}% (batch {large}); max|a_i| "  # type: ignore[operator]
        f"{means[small]['max_abs_a']:.4g} against {means[large]['max_abs_a']:.4g} (means over seeds)"
    )
    return ("agree" if more_near and smaller_max else "disagree" if not (more_near or smaller_max) else "partly"), text


def _claim_reduction(rows: Sequence[Mapping[str, Any]], batches: Sequence[int], reading: str) -> Verdict:
    """Claim 3: leaving out the 10% largest |a_i| cuts the top eigenvalue by 60% or more (the paper: 60-99.97%)."""
    parts, all_cut = [], True
    for batch in batches:
        cut = _mean(r[f"reduction_{reading}"] for r in _at(rows, batch, "best"))
        all_cut = all_cut and cut is not None and cut >= 0.60
        parts.append(f"batch {batch}: {_fmt(None if cut is None else 100 * cut, '.1f')}%")
    return ("agree" if all_cut else "disagree"), f"reduction at the best epoch, {', '.join(parts)}"


def _rate(rows: Sequence[Mapping[str, Any]], rule: str, start: int, stop: int) -> float | None:
    """The outlier count's change per epoch from epoch ``start`` to ``stop`` of one run's rows."""
    by_epoch = {r["epoch"]: r[rule] for r in rows}
    return (by_epoch[stop] - by_epoch[start]) / (stop - start) if stop > start else None


def _claim_outliers(rows: Sequence[Mapping[str, Any]], batch: int, rule: str) -> Verdict:
    """Claim 4: the outlier count grows quickly from about the epoch of the lowest validation loss. Two paired
    tests over seeds: (a) more outliers at the last epoch than at the best one; (b) they grow faster per epoch after
    the best epoch than before it (growth that starts there, not earlier). Agree when both hold by more than two
    standard errors, partly when only (a) does."""
    seeds = sorted({r["seed"] for r in rows if r["batch_size"] == batch}, key=str)
    runs = [[r for r in rows if r["batch_size"] == batch and r["seed"] == seed] for seed in seeds]
    best = {seed: next(r["epoch"] for r in run if r["best"]) for seed, run in zip(seeds, runs, strict=True)}
    first, last = min(r["epoch"] for r in runs[0]), max(r["epoch"] for r in runs[0])
    if all(b == last for b in best.values()):
        return "inconclusive", f"batch {batch}: the validation loss was lowest at the last epoch: no overfitting yet"
    after = [_rate(run, rule, best[seed], last) for seed, run in zip(seeds, runs, strict=True)]
    before = [_rate(run, rule, first, best[seed]) for seed, run in zip(seeds, runs, strict=True)]
    paired = [a - b for a, b in zip(after, before, strict=True) if a is not None and b is not None]
    grew, faster = _significant([a for a in after if a is not None]), _significant(paired)
    text = (
        f"batch {batch}: best epoch {_mean_pm(best.values())}; outliers per epoch before it "
        f"{_mean_pm(before)}, after it {_mean_pm(after)}; after minus before {_mean_pm(paired)}"
    )
    verdict = "agree" if grew and faster else "partly" if grew else "disagree" if grew is False else "inconclusive"
    return verdict + (" (one seed)" if len(seeds) == 1 else ""), text


def _significant(values: Sequence[float]) -> bool | None:
    """True when the mean is above 0 by more than two standard errors, False when below by as much, else None (and
    by the sign alone for one value)."""
    if not values:
        return None
    mean, se = mean_se(values)
    assert mean is not None
    if se is None:
        return mean > 0
    return True if mean > 2 * se else False if mean < -2 * se else None


def _claims(rows: Sequence[Mapping[str, Any]], batches: Sequence[int]) -> list[tuple[str, Verdict]]:
    small, large = min(batches), max(batches)
    lambdas = {b: _mean(r["fisher_top"] for r in _at(rows, b, "best")) for b in (small, large)}
    low, high = lambdas[small], lambdas[large]
    larger = low is not None and high is not None and high > low
    claims = [
        ("1. a few examples carry the eigenvalue (Figures 2, 3)", _claim_few_examples(rows, small)),
        ("2. at the best epoch the small batch has more a_i near 0, a smaller max (Figures 4, 5)",
         _claim_batches(rows, small, large)),
        ("3a. the trimmed eigenvalue is 60% or more below the full one (Figure 6), v1 kept",
         _claim_reduction(rows, batches, "fixed")),
        ("3b. the same, eigenvalue recomputed on the remaining 90%", _claim_reduction(rows, batches, "recomputed")),
        ("3c. the full eigenvalue is larger at the large batch (Figure 6)",
         ("agree" if larger else "disagree",
          f"batch {small}: {_fmt(lambdas[small])}, batch {large}: {_fmt(lambdas[large])} (best epoch, mean)")),
    ]  # fmt: skip
    for batch in batches:
        for rule, words in (("outliers_above", "x > 10 MAD"), ("outliers_deviating", "|x - median| > 10 MAD")):
            claims.append((f"4. outliers ({words}) grow from about the lowest validation loss on (Figure 7)",
                           _claim_outliers(rows, batch, rule)))  # fmt: skip
    return claims


# ------------------------------------------------------------------------------------------------------------- plots


def _spread_epochs(epochs: Sequence[int], count: int = 4) -> list[int]:
    """``count`` epochs spread from the first to the last."""
    picks = {epochs[round(i * (len(epochs) - 1) / max(count - 1, 1))] for i in range(count)}
    return sorted(picks)


def _histogram(axis: Any, values: torch.Tensor, label: str) -> None:
    limit = float(values.abs().max()) or 1.0
    axis.hist(values.numpy(), bins=121, range=(-limit, limit), histtype="step", label=label, log=True)


def _first_seed(traces: Sequence[RunTrace], batch: int) -> RunTrace | None:
    chosen = [t for t in traces if t.batch_size == batch and t.values]
    return min(chosen, key=lambda t: -1 if t.seed is None else t.seed) if chosen else None


def _plot_histograms(plt: Any, out: Path, traces: Sequence[RunTrace], batches: Sequence[int]) -> list[str]:
    written = []
    for batch in batches:
        trace = _first_seed(traces, batch)
        if trace is None:
            continue
        epochs = _spread_epochs(sorted(trace.values))
        figure, axes = plt.subplots(1, len(epochs), figsize=(3.2 * len(epochs), 3.2), squeeze=False)
        for axis, epoch in zip(axes[0], epochs, strict=True):
            _histogram(axis, trace.values[epoch]["projection"], f"epoch {epoch}")
            axis.set(xlabel="a_i = v1 . g_i", title=f"batch {batch}, epoch {epoch}")
        axes[0][0].set_ylabel("examples (log)")
        written.append(_save(figure, out / f"fisher_hist_b{batch}.png"))
    chosen = [(b, t) for b in batches if (t := _first_seed(traces, b)) is not None and t.best_epoch in t.values]
    if chosen:
        figure, axis = plt.subplots(figsize=(6, 4))
        for batch, trace in chosen:
            _histogram(axis, trace.values[trace.best_epoch]["projection"], f"batch {batch}, epoch {trace.best_epoch}")  # type: ignore[index]
        axis.set(xlabel="a_i = v1 . g_i", ylabel="examples (log)", title="Projections at the lowest validation loss")
        axis.legend()
        written.append(_save(figure, out / "fisher_hist_best.png"))
    return written


def _by_epoch(rows: Sequence[Mapping[str, Any]], batch: int, key: str) -> tuple[list[int], list[float]]:
    """The mean over seeds of ``key`` per epoch."""
    epochs = sorted({r["epoch"] for r in rows if r["batch_size"] == batch})
    means = [_mean(r[key] for r in rows if r["batch_size"] == batch and r["epoch"] == e) for e in epochs]
    return [e for e, m in zip(epochs, means, strict=True) if m is not None], [m for m in means if m is not None]


def _plot_curves(plt: Any, out: Path, rows: Sequence[Mapping[str, Any]], batches: Sequence[int]) -> list[str]:
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches, strict=True):
        for key, label in (("outliers_above", "x > 10 MAD"), ("outliers_deviating", "|x - median| > 10 MAD")):
            axis.plot(*_by_epoch(rows, batch, key), marker=".", label=label)
        axis.set(xlabel="epoch", ylabel="outliers (mean over seeds)", title=f"batch {batch}")
        twin = axis.twinx()
        twin.plot(*_by_epoch(rows, batch, "val_loss"), color="black", linestyle="--", label="validation loss")
        twin.set_ylabel("validation loss")
        axis.legend(loc="upper left")
        twin.legend(loc="lower right")
    written = [_save(figure, out / "fisher_outliers.png")]
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches, strict=True):
        for key, label in (("fisher_top", "all data"), ("fisher_trimmed_fixed", "trimmed, v1 kept"),
                           ("fisher_trimmed_recomputed", "trimmed, recomputed")):  # fmt: skip
            axis.plot(*_by_epoch(rows, batch, key), marker=".", label=label)
        axis.set(xlabel="epoch", ylabel="top eigenvalue", yscale="log", title=f"batch {batch}")
        axis.legend()
    written.append(_save(figure, out / "fisher_eigenvalue.png"))
    return written


def _save(figure: Any, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    figure.clf()
    return path.name


def _plots(
    out: Path, traces: Sequence[RunTrace], rows: Sequence[Mapping[str, Any]], batches: Sequence[int]
) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot's import
    import matplotlib.pyplot as plt

    written = _plot_histograms(plt, out, traces, batches) + _plot_curves(plt, out, rows, batches)
    plt.close("all")
    return written


# ------------------------------------------------------------------------------------------------------------ report


def _dataset_of(row: Mapping[str, Any]) -> str:
    config = json.loads((Path(row["metrics_path"]).parent / "config.json").read_text())
    return str(config["data"]["name"])


def write_fisher_report(out: Path, rows: Sequence[Mapping[str, Any]], title: str) -> Path:
    """fisher.csv, the plots and fisher.md in ``out``; returns the path of fisher.md."""
    traces = [t for row in rows if row.get("metrics_path") and (t := load_trace(row, _dataset_of(row)))]
    table = [r for trace in traces for r in record_rows(trace)]
    _write_csv(table, out / "fisher.csv")
    batches = sorted({t.batch_size for t in traces})
    plots = _plots(out, traces, table, batches) if table else []
    path = out / "fisher.md"
    path.write_text(_markdown(title, traces, table, batches, plots))
    return path


def _markdown(
    title: str, traces: Sequence[RunTrace], table: Sequence[Mapping[str, Any]], batches: Sequence[int],
    plots: Sequence[str],
) -> str:  # fmt: skip
    if not table:
        return f'# {title}\n\nNo run has a "fisher" record yet.\n'
    dataset = traces[0].dataset
    seeds = sorted({str(t.seed) for t in traces})
    lines = [
        f"# {title}", "",
        f"{len(traces)} runs ({DATASET_LABELS.get(dataset, dataset)}; batch sizes {', '.join(map(str, batches))}; "
        f"seeds {', '.join(seeds)}). Values are means ± standard errors over seeds. \"best\" is each run's epoch of "
        "lowest validation loss, \"last\" its last epoch. Per-record numbers: fisher.csv.", "",
        "## Figure 6: the top eigenvalue with and without the 10% largest |a_i|", "",
        markdown_table(FIGURE6_HEADER, _figure6_rows(table, dataset, batches)), "",
        "## The paper's claims", "",
        markdown_table(("claim", "verdict", "numbers"), [[c, v, n] for c, (v, n) in _claims(table, batches)]), "",
        "## Outliers and validation loss by epoch (Figure 7; means over seeds)", "",
        markdown_table(*_outlier_table(table, batches)), "",
    ]  # fmt: skip
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _outlier_table(rows: Sequence[Mapping[str, Any]], batches: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    keys = (("val_loss", "val loss"), ("outliers_above", "x > 10 MAD"), ("outliers_deviating", "|x - med| > 10 MAD"),
            ("fisher_top", "λ1"))  # fmt: skip
    header = ["epoch"] + [f"b{batch} {label}" for batch in batches for _, label in keys]
    epochs = sorted({r["epoch"] for r in rows})

    def cell(epoch: int, batch: int, key: str) -> str:
        return _mean_pm(r[key] for r in rows if r["batch_size"] == batch and r["epoch"] == epoch)

    return header, [[str(e), *(cell(e, b, k) for b in batches for k, _ in keys)] for e in epochs]
