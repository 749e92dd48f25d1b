"""Data-parallel K-FAC: bytes, factor memory, decomposition balance and step time, strategy by strategy.

Run from the repository root::

    python -m benchmarks.distributed                     # balance, then torchrun at 1, 2, 4 processes on gloo
    python -m benchmarks.distributed --worlds 2 --steps 20 --skip-balance

Two parts:

1. **Balance** (one process, no communication): the work assignment of ResNet-50's layers (ImageNet shapes) and
   ResNet-32's (CIFAR shapes) over P ranks for each strategy; the max/mean of the per-rank decomposition cost, both
   under the ``n^3`` model the assignment uses and with the measured time of one float32 ``eigh`` of each size.
2. **Runs** (torchrun, gloo, one thread per rank): each strategy, and the "allreduce everything" baseline of the same
   strategy (full factors allreduced to every rank, as KAISA does, no overlap), trains the benchmark's MLP with a
   fixed global batch split across the ranks. Per step: bytes sent per rank (the communicator's counters, cost model
   in ``distkfac/comm/base.py``; gradient averaging included, as the model is not DDP-wrapped), per-rank K-FAC memory
   (max over ranks), and the median step time over the timed steps (max over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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

from benchmarks.step_time import build_model, cpu_model, make_batch
from distkfac.assignment import assign_work, grad_workers_for
from distkfac.comm import leave

STRATEGIES: dict[str, dict[str, Any]] = {
    "comm-opt": {"strategy": "comm-opt"},
    "mem-opt": {"strategy": "mem-opt"},
    "hybrid": {"strategy": "hybrid", "grad_worker_fraction": 0.5},
}
BASELINE = {"factor_reduction": "allreduce", "pack_factors": False, "overlap_comm": False}


def resnet50_dims() -> list[tuple[int, int]]:
    """(a_dim, g_dim) of ResNet-50's conv and fc layers (convs without bias, fc with)."""
    dims = [(3 * 7 * 7, 64)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            dims += [(channels, width), (width * 9, width), (width, width * 4)]
            if block == 0:
                dims.append((channels, width * 4))  # the projection shortcut
            channels = width * 4
    return [*dims, (2048 + 1, 1000)]


def resnet32_dims() -> list[tuple[int, int]]:
    dims = [(3 * 9, 16)]
    channels = 16
    for width in (16, 32, 64):
        for _ in range(5):
            dims += [(channels * 9, width), (width * 9, width)]
            channels = width
    return [*dims, (64 + 1, 10)]


def eigh_seconds(sizes: set[int]) -> dict[int, float]:
    seconds = {}
    for n in sorted(sizes):
        x = torch.randn(n, max(n, 64))
        factor = x @ x.T / x.shape[1]
        torch.linalg.eigh(factor)  # warm-up
        start = time.perf_counter()
        torch.linalg.eigh(factor)
        seconds[n] = time.perf_counter() - start
    return seconds


def balance_table(worlds: Sequence[int]) -> list[str]:
    rows = [
        "| layer set | P | strategy | cost max/mean, n^3 model | cost max/mean, measured eigh | "
        "factor memory of the fullest rank / all factors |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, dims in (("ResNet-50", resnet50_dims()), ("ResNet-32", resnet32_dims())):
        measured = eigh_seconds({n for pair in dims for n in pair})
        for world in worlds:
            for strategy, settings in STRATEGIES.items():
                if strategy == "hybrid" and world < 4:
                    continue
                workers = grad_workers_for(strategy, settings.get("grad_worker_fraction"), world)
                work = assign_work(dims, world, workers)
                seconds = [0.0] * world
                elements = [0] * world  # running factors are kept by their owner only
                for (a, g), layer in zip(dims, work.layers, strict=True):
                    seconds[layer.a_owner] += measured[a]
                    seconds[layer.g_owner] += measured[g]
                    elements[layer.a_owner] += a * a
                    elements[layer.g_owner] += g * g
                timed = max(seconds) / (sum(seconds) / world)
                memory = max(elements) / sum(elements)
                rows.append(
                    f"| {name} | {world} | {strategy} | {work.balance():.3f} | {timed:.3f} | {memory:.3f} "
                    f"(1/P = {1 / world:.3f}) |"
                )
    return rows


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: time every configuration, write this rank's numbers as JSON."""
    import torch.distributed as dist

    from distkfac import KFACPreconditioner

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = make_batch(args.model, args.batch_size, seed=0)
    shard = args.batch_size // world
    x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
    results = {}
    configs = [(s, False) for s in STRATEGIES] + [(s, True) for s in STRATEGIES]
    for strategy, baseline in configs:
        settings = dict(STRATEGIES[strategy], **(BASELINE if baseline else {}))
        try:
            grad_workers_for(settings["strategy"], settings.get("grad_worker_fraction"), world)
        except ValueError:
            continue  # hybrid with a fraction that does not fit this world size
        torch.manual_seed(0)
        model = build_model(args.model)
        precond = KFACPreconditioner(model, inv_update_steps=10, damping=1e-3, **settings)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        times = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                precond.comm.stats.reset()
            dist.barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            precond.step()
            optimizer.step()
            times.append(time.perf_counter() - start)
        memory = precond.memory_bytes()
        results[f"{strategy}{' baseline' if baseline else ''}"] = {
            "step_s": statistics.median(times[args.warmup :]),
            "bytes_per_step": {k: v / args.steps for k, v in precond.comm.stats.bytes_sent.items()},
            "factor_bytes": memory["factors"],
            "decomposition_bytes": memory["decompositions"],
        }
        precond.remove_hooks()
    Path(args.out).joinpath(f"rank{rank}.json").write_text(json.dumps(results))
    leave(0)  # gloo can abort at exit even after barrier + destroy_process_group (torch 2.13)


def run_world(world: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",
            f"--nproc-per-node={world}",
            "-m",
            "benchmarks.distributed",
            "--worker",
            "--out",
            out,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {world} processes failed:\n{result.stderr[-5000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    merged = {}
    for name in ranks[0]:
        per_rank = [r[name] for r in ranks]
        merged[name] = {
            "step_s": max(r["step_s"] for r in per_rank),
            "bytes": statistics.mean(sum(r["bytes_per_step"].values()) for r in per_rank),
            "factor_bytes": max(r["factor_bytes"] for r in per_rank),
            "decomposition_bytes": max(r["decomposition_bytes"] for r in per_rank),
        }
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch, split across the ranks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-balance", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"command: python -m benchmarks.distributed {shlex.join(sys.argv[1:])}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}")
    if not args.skip_balance:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        print("\n" + "\n".join(balance_table([2, 4, 8])))
    print(f"\nmodel {args.model}, global batch {args.batch_size}, {args.steps} timed steps, gloo, 1 thread per rank")
    print("| P | strategy | bytes/step/rank | vs baseline | factor MiB/rank | decomp. MiB/rank | step ms | vs P=1 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    single = None
    for world in worlds:
        merged = run_world(world, args)
        if world == 1:
            single = merged["comm-opt"]["step_s"]
        for name, row in merged.items():
            if name.endswith("baseline"):
                continue
            base = merged.get(f"{name} baseline")
            ratio = f"{row['bytes'] / base['bytes']:.2f}" if base and base["bytes"] else "-"
            speed = f"{row['step_s'] / single:.2f}" if single else "-"
            for label, values, vs in ((name, row, ratio), (f"{name} baseline", base, "1.00")):
                if values is None:
                    continue
                print(
                    f"| {world} | {label} | {values['bytes'] / 1024:.1f} KiB | {vs if world > 1 else '-'} | "
                    f"{values['factor_bytes'] / 2**20:.2f} | {values['decomposition_bytes'] / 2**20:.2f} | "
                    f"{values['step_s'] * 1e3:.1f} | {speed if label == name else '-'} |"
                )


if __name__ == "__main__":
    main()
