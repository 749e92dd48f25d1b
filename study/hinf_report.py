"""The report of ``python -m study hinf-xor``: epochs to converge per method and depth beside the paper's Tables 1
and 2 (seed 001), a verdict per depth and per claim, learning curves like its Figures 3 and 4 (docs/hinf.md).

Agreement at a depth: our mean is within two standard errors of the paper's, the standard error of the difference
being ``sqrt(s_ours^2 / n_ours + s_paper^2 / 100)`` (the paper ran 100 seeds). Means and standard deviations are over
the seeds that converged; the seeds that did not are counted beside them, and any of them disagrees with the paper's
claim that every seed converged.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from hpo_worker.report import mean_std
from study.hinf_xor import HinfStudy, Method, read_results
from study.report import markdown_table

__all__ = ["PAPER", "depth_verdict", "write_hinf_report"]

# Tables 1 (g-EHF) and 2 (Adam): mean and standard deviation of the epochs over 100 seeds; steepest descent: the
# text's one number (L = 801).
PAPER: Final[dict[str, dict[int, tuple[float, float | None]]]] = {
    "hinf": {5: (25.92, 2.59), 101: (23.17, 2.36), 201: (22.58, 2.31), 401: (21.74, 1.96), 801: (20.74, 2.39),
             1001: (20.57, 2.23)},
    "adam": {5: (2160.5, 442.5), 101: (1984.9, 447.9), 201: (2078.1, 467.4), 401: (1950.8, 423.6),
             801: (1783.7, 346.4), 1001: (1724.6, 366.2)},
    "steepest": {801: (4833.9, None)},
}  # fmt: skip
PAPER_SEEDS = 100


def depth_verdict(epochs: Sequence[int | None], paper: tuple[float, float | None] | None) -> tuple[str, str]:
    """(verdict, numbers) for one method at one depth against the paper's (mean, std)."""
    done = [e for e in epochs if e is not None]
    missed = len(epochs) - len(done)
    if paper is None:
        return "no paper value", ""
    if len(done) < 2:
        return ("disagree" if missed else "inconclusive"), f"{len(done)} of {len(epochs)} seeds converged"
    mean, std = mean_std(done)
    assert mean is not None and std is not None  # two values at least
    paper_mean, paper_std = paper
    se = math.sqrt(std**2 / len(done) + (paper_std or 0.0) ** 2 / PAPER_SEEDS)
    gap = (mean - paper_mean) / se if se > 0 else math.inf
    numbers = f"{mean:.2f} vs {paper_mean:.2f}: {gap:+.1f} SE"
    if missed:
        return "disagree", f"{numbers}; {missed} of {len(epochs)} seeds did not converge (the paper: all did)"
    return ("agree" if abs(gap) <= 2 else "disagree"), numbers


def _cell(epochs: Sequence[int | None]) -> str:
    done = [e for e in epochs if e is not None]
    if not done:
        return f"none of {len(epochs)}"
    mean, std = mean_std(done)
    text = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.0f}"
    return text + ("" if len(done) == len(epochs) else f" ({len(done)}/{len(epochs)} converged)")


def _table(study: HinfStudy, results: Mapping[tuple[str, int], list[dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for method in study.methods:
        paper = PAPER.get(method.compare, {})
        for depth in method.depths:
            runs = results.get((method.name, depth))
            if not runs:
                continue
            epochs = [r["epochs"] for r in runs]
            mean_std = paper.get(depth)
            paper_text = "" if mean_std is None else " ± ".join(str(v) for v in mean_std if v is not None)
            verdict, numbers = depth_verdict(epochs, mean_std)
            rows.append([method.name, str(depth), str(len(runs)), _cell(epochs), paper_text, verdict, numbers])
    return rows


def _plot_curves(plt: Any, out: Path, method: Method, results: Mapping[tuple[str, int], list[dict[str, Any]]]) -> str:
    depths = [d for d in method.depths if (method.name, d) in results]
    columns = min(3, len(depths))
    rows = -(-len(depths) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False, sharey=True)
    for axis in axes.flat[len(depths) :]:
        axis.set_visible(False)
    for axis, depth in zip(axes.flat, depths, strict=False):
        for run in results[(method.name, depth)]:
            axis.semilogy(range(len(run["curve"])), run["curve"], lw=0.5, alpha=0.6)
        axis.axhline(1e-2, color="k", lw=0.8, ls="--")
        axis.set_title(f"L = {depth}")
        axis.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel("mean squared error")
    figure.suptitle(f"{method.name}: learning curves ({method.kind})")
    figure.tight_layout()
    name = f"curves_{method.name}.png"
    figure.savefig(out / name, dpi=100)
    plt.close(figure)
    return name


def _plots(study: HinfStudy, results: Mapping[tuple[str, int], list[dict[str, Any]]]) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot's import
    import matplotlib.pyplot as plt

    return [_plot_curves(plt, study.out_dir, m, results) for m in study.methods
            if any((m.name, d) in results for d in m.depths)]  # fmt: skip


def _write_csv(path: Path, results: Mapping[tuple[str, int], list[dict[str, Any]]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "depth", "seed", "epochs", "final_error", "seconds"])
        for (name, depth), runs in results.items():
            for run in runs:
                writer.writerow([name, depth, run["seed"], run["epochs"], run["curve"][-1], run["seconds"]])


def write_hinf_report(study: HinfStudy) -> Path:
    """hinf_xor.csv, one learning-curve plot per method and hinf_xor.md in the study's folder; returns the .md."""
    results = read_results(study)
    study.out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(study.out_dir / "hinf_xor.csv", results)
    plots = _plots(study, results)
    header = ("method", "L", "seeds", "epochs (mean ± std)", "paper", "verdict", "numbers")
    settings = [f"- {m.name}: {m.kind}, {dict(m.settings)}, budget {m.max_epochs} epochs" for m in study.methods]
    lines = [
        f"# {study.name}: epochs to converge on XOR against depth", "",
        f"Task: {dict(study.task)}; the error is the mean squared error over the four patterns after each epoch. "
        "Means and standard deviations over the seeds that converged; agreement: within two standard errors of the "
        "paper's mean (standard error of the difference, the paper's over 100 seeds). Per seed: hinf_xor.csv.", "",
        *settings, "", markdown_table(header, _table(study, results)), "",
        *[f"![{name}]({name})" for name in plots],
    ]  # fmt: skip
    path = study.out_dir / "hinf_xor.md"
    path.write_text("\n".join(lines) + "\n")
    return path
