"""Decompositions off the critical path and split factors: the step-time spike, and what they cost in convergence.

Run from the repository root (each part on a quiet machine; results are kept under ``runs/kfac_at_scale/``)::

    python -m benchmarks.kfac_at_scale spikes                  # torchrun, P = 4 on gloo, the benchmark MLP
    python -m benchmarks.kfac_at_scale convergence --seeds 5   # jobs.train runs, one process each, resumable

1. **spikes.** Four ranks (gloo over loopback, one thread each) train ``benchmarks.step_time``'s MLP (784-256-256-
   256-10, global batch 512) with ``inv_update_steps=10``, comm-opt: every step is timed between barriers, and the
   slowest rank's time is the step's. Over the timed steps (three intervals, each with a decomposition step), the
   ratio of the slowest step to the median step, and the median, for synchronous and asynchronous decompositions,
   without and with ``split_factors_above=256`` (the 785 x 785 A of the first layer becomes 4 blocks).
2. **convergence.** ``jobs.train`` to a test-accuracy target on Fashion-MNIST, several seeds each, steps to the
   target (evaluated every 5 steps): the K-FAC MLP of ``jobs/configs/fashion_mlp_kfac.toml`` with synchronous
   against asynchronous (one interval stale) decompositions; LeNet-5 with K-FAC, exact factors against factors
   split above 64 (conv2's 151 x 151 A into 3 blocks, fc1's 257 x 257 into 5, and the fc G's of 120 and 84 into 2).
   Means with standard errors over the seeds. A run that exists (its ``summary.json``) is not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.distributed import MPI_ENV, _join
from benchmarks.step_time import build_model, cpu_model, make_batch
from distkfac.comm import leave

OUT = Path("runs/kfac_at_scale")
SPIKE_MODES: dict[str, dict[str, Any]] = {
    "synchronous": {},
    "asynchronous": {"async_decompositions": True},
    "synchronous, split above 256": {"split_factors_above": 256},
    "asynchronous, split above 256": {"async_decompositions": True, "split_factors_above": 256},
}
INTERVAL = 10
CONFIG = "jobs/configs/fashion_mlp_kfac.toml"
MLP = ["run.target_accuracy=0.88", "run.epochs=10"]
LENET = ["model.name=lenet5", "run.target_accuracy=0.87", "run.epochs=6"]
CONVERGENCE: dict[str, list[str]] = {  # name: overrides of CONFIG (targets chosen before any run of these pairs)
    "MLP, synchronous": MLP,
    "MLP, asynchronous": [*MLP, "kfac.async_decompositions=true"],
    "LeNet-5, exact factors": LENET,
    "LeNet-5, split above 64": [*LENET, "kfac.split_factors_above=64"],
}


def _time_mode(comm: Any, barrier: Any, settings: dict[str, Any], warmup: int, steps: int) -> list[float]:
    """This rank's time of every timed step (between barriers) for one configuration."""
    from distkfac import KFACPreconditioner

    x, y = make_batch("mlp", 512, seed=0)
    shard = 512 // comm.world_size
    x, y = x[comm.rank * shard : (comm.rank + 1) * shard], y[comm.rank * shard : (comm.rank + 1) * shard]
    torch.manual_seed(0)
    model = build_model("mlp")
    precond = KFACPreconditioner(model, inv_update_steps=INTERVAL, damping=1e-3, comm=comm, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    times = []
    for _ in range(warmup + steps):
        barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        optimizer.step()
        times.append(time.perf_counter() - start)
    precond.remove_hooks()
    return times[warmup:]


def spike_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    comm, barrier = _join("torch")
    results = {name: _time_mode(comm, barrier, settings, 5, 3 * INTERVAL) for name, settings in SPIKE_MODES.items()}
    Path(args.out, f"rank{comm.rank}.json").write_text(json.dumps(results))
    leave(0)  # gloo can abort at exit even after barrier + destroy_process_group (torch 2.13)


def spikes(args: argparse.Namespace) -> None:
    world = args.world
    with tempfile.TemporaryDirectory() as out:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", f"--nproc-per-node={world}", "-m", "benchmarks.kfac_at_scale"]
        command += ["spike-worker", "--out", out]
        env = {**os.environ, **MPI_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"torchrun failed:\n{result.stderr[-4000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    print(f"P = {world} (gloo, loopback), benchmark MLP, global batch 512, inv_update_steps = {INTERVAL}, comm-opt, ")
    print(f"{3 * INTERVAL} timed steps after 5 warm-up steps; a step's time is its slowest rank's\n")
    print("| decompositions | median step ms | slowest step ms | slowest / median | slowest step (from 0) | "
          "per interval: slowest / median, mean |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name in SPIKE_MODES:
        steps = [max(rank[name][i] for rank in ranks) for i in range(len(ranks[0][name]))]
        median, slowest = statistics.median(steps), max(steps)
        # Each interval of inv_update_steps steps holds one decomposition step (steps 10, 20, 30 from 0).
        intervals = [steps[i : i + INTERVAL] for i in range(5, len(steps), INTERVAL)]
        per_interval = statistics.mean(max(chunk) / median for chunk in intervals if chunk)
        print(
            f"| {name} | {median * 1e3:.1f} | {slowest * 1e3:.1f} | {slowest / median:.2f} | "
            f"{5 + steps.index(slowest)} | {per_interval:.2f} |"
        )


def _run_training(name: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """One jobs.train run (skipped when its summary exists); its summary."""
    slug = name.lower().replace(", ", "-").replace(" ", "-")
    out = OUT / "convergence" / f"{slug}-seed{seed}"
    summary = out / "summary.json"
    if not summary.exists():
        settings = [f"run.seed={seed}", f"run.out_dir={out}", "run.eval_every_steps=5", "run.checkpoint_every=0"]
        command = [sys.executable, "-m", "jobs.train", "--config", CONFIG, *settings, *overrides]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(summary.read_text()))


def _mean_se(values: Sequence[float]) -> str:
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.1f} ± {se:.1f}"


def convergence(args: argparse.Namespace) -> None:
    print(f"Fashion-MNIST, K-FAC ({CONFIG}: batch 2048, lr 0.1, momentum 0.5, damping 1e-3, inv_update_steps 10,")
    print("KL clip 1e-3); test accuracy evaluated every 5 steps; MLP: target 0.88, at most 10 epochs; LeNet-5: target")
    print(f"0.87, at most 6 epochs; seeds 0..{args.seeds - 1}; mean ± standard error over the seeds that reached it\n")
    print("| run | steps to target | reached | final test accuracy | wall s |")
    print("|---|---:|---:|---:|---:|")
    for name, overrides in CONVERGENCE.items():
        summaries = [_run_training(name, seed, overrides) for seed in range(args.seeds)]
        reached = [s["steps_to_target"] for s in summaries if s.get("steps_to_target") is not None]
        accuracy = [s["test_accuracy"] for s in summaries if s.get("test_accuracy") is not None]
        wall = [s["seconds"] for s in summaries if s.get("seconds") is not None]
        print(
            f"| {name} | {_mean_se(reached) if reached else '-'} | {len(reached)}/{len(summaries)} | "
            f"{_mean_se([100 * a for a in accuracy]) if accuracy else '-'} % | "
            f"{_mean_se(wall) if wall else '-'} |"
        )
        print(f"<!-- {name}: steps to target by seed {[s.get('steps_to_target') for s in summaries]} -->")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    spike = parts.add_parser("spikes", help="slowest / median step at P ranks on gloo")
    spike.add_argument("--world", type=int, default=4)
    worker = parts.add_parser("spike-worker", help=argparse.SUPPRESS)
    worker.add_argument("--out", required=True)
    converge = parts.add_parser("convergence", help="steps to target, several seeds (resumable)")
    converge.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.part == "spike-worker":
        spike_worker(args)
        return
    print(f"command: python -m benchmarks.kfac_at_scale {' '.join(sys.argv[1:])}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    spikes(args) if args.part == "spikes" else convergence(args)


if __name__ == "__main__":
    main()
