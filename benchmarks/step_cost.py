"""Seconds per training step of each optimizer at each batch size, for a critical-batch study's cost section.

Run from the repository root, with nothing else running (the study's own runs share the cores, so their wall times
are not step costs)::

    python -m benchmarks.step_cost --config jobs/configs/studies/critical_fashion_mlp.toml

Each (optimizer, batch size) trains the study's cell config for ``--steps`` steps in its own ``jobs.train`` process
at one thread, with a small learning rate (the cost does not depend on it; a large one could diverge and end the
run), without evaluations or noise-scale measurements (the protocol's, not the optimizer's, costs). The cost is the
median of the step records' ``seconds`` after ``--warmup`` steps (a median: on a shared VM a few slow steps moved
the mean of a cell by up to 50% between runs). For K-FAC, the median of the steps that do not decompose, plus the
part that is decompositions: the decomposing steps' median excess over the others, spread over the interval, which
distkfac shares out among the ranks; with it go the share-out factors for P = 1, 2, 4, ...
ranks, from ``distkfac.assign_work`` on the run's factor shapes (config.json's ``derived.kfac_factor_shapes``). With
them, each optimizer's modelled communication per step on P devices (``benchmarks/step_comm.py``). The
result goes to ``<study out_dir>/step_cost.json``, which the study's report reads (study.critical_report, "Cost");
``python -m study report --config <study>`` redraws it.

A measurement takes long at large batches (tens of seconds a step for K-FAC on CIFAR-10 at 8192 on one core), so
each cell's is kept in ``<out>.partial.json`` as it is made: a run that is interrupted (a session's end, Ctrl-C, a
kill) continues when the same command runs again, and measures only the cells it had not, unless a cell's
configuration changed meanwhile. Other ``--steps``, ``--warmup``, ``--threads`` or ``--override`` are refused while
that file exists. The file is removed when the result is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.step_comm import communication_seconds, network
from distkfac.assignment import assign_work, grad_workers_for
from distkfac.factors import FactorShape, Structure
from jobs.files import atomic_write_text
from jobs.metrics import read_metrics
from study.config import Cell, StudyConfig, cell_toml, load_study
from study.cost import STEP_COST_JSON

# The cost of a step does not depend on where training goes, so the benchmark's runs are made to go nowhere
# dangerous: a small learning rate, and a large K-FAC damping (with the CIFAR-10 CNN's damping of 1e-3, K-FAC at
# batch 32 diverged within 12 steps even at lr 0.001), and no divergence limit on the loss.
MEASURE_OVERRIDES = (
    "optim.lr=0.001", "kfac.damping=1", "run.diverge_above=0", "run.noise_every=0", "run.eval_every_steps=0",
    "run.eval_every=0", "run.target_accuracy=0", "run.train_eval_examples=1", "run.checkpoint_every=0", "run.epochs=0",
)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the study's TOML file (jobs/configs/studies/)")
    parser.add_argument("--steps", type=int, default=60, help="steps per measurement (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out first (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: one worker's)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of every cell, interleaved (default 3)")
    parser.add_argument("--out", help=f"output file (default <study out_dir>/{STEP_COST_JSON})")
    parser.add_argument("--cells", help="only these cells, as optimizer:batch, comma-separated (default: all)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="a jobs.train override for every cell, after the benchmark's own (repeatable): e.g. to time a variant",
    )  # fmt: skip
    parser.add_argument(
        "--communication-only", action="store_true",
        help="only (re)compute the modelled communication into the existing output file (no timing: a 2-step run of "
        "each optimizer for its config.json; the machine may be busy)",
    )  # fmt: skip
    return parser.parse_args(argv)


def measure_cell(
    study: StudyConfig, cell: Cell, steps: int, warmup: int, threads: int, extra: Sequence[str] = ()
) -> tuple[dict[int, float], dict[str, Any]]:
    """Seconds of each training step of ``cell`` after ``warmup`` steps, in a fresh ``jobs.train`` process; and the
    run's resolved configuration (its config.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "cell.toml"
        config.write_text(cell_toml(study, cell))
        overrides = [*MEASURE_OVERRIDES, f"run.steps={steps}", f"run.threads={threads}", f"run.out_dir={tmp}/run"]
        overrides += extra
        command = [sys.executable, "-m", "jobs.train", "--config", str(config), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cell {cell.name}: jobs.train failed ({done.returncode}):\n{done.stderr[-2000:]}")
        records = [r for r in read_metrics(Path(tmp) / "run") if r.get("kind") == "step"]
        resolved = json.loads((Path(tmp) / "run" / "config.json").read_text())
    timed = {int(r["step"]): float(r["seconds"]) for r in records if int(r["step"]) > warmup}
    if not timed:
        raise RuntimeError(f"cell {cell.name}: no step records after step {warmup} (raise --steps)")
    return timed, resolved


def step_cost(step_seconds: dict[int, float], interval: int | None) -> tuple[float, float | None]:
    """(seconds per step, of which decompositions) from one run's timed steps. Without a decomposition ``interval``
    (not K-FAC), the median step and None. With one, the decomposing steps are the residue of the step number
    modulo ``interval`` whose steps take longest: the cost is the others' median plus the decompositions' part, the
    decomposing steps' median excess over the others spread over the interval (same run, same machine state).
    None for the part where the timed steps do not tell them apart (every step decomposes, or one residue only)."""
    classes: dict[int, list[float]] = {}
    for step, seconds in step_seconds.items():
        classes.setdefault(step % interval if interval else 0, []).append(seconds)
    if len(classes) < 2:
        return statistics.median(step_seconds.values()), None
    medians = {residue: statistics.median(values) for residue, values in classes.items()}
    slowest = max(medians, key=lambda residue: medians[residue])
    others = statistics.median(s for residue, values in classes.items() if residue != slowest for s in values)
    part = max(0.0, (medians[slowest] - others) / (interval or 1))
    return others + part, part


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


def selected_cells(study: StudyConfig, chosen: str | None) -> list[Cell]:
    """The study's cells, or those that ``chosen`` names (``optimizer:batch,...``); an unknown name is an error."""
    cells = study.cells()
    if not chosen:
        return cells
    by_name = {f"{cell.optimizer}:{cell.batch_size}": cell for cell in cells}
    unknown = [name for name in chosen.split(",") if name not in by_name]
    if unknown:
        raise SystemExit(f"--cells: no cell {', '.join(unknown)} in the study; its cells: {', '.join(by_name)}")
    return [by_name[name] for name in chosen.split(",")]


def partial_file(out: Path) -> Path:
    """Where a run keeps its measurements until it ends, so that an interrupted run continues (run it again)."""
    return out.with_name(out.name + ".partial.json")


def _earlier_measurements(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurements an interrupted run with the same ``settings`` left in ``path``; a SystemExit naming the file
    and the fix when it was made with other settings (its figures would not be comparable)."""
    if not path.is_file():
        return []
    try:
        earlier = json.loads(path.read_text())
        kept, measurements = earlier["settings"], list(earlier["measurements"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path} is damaged ({exc}): delete it to measure every cell again") from exc
    if kept != settings:
        raise SystemExit(
            f"{path} holds the measurements of an interrupted run with other settings ({kept}, not {settings}): run "
            "with those to continue it, or delete the file to start again"
        )
    return measurements


def _config_sha256(study: StudyConfig, cell: Cell) -> str:
    """What identifies a cell's measured configuration (its config file and the benchmark's own overrides): a
    measurement of an earlier one is not reused."""
    return hashlib.sha256("\n".join([cell_toml(study, cell), *MEASURE_OVERRIDES]).encode()).hexdigest()


def _measurement(study: StudyConfig, cell: Cell, round_index: int, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of ``cell``: its step cost, decompositions' part, and what its configuration implies (the
    modelled communication, and for K-FAC the decompositions' share-out)."""
    step_seconds, resolved = measure_cell(study, cell, args.steps, args.warmup, args.threads, args.override)
    kfac = bool(resolved["derived"]["kfac_factor_shapes"])
    seconds, share = step_cost(step_seconds, int(resolved["kfac"]["inv_update_steps"]) if kfac else None)
    largest = max(study.batch_sizes) // min(study.batch_sizes)
    return {
        "round": round_index, "cell": cell.name, "config_sha256": _config_sha256(study, cell),
        "optimizer": cell.optimizer, "batch": str(cell.batch_size), "seconds": seconds, "decompositions": share,
        "communication": communication_seconds(resolved, largest),
        # the same factor shapes at every batch size: one run's make the share-out model
        "speedups": decomposition_speedups(resolved, largest) if share is not None else None,
    }  # fmt: skip


def measure_rounds(study: StudyConfig, args: argparse.Namespace, partial: Path) -> dict[str, Any]:
    """Every cell measured once per round, ``args.rounds`` rounds (a drift of the machine touches every cell alike),
    and the median over rounds: seconds per step, decompositions' part, distkfac's share-out, and the spread. Each
    measurement is kept in ``partial`` as it is made; a run started again with the same settings reuses those of
    its cells whose configuration is unchanged."""
    settings = {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "override": args.override}
    earlier = {(m["round"], m["cell"], m["config_sha256"]): m for m in _earlier_measurements(partial, settings)}
    measurements = []
    for round_index in range(args.rounds):
        for cell in selected_cells(study, args.cells):
            found = earlier.get((round_index, cell.name, _config_sha256(study, cell)))
            measurement = found or _measurement(study, cell, round_index, args)
            measurements.append(measurement)
            if found is None:
                kept = [*measurements, *(m for m in earlier.values() if m not in measurements)]
                atomic_write_text(partial, json.dumps({"settings": settings, "measurements": kept}) + "\n")
            line = f"round {round_index + 1}, {cell.name}: {measurement['seconds'] * 1e3:.2f} ms/step"
            if measurement["decompositions"] is not None:
                line += f", of which decompositions {measurement['decompositions'] * 1e3:.2f}"
            print(line + (" (measured before the interruption)" if found else ""), flush=True)
    return _summary(measurements)


def _summary(measurements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of each cell, the rounds' spread, and the share-out and communication models."""
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in measurements:
        samples.setdefault((m["optimizer"], m["batch"]), []).append(m)
    costs: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, float]] = {}
    decompositions: dict[str, dict[str, float]] = {}
    for (optimizer, batch), values in samples.items():
        rounds = [m["seconds"] for m in values]
        costs.setdefault(optimizer, {})[batch] = statistics.median(rounds)
        spread.setdefault(optimizer, {})[batch] = max(rounds) / min(rounds)
        if parts := [m["decompositions"] for m in values if m["decompositions"] is not None]:
            decompositions.setdefault(optimizer, {})[batch] = statistics.median(parts)
    return {
        "seconds_per_step": costs,
        "max_over_min_of_rounds": spread,
        "decomposition_seconds_per_step": decompositions,
        "decomposition_speedup": next((m["speedups"] for m in measurements if m["speedups"]), {}),
        "communication_seconds_per_step": {m["optimizer"]: m["communication"] for m in measurements},
        "network": network().name,
    }


def add_communication(study: StudyConfig, path: Path, threads: int) -> None:
    """The modelled communication of each optimizer, written into the step-cost file ``path``."""
    result = json.loads(path.read_text())
    largest = max(study.batch_sizes) // min(study.batch_sizes)
    communication = {}
    for cell in study.cells():
        if cell.optimizer not in communication:
            _, resolved = measure_cell(study, cell, 2, 0, threads)
            communication[cell.optimizer] = communication_seconds(resolved, largest)
    result.update({"communication_seconds_per_step": communication, "network": network().name})
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.communication_only:
        study = load_study(args.config)
        path = Path(args.out) if args.out else study.out_dir / STEP_COST_JSON
        add_communication(study, path, args.threads)
        print(path)
        return 0
    if args.steps <= args.warmup or args.rounds < 1:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}, and --rounds be at least 1")
    study = load_study(args.config)
    started = time.monotonic()
    out = Path(args.out) if args.out else study.out_dir / STEP_COST_JSON
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "study": str(args.config),
        "command": "python -m benchmarks.step_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()}",
        **measure_rounds(study, args, partial_file(out)),
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    partial_file(out).unlink(missing_ok=True)
    print(f"{out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
