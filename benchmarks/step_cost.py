"""Seconds per training step of each optimizer at each batch size, for a critical-batch study's cost section.

Run from the repository root, with nothing else running (the study's own runs share the cores, so their wall times
are not step costs)::

    python -m benchmarks.step_cost --config jobs/configs/studies/critical_fashion_mlp.toml

Each (optimizer, batch size) trains the study's cell config for ``--steps`` steps in its own ``jobs.train`` process
at one thread, with a small learning rate (the cost does not depend on it; a large one could diverge and end the
run), without evaluations or noise-scale measurements (the protocol's, not the optimizer's, costs). The cost is the
mean of the step records' ``seconds`` after ``--warmup`` steps: a whole number of K-FAC decomposition intervals, so
the decompositions are counted at their share. Each K-FAC cell is measured a second time with its only
decomposition at the first step (inside the warm-up): the difference is the part of its step that is
decompositions, which distkfac shares out among the ranks; with it go the share-out factors for P = 1, 2, 4, ...
ranks, from ``distkfac.assign_work`` on the run's factor shapes (config.json's ``derived.kfac_factor_shapes``). The
result goes to ``<study out_dir>/step_cost.json``, which the study's report reads (study.critical_report, "Cost");
``python -m study report --config <study>`` redraws it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distkfac.assignment import assign_work, grad_workers_for
from distkfac.factors import FactorShape, Structure
from jobs.files import atomic_write_text
from jobs.metrics import read_metrics
from study.config import Cell, StudyConfig, cell_toml, load_study
from study.cost import STEP_COST_JSON

MEASURE_OVERRIDES = (
    "optim.lr=0.001", "run.noise_every=0", "run.eval_every_steps=0", "run.eval_every=0", "run.target_accuracy=0",
    "run.train_eval_examples=1", "run.checkpoint_every=0", "run.epochs=0",
)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study's TOML file (jobs/configs/studies/)")
    parser.add_argument("--steps", type=int, default=60, help="steps per measurement (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out first (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: one worker's)")
    parser.add_argument("--out", help=f"output file (default <study out_dir>/{STEP_COST_JSON})")
    return parser.parse_args(argv)


def measure_cell(
    study: StudyConfig, cell: Cell, steps: int, warmup: int, threads: int, extra: Sequence[str] = ()
) -> tuple[float, dict[str, Any]]:
    """Mean seconds per training step of ``cell`` after ``warmup`` steps, in a fresh ``jobs.train`` process run with
    the ``extra`` overrides; and the run's resolved configuration (its config.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "cell.toml"
        config.write_text(cell_toml(study, cell))
        overrides = [*MEASURE_OVERRIDES, f"run.steps={steps}", f"run.threads={threads}", f"run.out_dir={tmp}/run"]
        command = [sys.executable, "-m", "jobs.train", "--config", str(config), *overrides, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cell {cell.name}: jobs.train failed ({done.returncode}):\n{done.stderr[-2000:]}")
        records = [r for r in read_metrics(Path(tmp) / "run") if r.get("kind") == "step"]
        resolved = json.loads((Path(tmp) / "run" / "config.json").read_text())
    timed = [float(r["seconds"]) for r in records if int(r["step"]) > warmup]
    if not timed:
        raise RuntimeError(f"cell {cell.name}: no step records after step {warmup} (raise --steps)")
    return sum(timed) / len(timed), resolved


def decomposition_speedups(resolved: dict[str, Any], largest: int) -> dict[str, float]:
    """How far distkfac shares the run's decompositions out over P = 1, 2, 4, .. ``largest`` ranks: the sum of
    their ``n^3`` costs over the busiest rank's, as ``distkfac.assign_work`` places them with the run's strategy."""
    kfac = resolved["kfac"]
    shapes = [
        tuple(FactorShape(Structure(structure), dim) for structure, dim in pair)
        for pair in resolved["derived"]["kfac_factor_shapes"]
    ]
    speedups = {}
    ranks = 1
    while ranks <= largest:
        workers = grad_workers_for(kfac["strategy"], kfac["grad_worker_fraction"] or None, ranks)
        work = assign_work(shapes, ranks, workers, kfac["split_factors_above"] or None)  # type: ignore[arg-type]
        speedups[str(ranks)] = work.decomposition_speedup()
        ranks *= 2
    return speedups


def measure_kfac_decompositions(study: StudyConfig, cell: Cell, args: argparse.Namespace, seconds: float) -> float:
    """The part of K-FAC's step that is decompositions: the step measured again with its only decomposition at the
    first step (inside the warm-up), subtracted; 0 where noise makes it negative."""
    without, _ = measure_cell(
        study, cell, args.steps, args.warmup, args.threads, extra=(f"kfac.inv_update_steps={args.steps + 1}",)
    )
    return max(0.0, seconds - without)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    study = load_study(args.config)
    costs: dict[str, dict[str, float]] = {}
    decompositions: dict[str, dict[str, float]] = {}
    speedups: dict[str, float] = {}
    started = time.monotonic()
    for cell in study.cells():
        seconds, resolved = measure_cell(study, cell, args.steps, args.warmup, args.threads)
        costs.setdefault(cell.optimizer, {})[str(cell.batch_size)] = seconds
        line = f"{cell.name}: {seconds * 1e3:.2f} ms/step"
        if resolved["derived"]["kfac_factor_shapes"] and cell.optimizer == "kfac":
            share = measure_kfac_decompositions(study, cell, args, seconds)
            decompositions.setdefault(cell.optimizer, {})[str(cell.batch_size)] = share
            speedups = decomposition_speedups(resolved, max(study.batch_sizes) // min(study.batch_sizes))
            line += f", of which decompositions {share * 1e3:.2f}"
        print(line, flush=True)
    result: dict[str, Any] = {
        "study": str(args.config),
        "command": "python -m benchmarks.step_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()}",
        "seconds_per_step": costs,
        "decomposition_seconds_per_step": decompositions,
        "decomposition_speedup": speedups,
    }
    out = Path(args.out) if args.out else study.out_dir / STEP_COST_JSON
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"{out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
