"""The report of a saddle-to-saddle study (``python -m study saddle``, docs/saddle.md): per case, the steps to the
target loss per initial scale and method with the ratio to the first method, gradient descent's plateaus and their
slope against ``log(1/scale)`` beside Theorem 1's prediction, loss curves with the phases shaded (the paper's
Figures 1 and 2), and a CSV with one row per run."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.files import atomic_write_text
from jobs.metrics import read_metrics
from jobs.outcome import read_summary
from study.report import markdown_table, mean_se
from study.saddle import DONE, Case, SaddleRun, SaddleStudy, runs

__all__ = ["run_row", "slope_fit", "write_saddle_report"]

COLUMNS = ("case", "method", "scale", "seed", "end", "steps_to_target", "first_plateau", "drops", "ranks_after_drops",
           "layer_ranks_after_first_drop",
           "min_alignment_first_plateau", "skips", "initial_loss", "final_loss", "predicted_slope")  # fmt: skip


def run_row(study: SaddleStudy, run: SaddleRun) -> dict[str, Any] | None:
    """What one finished or diverged run measured (None while it is neither)."""
    out = run.out_dir(study.out_dir)
    summary = read_summary(out)
    if summary is None or summary.get("end") not in DONE:
        return None
    records = read_metrics(out)
    readings = sorted((r for r in records if r["kind"] == "dynamics" and "loss" in r), key=lambda r: r["step"])
    phases: list[dict[str, Any]] = next((r["phases"] for r in records if r["kind"] == "phases"), [])
    first = readings[0]["loss"]
    reached = next((r["step"] for r in readings if r["loss"] <= run.case.target_fraction * first), None)
    plateau = phases[0]["stop"] if phases and phases[0]["kind"] == "plateau" else 0
    by_step = {r["step"]: r for r in readings}
    drops = [p for p in phases if p["kind"] == "drop"]
    ranks = [_rank_at(by_step, p["stop"], "product_rank") for p in drops]
    aligned = [r["alignment_median"] for r in readings if r["step"] < plateau and "alignment_median" in r]
    config = json.loads((out / "config.json").read_text())
    rate = config["optim"]["lr"] * readings[0].get("top_singular_value", math.nan) / config["derived"]["train_examples"]
    return {
        "case": run.case.name, "method": run.method, "scale": run.scale, "seed": run.seed, "end": summary["end"],
        "steps_to_target": reached, "first_plateau": plateau, "drops": len(drops), "ranks_after_drops": ranks,
        "min_alignment_first_plateau": min(aligned) if aligned else None,
        "skips": [r["step"] - 1 for r in records if r["kind"] == "step" and r.get("skipped")],
        "layer_ranks_after_first_drop": _rank_at(by_step, drops[0]["stop"], "ranks") if drops else None,
        "initial_loss": first, "final_loss": readings[-1]["loss"],
        "predicted_slope": 1 / math.log1p(rate) if rate > 0 else None,
    }  # fmt: skip


def _rank_at(by_step: dict[int, dict[str, Any]], step: int, field: str) -> Any:
    """``field`` (``product_rank``, or ``ranks``: each layer's) at the last reading before ``step`` (a phase's
    exclusive end)."""
    earlier = [s for s in by_step if s < step and field in by_step[s]]
    return by_step[max(earlier)][field] if earlier else None


def slope_fit(scales: Sequence[float], lengths: Sequence[float], law: str = "log") -> tuple[float, float | None, float]:
    """Least squares of plateau length on ``ln(1/scale)`` (``law="log"``: two layers, Theorem 1) or on ``1/scale``
    (``"inverse"``: deeper networks leave the origin in ~1/scale steps): (slope, its standard error, R^2)."""
    inverse = 1 / np.asarray(scales, dtype=float)
    x, y = (np.log(inverse) if law == "log" else inverse), np.asarray(lengths, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    spread = float(((x - x.mean()) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    error = math.sqrt(float((residuals**2).sum()) / (len(x) - 2) / spread) if len(x) > 2 and spread else None
    return float(slope), error, 1 - float((residuals**2).sum()) / total if total else 1.0


def _mean_se(values: Sequence[float], digits: int = 1) -> str:
    """Mean ± standard error over seeds."""
    mean, se = mean_se(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{mean:.{digits}f}"


def _by_seed(rows: list[dict[str, Any]], key: tuple[str, str, float]) -> dict[int, int | None]:
    """Steps to target by seed, of the runs of one (case, method, scale)."""
    return {r["seed"]: r["steps_to_target"] for r in rows if (r["case"], r["method"], r["scale"]) == key}


def _steps_table(rows: list[dict[str, Any]], case: Case) -> str:
    methods = list(case.methods)
    header = ["scale", *[f"{m}: steps" for m in methods], *[f"{methods[0]} / {m}" for m in methods[1:]]]
    table = []
    for scale in case.scales:
        cell = {m: _by_seed(rows, (case.name, m, scale)) for m in methods}
        line = [f"{scale:g}"]
        for m in methods:
            done = [v for v in cell[m].values() if v is not None]
            line.append(f"{_mean_se(done)} ({len(done)}/{len(cell[m])})")
        for m in methods[1:]:
            base, other = cell[methods[0]], cell[m]
            paired = [b / o for seed, o in other.items() if o and (b := base.get(seed))]
            line.append(_mean_se(paired, 2))
        table.append(line)
    return markdown_table(header, table)


def _ranks(cell: list[dict[str, Any]]) -> str:
    """The product's rank after each drop of the first seed's run ("-" without a product: a nonlinear network)."""
    ranks = cell[0]["ranks_after_drops"] if cell else []
    return str(ranks) if ranks and None not in ranks else "-"


def _phase_table(rows: list[dict[str, Any]], case: Case, method: str) -> tuple[str, str]:
    table, points = [], []
    for scale in case.scales:
        cell = [r for r in rows if (r["case"], r["method"], r["scale"]) == (case.name, method, scale)]
        points += [(scale, r["first_plateau"]) for r in cell]
        aligned = [r["min_alignment_first_plateau"] for r in cell if r["min_alignment_first_plateau"] is not None]
        table.append([f"{scale:g}", _mean_se([r["first_plateau"] for r in cell]),
                      ", ".join(str(r["drops"]) for r in cell), _ranks(cell),
                      json.dumps(cell[0]["layer_ranks_after_first_drop"]) if cell else "-",
                      f"{np.median(aligned):.3g}" if aligned else "-"])  # fmt: skip
    header = ["scale", "first plateau (steps)", "drops per seed", "ranks after the drops (first seed)",
              "each layer's rank after the first drop (first seed)",
              "alignment at its best in the first plateau (median over seeds of the units' median)"]  # fmt: skip
    fit = ""
    if len({s for s, _ in points}) > 1:
        slope, error, r2 = slope_fit([s for s, _ in points], [n for _, n in points])
        predicted = [
            r["predicted_slope"]
            for r in rows
            if (r["case"], r["method"]) == (case.name, method) and r["predicted_slope"]
        ]
        fit = f"First plateau against ln(1/scale): slope {slope:.2f} ± {error or 0:.2f} steps per e-fold (R² {r2:.3f}, "
        fit += f"{len(points)} runs)"
        _, _, inverse_r2 = slope_fit([s for s, _ in points], [n for _, n in points], "inverse")
        fit += f"; against 1/scale, R² {inverse_r2:.3f}"
        if predicted:
            fit += f"; Theorem 1's 1/ln(1 + eta s_1 / n): {np.mean(predicted):.2f}"
    return markdown_table(header, table), fit


def _plot(study: SaddleStudy, case: Case) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(case.scales), figsize=(4.2 * len(case.scales), 3.2), squeeze=False, sharey=True)
    for axis, scale in zip(axes[0], case.scales, strict=True):
        for index, method in enumerate(case.methods):
            records = read_metrics(SaddleRun(case, method, scale, study.seeds[0]).out_dir(study.out_dir))
            readings = [r for r in records if r["kind"] == "dynamics"]
            axis.semilogy([r["step"] for r in readings], [r["loss"] for r in readings], label=method, lw=1.4)
            for phase in (r["phases"] for r in records if r["kind"] == "phases" and index == 0):
                for p in phase:
                    axis.axvspan(
                        p["start"], p["stop"], color="#f4c2d7" if p["kind"] == "plateau" else "#c2e4f4", lw=0, alpha=0.6
                    )
        axis.set_title(f"{case.name}, init scale {scale:g}")
        axis.set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    name = f"{case.name}_loss.png"
    figure.savefig(study.out_dir / name, dpi=110)
    plt.close(figure)
    return name


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(
            {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows
        )


def write_saddle_report(study: SaddleStudy) -> Path:
    """``report.md``, ``runs.csv`` and a loss figure per case in the study's out_dir, from the finished runs."""
    study.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for run in runs(study) if (row := run_row(study, run)) is not None]
    lines = [f"# {study.name}: saddle-to-saddle dynamics (seed 004)", "",
             f"Made by `python -m study saddle --config {study.path}`; {len(rows)} runs finished or diverged. "
             f"Means ± standard errors over seeds {list(study.seeds)}; steps to target: the first recorded step whose "
             "loss is below the case's target fraction of the initial loss. Ratios pair each seed's runs.",
             ""]  # fmt: skip
    for case in study.cases:
        lines += [f"## {case.name} ({case.config}; target {case.target_fraction:g} of the initial loss)", "",
                  _steps_table(rows, case), ""]  # fmt: skip
        for method in case.methods:
            table, fit = _phase_table(rows, case, method)
            lines += [f"Phases of `{method}`:", "", table, "", fit, ""]
        figure = _plot(study, case) if any(r["case"] == case.name for r in rows) else None
        if figure:
            lines += [f"![{case.name}]({figure})", ""]
    _write_csv(study.out_dir / "runs.csv", rows)
    report = study.out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
