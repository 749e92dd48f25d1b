"""Pruning: training steps and wall time of a tuned study with and without a pruner, and the best result found.

Run from the repository root (resumable: a finished study is read, not run again)::

    python -m benchmarks.hpo_pruning                                  # demo cells, 3 seeds, none / asha / median
    python -m benchmarks.hpo_pruning --cells skip --out runs/bench-pruning-skip   # a reduced seed-000 cell
    python -m benchmarks.hpo_pruning --seeds 2 --trials 8 --pruners none asha --out runs/bench-pruning

Each (pruner, seed) is one ``python -m study scaling`` run, ``--trials`` TPE trials per cell on 2 local workers;
``tune.seed`` is the seed, so the runs of one seed propose the same first trials. The cells:

- ``demo``: the demo study's SGD cells (Fashion-MNIST, the small MLP, batch sizes 128, 512 and 2048, steps to 82%
  test accuracy within 200 steps, an evaluation every 10 steps);
- ``skip``: one cell of the skip-connection study's reproduction (seed 000, docs/study.md): the plain MNIST MLP,
  SGD at batch 256, 10 epochs (680 steps), ranked by training error, which the pruners read from the epoch records.

Reported, mean ± standard error over the seeds:

- **steps**: the training steps of every trial of the study (a pruned trial's up to its stop);
- **wall**: seconds from the first trial's start to the last one's end;
- **best**: each cell's best objective (the fraction of the budget to the target; above 1: missed), averaged over
  the cells; and the number of pruned trials.

The steps ratio (without / with) is the saving; a best within the seeds' noise is "the same best".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRUNER_TABLES = {
    "none": "",
    "asha": 'pruner = { name = "asha", min_fraction = 0.1, reduction_factor = 3 }',
    "median": 'pruner = { name = "median", warmup_steps = 20 }',
}

# Each cell's [study] table, then the [tune] table they share: {objective} and {space} differ.
DEMO = """
[study]
name = "bench-pruning"
base_config = "{root}/jobs/configs/fashion_mlp_small.toml"
optimizers = ["sgd"]
batch_sizes = [128, 512, 2048]
target_accuracy = 0.82
max_steps = 200
eval_every_steps = 10
top_k = 3
overrides = ["run.train_eval_examples=10000"]
"""
SKIP = """
[study]
name = "bench-pruning-skip"
base_config = "{root}/jobs/configs/mnist_linear_mlp.toml"
optimizers = ["sgd"]
batch_sizes = [256]
max_epochs = 10
top_k = 3
overrides = ["run.train_eval_examples=0", "model.residual=false"]
"""
TUNE = """[tune]
trials = {trials}
workers = 2
seed = {seed}
objective = "{objective}"
spaces = {{ sgd = "{root}/jobs/configs/studies/spaces/{space}.toml" }}
{pruner}
"""
STUDIES = {"demo": (DEMO, "steps_to_target", "demo_sgd"), "skip": (SKIP, "train_error", "skip_sgd")}


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _trial_steps(trial: dict[str, Any]) -> int:
    result = trial.get("result") or {}
    if result.get("steps") is not None:
        return int(result["steps"])
    curve = [r for r in result.get("learning_curve", []) if "step" in r]
    return int(curve[-1]["step"]) if curve else 0


def measure(out: Path) -> dict[str, float]:
    """Steps, wall time, mean best objective over the cells and pruned trials, from a finished study's trials."""
    trials = {path.stem: json.loads(path.read_text()) for path in sorted((out / "trials").glob("*.json"))}
    every = [t for cell in trials.values() for t in cell]
    best = [min(t["result"]["loss"] for t in cell if t["result"].get("status") == "ok") for cell in trials.values()]
    start = min(_time(t["book_time"]) for t in every if t["book_time"])
    end = max(_time(t["refresh_time"]) for t in every if t["refresh_time"])
    return {
        "steps": float(sum(_trial_steps(t) for t in every)),
        "wall": (end - start).total_seconds(),
        "best": statistics.fmean(best),
        "pruned": float(sum(t["state"] == 5 for t in every)),
    }


def run_one(out: Path, cells: str, pruner: str, seed: int, trials: int) -> dict[str, float]:
    if not (out / "report.md").exists():
        out.mkdir(parents=True, exist_ok=True)
        study = out / "study.toml"
        table, objective, space = STUDIES[cells]
        values = {"root": ROOT, "trials": trials, "seed": seed, "objective": objective, "space": space}
        study.write_text(table.format(**values) + TUNE.format(**values, pruner=PRUNER_TABLES[pruner]))
        command = [sys.executable, "-m", "study", "scaling", "--config", str(study), "--out", str(out)]
        with open(out / "study.log", "w") as log:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return measure(out)


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{mean:.4g} ± {se:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", choices=list(STUDIES), default="demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--pruners", nargs="+", choices=list(PRUNER_TABLES), default=list(PRUNER_TABLES))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-pruning"))
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        for pruner in args.pruners:
            measured = run_one(args.out / f"{pruner}-s{seed}", args.cells, pruner, seed, args.trials)
            results.setdefault(pruner, []).append(measured)
            print(f"{pruner} seed {seed}: {measured}", flush=True)
    lines = [
        f"cells {args.cells}: {args.trials} trials per cell, {args.seeds} seeds (mean ± s.e.)",
        "",
        "| pruner | steps | steps saved (x) | wall s | wall saved (x) | best objective | pruned trials |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results.get("none")
    for pruner, runs in results.items():
        column = {key: [r[key] for r in runs] for key in runs[0]}
        ratios = ("", "")
        if base is not None:
            steps = [b["steps"] / r["steps"] for b, r in zip(base, runs, strict=True)]
            wall = [b["wall"] / r["wall"] for b, r in zip(base, runs, strict=True)]
            ratios = (_mean_se(steps), _mean_se(wall))
        lines.append(
            f"| {pruner} | {_mean_se(column['steps'])} | {ratios[0]} | {_mean_se(column['wall'])} | {ratios[1]} | "
            f"{_mean_se(column['best'])} | {_mean_se(column['pruned'])} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
