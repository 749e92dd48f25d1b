"""Artefacts of a batch-size scaling study: runs CSV, critical-batch fits, plots and a markdown report.

The input is a list of run records, one dict per training run, with the keys of :data:`RUN_COLUMNS`. A *cell* is one
(variant, optimizer, batch size); its *best run* is the one used for the scaling curves (see :func:`best_runs`).
Missing values (None, NaN, a run that never reached the target) render as "–" and are left out of plots.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from hpo_worker.pruning import AT_THRESHOLD, BEHIND_BEST
from hpo_worker.report import mean_std
from jobs.metrics import METRICS_JSONL, read_metrics
from jobs.optimizers import OPTIMIZER_NAMES, report_label
from study.fit import ScalingFit, fit_steps_to_target

if TYPE_CHECKING:  # hyperopt, which hpo_worker.spaces imports, only for tuned studies
    from hpo_worker.spaces import SearchSpace

__all__ = [
    "RUN_COLUMNS",
    "best_runs",
    "compute_fits",
    "format_table",
    "markdown_table",
    "mean_se",
    "read_csv",
    "read_metrics_file",
    "run_hparams",
    "top_k_means",
    "top_k_seed_means",
    "write_csv",
    "write_report",
]

RUN_COLUMNS: Final = (
    "cell",  # str: "kfac/b512", or "residual/kfac/b256" when the study has several variants
    "variant",  # str: "" when the study has one variant, else e.g. "plain" / "residual"
    "optimizer",  # "sgd" | "adam" | "kfac"
    "batch_size",  # int: global batch size
    "source",  # "tuned" (an HPO trial) or "given" (hyperparameters from the config)
    "trial",  # int or None: the trial id when tuned
    "lr",  # float: base learning rate
    "hparams",  # str: JSON object of all tuned values
    "target_accuracy",  # float or None: the validation accuracy that counts as reached
    "reached",  # bool: whether the validation accuracy reached the target
    "steps_to_target",  # int or None: optimizer steps at the first evaluation at or above the target
    "examples_to_target",  # int or None: steps_to_target * batch_size
    "steps",  # int: steps run
    "wall_seconds",  # float: wall-clock time of the run's last invocation (a resumed run's earlier ones left out)
    "train_accuracy",  # float: final (fractions, not percent)
    "val_accuracy",  # float: final
    "train_loss",  # float: final
    "val_loss",  # float: final
    "generalization_gap",  # float: train_accuracy - val_accuracy
    "noise_scale",  # float or None: the last B_simple estimate
    "seed",  # int or None: the study seed (study.seeds) the run belongs to
    "best_val_accuracy",  # float or None: the highest val accuracy over the run's evaluations
    "best_val_step",  # int or None: the step of that evaluation
    "kl_clipped_fraction",  # float or None: K-FAC, fraction of logged steps whose size the KL clip set
    "curvature_share",  # float or None: K-FAC, how much curvature (not damping) set its step, at the end, by weights
    "curvature_energy",  # float or None: the same, weighted by the gradient's expected energy
    "metrics_path",  # str: the run's metrics.jsonl, or ""
)

CellKey = tuple[str, str, int]  # (variant, optimizer, batch_size)
SeriesKey = tuple[str, str]  # (variant, optimizer)

MISSING: Final = "–"
FIT_FORMULA: Final = "S(B) = S_min * (1 + B_crit / B)"
PLOTS: Final = ("steps_to_target.png", "best_lr.png", "final_accuracy.png", "learning_curves.png", "noise_scale.png")


# ---------------------------------------------------------------------------------------------------------- helpers


def _num(value: Any) -> float | None:
    """A finite float, or None for None, NaN, inf, booleans and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _key(run: Mapping[str, Any]) -> CellKey:
    return (str(run.get("variant") or ""), str(run.get("optimizer") or ""), int(run.get("batch_size") or 0))


def _optimizer_rank(name: str) -> tuple[int, str]:
    return (OPTIMIZER_NAMES.index(name) if name in OPTIMIZER_NAMES else len(OPTIMIZER_NAMES), name)


def _sorted_keys(keys: Iterable[CellKey]) -> list[CellKey]:
    return sorted(keys, key=lambda k: (k[0], _optimizer_rank(k[1]), k[2]))


def _series_label(variant: str, optimizer: str) -> str:
    """ "kfac", or "residual/kfac" with variants: the cell name without its batch part."""
    return f"{variant}/{optimizer}" if variant else optimizer


def _series_title(variant: str, optimizer: str) -> str:
    name = report_label(optimizer)
    return f"{name} ({variant})" if variant else name


def _reached(run: Mapping[str, Any]) -> bool:
    return bool(run.get("reached")) and _num(run.get("steps_to_target")) is not None


def _fmt(value: Any, spec: str = ".4g") -> str:
    x = _num(value)
    return MISSING if x is None else format(x, spec)


def _fmt_int(value: Any) -> str:
    x = _num(value)
    return MISSING if x is None else str(round(x))


def _fmt_scale(value: Any) -> str:
    """Noise scales as whole numbers (no exponent) from 1 up: they are batch sizes."""
    x = _num(value)
    if x is None:
        return MISSING
    return f"{x:.0f}" if abs(x) >= 1 else f"{x:.3g}"


def _fmt_pct(value: Any) -> str:
    x = _num(value)
    return MISSING if x is None else f"{100 * x:.2f}%"


def _fmt_pt(value: Any) -> str:
    x = _num(value)
    return MISSING if x is None else f"{100 * x:+.2f}"


def _by_cell(runs: Iterable[Mapping[str, Any]]) -> dict[CellKey, list[Mapping[str, Any]]]:
    cells: dict[CellKey, list[Mapping[str, Any]]] = {}
    for run in runs:
        cells.setdefault(_key(run), []).append(run)
    return cells


# ------------------------------------------------------------------------------------------------------- selection


def best_runs(runs: Iterable[Mapping[str, Any]]) -> dict[CellKey, Mapping[str, Any]]:
    """The best run of each (variant, optimizer, batch_size) cell.

    Among runs that reached the target: the fewest steps_to_target (ties: higher val_accuracy). When none reached:
    the highest val_accuracy (runs without one rank last). Only the search's runs compete (sources "tuned" and
    "given"): a best trial trained again with other seeds (source "repeat") measures its spread, and picking the
    luckiest seed would bias the best downwards.
    """

    def val(run: Mapping[str, Any]) -> float:
        v = _num(run.get("val_accuracy"))
        return -math.inf if v is None else v

    best: dict[CellKey, Mapping[str, Any]] = {}
    searched = [run for run in runs if run.get("source") not in ("repeat", "replay")]
    for key, cell in _by_cell(searched).items():
        reached = [r for r in cell if _reached(r)]
        if reached:
            best[key] = min(reached, key=lambda r: (_num(r.get("steps_to_target")) or 0.0, -val(r)))
        else:
            best[key] = max(cell, key=val)
    return {k: best[k] for k in _sorted_keys(best)}


def top_k_means(runs: Iterable[Mapping[str, Any]], k: int, by: str = "train_accuracy") -> dict[CellKey, dict[str, Any]]:
    """Mean and std of train and val accuracy over the ``k`` runs of each cell with the highest ``by`` accuracy.

    The protocol of the skip-connection study (Nagase & Naganuma): 300 tuned trials per cell, the mean over the top
    100. That paper ranks the trials by *training* accuracy, hence the default; pass ``by="val_accuracy"`` to rank by
    validation accuracy. Runs without a ``by`` value are not ranked. Each value is a dict with ``n`` (runs averaged,
    fewer than ``k`` when the cell has fewer), ``k``, ``by``, and ``{train,val}_accuracy_{mean,std}`` (std: n - 1,
    None below two runs; a mean is None when no ranked run has that value).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}: e.g. 100 averages the top 100 runs of each cell")
    if by not in ("train_accuracy", "val_accuracy"):
        raise ValueError(f"by must be 'train_accuracy' or 'val_accuracy', got {by!r}")
    out: dict[CellKey, dict[str, Any]] = {}
    for key, cell in _by_cell(runs).items():
        ranked = sorted(
            (r for r in cell if _num(r.get(by)) is not None), key=lambda r: _num(r.get(by)) or 0.0, reverse=True
        )
        top = ranked[:k]
        entry: dict[str, Any] = {"n": len(top), "k": k, "by": by}
        for metric in ("train_accuracy", "val_accuracy"):
            mean, std = mean_std([x for r in top if (x := _num(r.get(metric))) is not None])
            entry[f"{metric}_mean"] = mean
            entry[f"{metric}_std"] = std
        out[key] = entry
    return {key: out[key] for key in _sorted_keys(out)}


def top_k_seed_means(
    runs: Iterable[Mapping[str, Any]], k: int, by: str = "train_accuracy"
) -> dict[CellKey, dict[str, Any]]:
    """The top-k protocol repeated per study seed: per cell, the top-k means of each seed, and their mean and
    standard error over the seeds.

    Each value has ``seeds`` ({seed: {"train_accuracy": m, "val_accuracy": m, "n": runs}}) and, per metric,
    ``{metric}_mean`` (over seeds) and ``{metric}_se`` (sample std over seeds / sqrt(seeds); None below two seeds);
    each seed's entry also has ``{metric}_std``, the sample std of its top-k runs.
    """
    by_seed: dict[CellKey, dict[Any, list[Mapping[str, Any]]]] = {}
    for run in runs:
        by_seed.setdefault(_key(run), {}).setdefault(run.get("seed"), []).append(run)
    out: dict[CellKey, dict[str, Any]] = {}
    for key, seeds in by_seed.items():
        per_seed = {}
        for seed, seed_runs in seeds.items():
            entry = top_k_means(seed_runs, k, by)[key]
            per_seed[seed] = {"n": entry["n"]}
            for metric in ("train_accuracy", "val_accuracy"):
                per_seed[seed] |= {metric: entry[f"{metric}_mean"], f"{metric}_std": entry[f"{metric}_std"]}
        result: dict[str, Any] = {"seeds": per_seed, "k": k, "by": by}
        for metric in ("train_accuracy", "val_accuracy"):
            result[f"{metric}_mean"], result[f"{metric}_se"] = mean_se(
                [v for entry in per_seed.values() if (v := entry[metric]) is not None]
            )
        out[key] = result
    return {key: out[key] for key in _sorted_keys(out)}


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)); the error is None below two values."""
    mean, std = mean_std(values)
    return mean, (None if std is None else std / math.sqrt(len(values)))


# ------------------------------------------------------------------------------------------------------------- fits


def compute_fits(runs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The critical-batch fit per (variant, optimizer), on the best run of each batch size that reached the target.

    Keyed by ``"kfac"`` or ``"residual/kfac"``. Each entry has variant, optimizer, batch_sizes and steps_to_target
    (the points used), and either s_min, b_crit, rms_log_residual, points (``reason`` None; ``note`` says when
    B_crit lies outside the measured batch sizes) or the ``reason`` the fit was not possible (those numbers None).
    """
    best = best_runs(runs)
    series: dict[SeriesKey, list[tuple[int, float]]] = {}
    for (variant, optimizer, batch), run in best.items():
        points = series.setdefault((variant, optimizer), [])
        steps = _num(run.get("steps_to_target"))
        if _reached(run) and steps is not None and steps > 0:
            points.append((batch, steps))
    fits: dict[str, dict[str, Any]] = {}
    for (variant, optimizer), points in series.items():
        entry: dict[str, Any] = {
            "variant": variant,
            "optimizer": optimizer,
            "batch_sizes": [b for b, _ in points],
            "steps_to_target": [s for _, s in points],
            "s_min": None,
            "b_crit": None,
            "rms_log_residual": None,
            "points": len(points),
            "reason": None,
            "note": None,
        }
        if len(points) < 2:
            entry["reason"] = (
                f"only {len(points)} batch size(s) reached the target; the fit needs at least 2 "
                "(lower the target accuracy or give the runs more steps)"
            )
        else:
            try:
                fit = fit_steps_to_target([b for b, _ in points], [s for _, s in points])
            except ValueError as err:  # pragma: no cover - points are pre-filtered; kept so a report never crashes
                entry["reason"] = str(err)
            else:
                entry.update(s_min=fit.s_min, b_crit=fit.b_crit, rms_log_residual=fit.rms_log_residual)
                entry["note"] = _range_note(fit.b_crit, [b for b, _ in points])
        fits[_series_label(variant, optimizer)] = entry
    return fits


def _range_note(b_crit: float, batch_sizes: Sequence[int]) -> str | None:
    """What a B_crit outside the measured batch sizes means: the fit extrapolates, the data show no knee."""
    if b_crit < min(batch_sizes) / 2:
        return (
            f"B_crit below the smallest batch measured ({min(batch_sizes)}): larger batches hardly cut the steps "
            "here; measure smaller batches to place it"
        )
    if b_crit > 2 * max(batch_sizes):
        return (
            f"B_crit above the largest batch measured ({max(batch_sizes)}): still near perfect scaling; measure "
            "larger batches to place it"
        )
    return None


def _fit_of(entry: Mapping[str, Any]) -> ScalingFit | None:
    if entry.get("reason") is not None or entry.get("s_min") is None:
        return None
    return ScalingFit(
        s_min=float(entry["s_min"]),
        b_crit=float(entry["b_crit"]),
        rms_log_residual=float(entry["rms_log_residual"]),
        points=int(entry["points"]),
    )


# -------------------------------------------------------------------------------------------------------- CSV, text


def write_csv(runs: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """One row per run: the :data:`RUN_COLUMNS`, then any other keys in order of first appearance; None is empty."""
    runs = list(runs)
    columns = list(RUN_COLUMNS)
    for run in runs:
        columns.extend(c for c in run if c not in columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for run in runs:
            row = []
            for column in columns:
                value = run.get(column)
                if value is None:
                    row.append("")
                elif isinstance(value, dict | list):
                    row.append(json.dumps(value, sort_keys=True))  # hparams given as a dict rather than JSON text
                else:
                    row.append(value)
            writer.writerow(row)
    return path


_TEXT_COLUMNS: Final = frozenset({"cell", "variant", "optimizer", "source", "hparams", "metrics_path"})
_INT_COLUMNS: Final = frozenset(
    {"batch_size", "trial", "steps_to_target", "examples_to_target", "steps", "seed", "best_val_step"}
)


def _csv_value(column: str, text: str) -> Any:
    """A runs.csv cell as :func:`write_csv` wrote it: "" is None, then text, int, bool or float by column."""
    if column in _TEXT_COLUMNS:
        return text
    if text == "":
        return None
    if column == "reached":
        return text == "True"
    if column in _INT_COLUMNS:
        return int(float(text))
    try:
        return float(text)
    except ValueError:
        return text  # a column of another program's: left as written


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a runs.csv, typed back (the inverse of :func:`write_csv`, for re-rendering a report)."""
    with Path(path).open(newline="") as f:
        return [{column: _csv_value(column, text) for column, text in row.items()} for row in csv.DictReader(f)]


_TABLE_HEADER: Final = (
    "optimizer",
    "batch",
    "reached",
    "steps to target",
    "examples to target",
    "lr",
    "val acc",
    "gap (pt)",
    "noise scale",
    "runs",
)


def _table_rows(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cells = _by_cell(runs)
    best = best_runs(runs)
    with_variant = len({k[0] for k in best}) > 1
    header = (["variant"] if with_variant else []) + list(_TABLE_HEADER)
    rows = []
    for (variant, optimizer, batch), run in best.items():
        row = [variant] if with_variant else []
        row += [
            report_label(optimizer),
            str(batch),
            "yes" if _reached(run) else "no",
            _fmt_int(run.get("steps_to_target")) if _reached(run) else MISSING,
            _fmt_int(run.get("examples_to_target")) if _reached(run) else MISSING,
            _fmt(run.get("lr"), ".3g"),
            _fmt_pct(run.get("val_accuracy")),
            _fmt_pt(run.get("generalization_gap")),
            _fmt_scale(run.get("noise_scale")),
            str(len(cells[(variant, optimizer, batch)])),
        ]
        rows.append(row)
    return header, rows


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width text table of the best run of each cell (what a study prints when it ends)."""
    header, rows = _table_rows(list(runs))
    if not rows:
        return "(no runs)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned, as a reader scans them.
    left = {i for i, h in enumerate(header) if h in ("variant", "optimizer", "reached")}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ plots


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (``jobs.metrics.read_metrics``); [] when the path is empty, missing or
    not a metrics.jsonl."""
    if not path or Path(path).name != METRICS_JSONL:
        return []
    return [record for record in read_metrics(Path(path).parent) if isinstance(record, dict)]


def _curve(records: Iterable[Mapping[str, Any]], kind: str, field: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        step, value = _num(r.get("step")), _num(r.get(field))
        if r.get("kind") == kind and step is not None and value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


class _Plots:
    """What every plot of one report shares: the best run of each cell by series, one color per series, markers and
    line styles per variant (so that overlapping series of two variants stay distinguishable), pyplot, and the
    reasons of the plots not drawn."""

    def __init__(self, plt: Any, out_dir: Path, runs: Sequence[Mapping[str, Any]]) -> None:
        self.plt, self.out_dir = plt, out_dir
        self.series: dict[SeriesKey, list[tuple[int, Mapping[str, Any]]]] = {}
        for (variant, optimizer, batch), run in best_runs(runs).items():
            self.series.setdefault((variant, optimizer), []).append((batch, run))
        self.colors = {key: f"C{i % 10}" for i, key in enumerate(self.series)}
        variant_index = {v: i for i, v in enumerate(sorted({k[0] for k in self.series}))}
        self.markers = {key: "osD^v"[variant_index[key[0]] % 5] + "-" for key in self.series}
        self.styles = {key: ("-", "-.", "--")[variant_index[key[0]] % 3] for key in self.series}
        self.skipped: dict[str, str] = {}

    def finish(
        self, fig: Any, ax: Any, name: str, drawn: bool, why_not: str, labels: tuple[str, str, str],
        batch_axis: bool = False, log_y: bool = False, legend: str = "small",
    ) -> None:  # fmt: skip
        """Labels (x, y, title) and saves the plot as ``name``; a plot with nothing drawn is skipped, ``why_not``."""
        if not drawn:
            self.plt.close(fig)
            self.skipped[name] = why_not
            return
        if batch_axis:
            ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_title(labels[2])
        ax.legend(fontsize=legend)
        fig.tight_layout()
        fig.savefig(self.out_dir / name, dpi=120)
        self.plt.close(fig)


def _plot_all(
    out_dir: Path, runs: Sequence[Mapping[str, Any]], fits: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """Writes the plots that have data; returns the reason for each plot not written."""
    try:
        import matplotlib
    except ImportError:
        return {name: "matplotlib is not installed (pip install matplotlib)" for name in PLOTS}
    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot's import
    import matplotlib.pyplot as plt

    plots = _Plots(plt, out_dir, runs)
    _plot_steps_to_target(plots, fits)
    _plot_per_batch(plots, "best_lr.png", "lr", "learning rate", "Learning rate of the best run", log_y=True)
    _plot_per_batch(
        plots, "final_accuracy.png", "val_accuracy", "validation accuracy (%)", "Final accuracy of the best run", False,
        100.0,
    )  # fmt: skip
    _plot_learning_curves(plots, runs)
    _plot_noise_scale(plots, runs)
    return plots.skipped


def _plot_steps_to_target(plots: _Plots, fits: Mapping[str, Mapping[str, Any]]) -> None:
    """Steps to target, with perfect scaling from each series' smallest batch and the fitted S(B)."""
    fig, ax = plots.plt.subplots(figsize=(6.4, 4.8))
    drawn = False
    for (variant, optimizer), points in plots.series.items():
        pts = [(b, s) for b, r in points if _reached(r) and (s := _num(r.get("steps_to_target"))) and s > 0]
        if not pts:
            continue
        drawn = True
        color = plots.colors[(variant, optimizer)]
        bs, ss = [b for b, _ in pts], [s for _, s in pts]
        ax.plot(bs, ss, plots.markers[(variant, optimizer)], color=color, label=_series_title(variant, optimizer))
        b0, s0 = pts[0]
        grid = [b0 * 2 ** (i / 8) for i in range(round(8 * math.log2(max(bs) / b0)) + 1)] if max(bs) > b0 else [b0]
        ax.plot(grid, [s0 * b0 / b for b in grid], "--", color=color, alpha=0.6, linewidth=1)
        fit = _fit_of(fits.get(_series_label(variant, optimizer), {}))
        if fit is not None:
            ax.plot(grid, [float(fit.predict(b)) for b in grid], ":", color=color, linewidth=1.5)
    plots.finish(
        fig, ax, "steps_to_target.png", drawn, "no run reached the target accuracy",
        ("batch size", "steps to target", "Steps to target (dashed: perfect scaling, dotted: fit)"),
        batch_axis=True, log_y=True,
    )  # fmt: skip


def _plot_per_batch(
    plots: _Plots, name: str, field: str, ylabel: str, title: str, log_y: bool, scale: float = 1.0
) -> None:
    """``field`` of each series' best runs against the batch size."""
    fig, ax = plots.plt.subplots(figsize=(6.4, 4.8))
    drawn = False
    for (variant, optimizer), points in plots.series.items():
        pts = [(b, v * scale) for b, r in points if (v := _num(r.get(field))) is not None and (v > 0 or not log_y)]
        if pts:
            drawn = True
            ax.plot(
                *zip(*pts, strict=True),
                plots.markers[(variant, optimizer)],
                color=plots.colors[(variant, optimizer)],
                label=_series_title(variant, optimizer),
            )
    plots.finish(fig, ax, name, drawn, f"no best run has a {field}", ("batch size", ylabel, title), True, log_y)


def _plot_learning_curves(plots: _Plots, runs: Sequence[Mapping[str, Any]]) -> None:
    """Learning curves of each series' best run at its largest batch size."""
    fig, ax = plots.plt.subplots(figsize=(6.4, 4.8))
    drawn = False
    for (variant, optimizer), points in plots.series.items():
        batch, run = max(points, key=lambda p: p[0])
        xs, ys = _curve(read_metrics_file(str(run.get("metrics_path") or "")), "eval", "test_accuracy")
        if xs:
            drawn = True
            label = f"{_series_title(variant, optimizer)}, B={batch}"
            ax.plot(
                xs, [100 * y for y in ys], plots.styles[(variant, optimizer)], color=plots.colors[(variant, optimizer)],
                label=label,
            )  # fmt: skip
    for target in {t for r in runs if (t := _num(r.get("target_accuracy"))) is not None}:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    plots.finish(
        fig, ax, "learning_curves.png", drawn,
        "no evaluation records in the metrics files of the best runs at the largest batch",
        ("step", "validation accuracy (%)", "Learning curves of the best runs at the largest batch"),
    )  # fmt: skip


def _plot_noise_scale(plots: _Plots, runs: Sequence[Mapping[str, Any]]) -> None:
    """Noise scale over steps, only for studies that measured it."""
    if not any(_num(r.get("noise_scale")) is not None for r in runs):
        plots.skipped["noise_scale.png"] = "no run measured the gradient noise scale"
        return
    fig, ax = plots.plt.subplots(figsize=(6.4, 4.8))
    drawn = False
    for (variant, optimizer), points in plots.series.items():
        for i, (batch, run) in enumerate(points):
            xs, ys = _curve(read_metrics_file(str(run.get("metrics_path") or "")), "step", "noise_scale")
            # Early estimates can be negative (|G|^2 or tr(Sigma) below 0): a log axis cannot show them.
            kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
            if kept:
                drawn = True
                alpha = 0.4 + 0.6 * (i + 1) / len(points)  # darker: larger batch
                ax.plot(
                    *zip(*kept, strict=True),
                    plots.styles[(variant, optimizer)],
                    color=plots.colors[(variant, optimizer)],
                    alpha=alpha,
                    label=f"{_series_title(variant, optimizer)}, B={batch}",
                )
    plots.finish(
        fig, ax, "noise_scale.png", drawn,
        "no positive noise_scale in the step records of the best runs' metrics files",
        ("step", "B_simple = tr(Σ) / |G|²", "Gradient noise scale of the best runs"), log_y=True, legend="x-small",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- report


def _top_k_cell(entry: Mapping[str, Any] | None, metric: str) -> str:
    if entry is None or entry[f"{metric}_mean"] is None:
        return MISSING
    mean, se, seeds = entry[f"{metric}_mean"], entry[f"{metric}_se"], entry["seeds"]
    if len(seeds) > 1:
        spread = "" if se is None else f" ± {100 * se:.2f}"
        return f"{100 * mean:.2f}%{spread} ({len(seeds)} seeds, n={min(e['n'] for e in seeds.values())})"
    (only,) = seeds.values()  # one seed: the spread of its top-k runs (sample std), as the paper's tables have none
    std = only[f"{metric}_std"]
    return f"{100 * mean:.2f}%{'' if std is None else f' ± {100 * std:.2f}'} (n={only['n']})"


def _paired_difference(first: Mapping[str, Any] | None, last: Mapping[str, Any] | None, metric: str) -> str:
    """last − first in points: the mean ± SE of the per-seed differences (paired by seed: same init, same TPE)."""
    if first is None or last is None:
        return MISSING
    a, b = first["seeds"], last["seeds"]
    diffs = [b[s][metric] - a[s][metric] for s in a if s in b and a[s][metric] is not None and b[s][metric] is not None]
    mean, se = mean_se(diffs)
    if mean is None:
        return MISSING
    return f"{100 * mean:+.2f}" + ("" if se is None else f" ± {100 * se:.2f}")


def _top_k_tables(runs: Sequence[Mapping[str, Any]], top_k: int) -> list[str]:
    """The skip-connection paper's layout: per batch size, one table of train and one of val accuracy; rows are the
    variants (plus, with exactly two, the difference last − first in points), columns the optimizers. With study
    seeds: the mean ± standard error over seeds of each seed's top-k mean; differences are paired by seed."""
    means = top_k_seed_means(runs, top_k)
    variants = sorted({k[0] for k in means})
    optimizers = sorted({k[1] for k in means}, key=_optimizer_rank)
    batches = sorted({k[2] for k in means})
    by = next(iter(means.values()))["by"] if means else "train_accuracy"
    lines = [
        f"Mean over the top {top_k} runs of each cell ranked by {by.replace('_', ' ')} "
        "(Nagase & Naganuma: 300 trials, top 100); with several study seeds, the mean ± standard error over seeds "
        "of each seed's top-k mean; n = runs averaged per seed.",
        "",
    ]
    header = ["", *(report_label(o) for o in optimizers)]
    for batch in batches:
        for metric, name in (("train_accuracy", "Training"), ("val_accuracy", "Validation")):
            rows = [
                [variant, *(_top_k_cell(means.get((variant, o, batch)), metric) for o in optimizers)]
                for variant in variants
            ]
            if len(variants) == 2:
                first, last = variants
                rows.append(
                    [f"{last} − {first} (pt)"]
                    + [_paired_difference(means.get((first, o, batch)), means.get((last, o, batch)), metric)
                       for o in optimizers]
                )  # fmt: skip
            lines += [f"**Average {name} Accuracy (BS={batch})**", "", markdown_table(header, rows), ""]
    return lines


def run_hparams(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run's tuned values by label: its ``hparams`` column (JSON text in runs.csv, a mapping in memory)."""
    hparams = run.get("hparams") or "{}"
    return json.loads(hparams) if isinstance(hparams, str) else dict(hparams)


def _budget_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The large-batch tuning study's Table 1: per cell, the best val accuracy within the budget and its values."""
    rows = []
    for key, cell in _by_cell(runs).items():
        scored = [r for r in cell if _num(r.get("best_val_accuracy")) is not None]
        if not scored:
            continue
        best = max(scored, key=lambda r: _num(r.get("best_val_accuracy")) or 0.0)
        variant, optimizer, batch = key
        values = run_hparams(best)
        shown = ", ".join(f"{name.split('.')[-1]}={_fmt(v, '.4g') if _num(v) is not None else v}"
                          for name, v in sorted(values.items()))  # fmt: skip
        rows.append([
            _series_title(variant, optimizer), str(batch), _fmt(best.get("best_val_accuracy"), ".4f"),
            _fmt_int(best.get("best_val_step")), str(len(cell)), shown or MISSING,
        ])  # fmt: skip
    if not rows:
        return []
    header = ["optimizer", "batch", "best val acc", "at step", "runs", "its hyperparameters"]
    stopped_early = any(_reached(run) for run in runs)  # runs with a target stop at it (run.stop_at_target)
    how = (
        "Runs that reached the target stopped there, so in their cells the table shows little more than the target; "
        "it tells most in the cells that missed it."
        if stopped_early
        else "Every run trained its whole budget."
    )
    return [
        "## Best validation accuracy within the budget",
        "",
        "Per cell, the highest validation accuracy any run reached at any evaluation within the step budget, and that "
        f"run's tuned values: the layout of Table 1 of the large-batch tuning study. {how}",
        "",
        markdown_table(header, rows),
        "",
    ]


def _kl_clip_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per K-FAC cell, how often the KL clip set the step size (then the learning rate had no effect)."""
    kfac = {key: cell for key, cell in _by_cell(runs).items() if key[1] == "kfac"}
    if not kfac:
        return []
    rows = []
    for (variant, _, batch), cell in kfac.items():
        fractions = [x for r in cell if (x := _num(r.get("kl_clipped_fraction"))) is not None]
        if not fractions:
            rows.append([variant or MISSING, str(batch), str(len(cell)), "off", MISSING])
            continue
        mostly = sum(1 for f in fractions if f > 0.5)
        rows.append([variant or MISSING, str(batch), str(len(cell)), _fmt_pct(statistics.fmean(fractions)),
                     f"{mostly} of {len(fractions)}"])  # fmt: skip
    header = ["variant", "batch", "runs", "clipped steps (mean)", "runs clipped on > 50% of steps"]
    return [
        "## K-FAC's KL clip",
        "",
        "While the clip is active (nu < 1) the update is sqrt(kl_clip / <V, grad>) V: the learning rate and its decay "
        "have no effect on that step. 'off': kfac.kl_clip = 0, the learning rate sets every step.",
        "",
        markdown_table(header, rows),
        "",
    ]


def _stopped_note(stopped: Sequence[Mapping[str, Any]]) -> str:
    """ "; 12 more trial(s) stopped (...)": the trials that left no finished run."""
    if not stopped:
        return ""
    pruned = sum(s.get("status") == "pruned" for s in stopped)
    behind = sum(str(s.get("reason", "")).startswith(BEHIND_BEST) for s in stopped)
    at_threshold = sum(str(s.get("reason", "")).startswith(AT_THRESHOLD) for s in stopped)
    which = [f"{behind} of them behind an earlier trial's best"] if behind else []
    which += [f"{at_threshold} of them still at the threshold"] if at_threshold else []
    how = "; ".join(["tune.pruner", *which])
    return (
        f"; {len(stopped)} more trial(s) stopped: {pruned} pruned ({how}), {len(stopped) - pruned} failed or "
        "diverged. Not runs; listed in trials/<cell>.json"
    )


def _report_heading(
    runs: Sequence[Mapping[str, Any]], title: str, variants: Sequence[str], stopped: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The title, what the study covered, and the table of every cell's best run."""
    optimizers = sorted({str(r.get("optimizer") or "") for r in runs}, key=_optimizer_rank)
    batches = sorted({int(r.get("batch_size") or 0) for r in runs})
    targets = sorted({t for r in runs if (t := _num(r.get("target_accuracy"))) is not None})
    lines = [
        f"# {title}",
        "",
        f"- runs: {len(runs)} in {len(_by_cell(runs))} cells" + _stopped_note(stopped),
        f"- optimizers: {', '.join(report_label(o) for o in optimizers) or MISSING}",
        f"- batch sizes: {', '.join(map(str, batches)) or MISSING}",
    ]
    if any(variants):
        lines.append(f"- variants: {', '.join(variants)}")
    lines += [
        f"- target accuracy: {', '.join(_fmt_pct(t) for t in targets) or MISSING}",
        "",
        "## Best run per cell",
        "",
        "The best run reached the target in the fewest steps (ties: higher val accuracy); where none reached it, the "
        "highest final val accuracy. gap = train − val accuracy in points; noise scale = last B_simple estimate.",
        "",
        markdown_table(*_table_rows(runs)) if runs else "(no runs)",
        "",
    ]
    return lines


def _fit_section(fits: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Critical batch size",
        "",
        f"Fit of {FIT_FORMULA} (McCandlish et al. 2018) to the best runs' steps to target, least squares in log space. "
        "Below B_crit doubling the batch almost halves the steps; above it the steps approach S_min.",
        "",
    ]
    fit_rows = []
    for label, entry in fits.items():
        fit_rows.append(
            [
                label,
                str(entry["points"]),
                _fmt(entry["s_min"], ".4g"),
                _fmt(entry["b_crit"], ".4g"),
                _fmt(entry["rms_log_residual"], ".3f"),
                entry["reason"] or entry.get("note") or "",
            ]
        )
    header = ["series", "points", "S_min", "B_crit", "rms log residual", "note"]
    return [*lines, markdown_table(header, fit_rows) if fit_rows else "(no runs)", ""]


def _plot_section(skipped: Mapping[str, str]) -> list[str]:
    lines = ["## Plots", ""]
    for name in PLOTS:
        if name in skipped:
            lines.append(f"- `{name}` not drawn: {skipped[name]}.")
        else:
            lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
    return lines


def write_report(
    out_dir: Path,
    runs: list[dict[str, Any]],
    title: str,
    top_k: int = 100,
    stopped: Sequence[Mapping[str, Any]] = (),
    spaces: Mapping[str, SearchSpace] | None = None,
    preface: Sequence[str] = (),
) -> Path:
    """Write runs.csv, fits.json, the plots and report.md into ``out_dir``; returns the path of report.md.
    ``stopped``: the tuning trials that left no finished run (pruned or failed: ``study.runner._stopped``), which
    the heading counts and the search's uncertainty counts as trials that did not reach the target. ``spaces``:
    each optimizer's search space, for the answer on whether the best trials lie at an edge of them. ``preface``:
    markdown lines put under the title (what the report is drawn from, when that is not a finished study)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(runs, out_dir / "runs.csv")
    fits = compute_fits(runs)
    (out_dir / "fits.json").write_text(json.dumps({"formula": FIT_FORMULA, "fits": fits}, indent=2) + "\n")
    skipped = _plot_all(out_dir, runs, fits) if runs else {name: "no runs" for name in PLOTS}

    from study.critical_report import answers_section, cost_lines, summarise_repeats, uncertainty_section
    from study.curvature import curvature_lines

    variants = sorted({str(r.get("variant") or "") for r in runs})
    repeats = summarise_repeats(runs)
    heading = _report_heading(runs, title, variants, stopped)
    lines = heading[:2] + list(preface) + heading[2:] + answers_section(runs, stopped, repeats, spaces)
    lines += _fit_section(fits) + uncertainty_section(runs, stopped, repeats) + cost_lines(out_dir, runs, repeats)
    lines += _plot_section(skipped)
    lines += _budget_table(runs) + _kl_clip_lines(runs) + curvature_lines(runs)
    if len(variants) > 1:
        lines += [f"## Top-{top_k} means", "", *_top_k_tables(runs, top_k)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
