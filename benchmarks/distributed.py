"""Data-parallel K-FAC: bytes, factor memory, decomposition balance and step time, strategy by strategy.

Run from the repository root::

    python -m benchmarks.distributed                     # balance, then torchrun at 1, 2, 4 processes on gloo
    python -m benchmarks.distributed --worlds 2 --steps 20 --skip-balance
    python -m benchmarks.distributed --worlds 2,4 --comms torch,mpi,horovod --skip-balance   # gloo, MPI, Horovod

Two parts:

1. **Balance** (one process, no communication): the work assignment of ResNet-50's layers (ImageNet shapes) and
   ResNet-32's (CIFAR shapes) over P ranks for each strategy; the max/mean of the per-rank decomposition cost, both
   under the ``n^3`` model the assignment uses and with the measured time of one float32 ``eigh`` of each size.
2. **Runs** (one thread per rank; gloo under torchrun, the MPI and Horovod communicators under mpirun): each
   strategy, and the "allreduce everything" baseline of the same strategy (full factors allreduced to every rank, as
   KAISA does, no overlap), trains the benchmark's MLP with a fixed global batch split across the ranks. Per step:
   bytes sent per rank (the communicator's counters, cost model in ``distkfac/comm/base.py``; gradient averaging
   included, as the model is not DDP-wrapped), the factor reductions launched, per-rank K-FAC memory (max over
   ranks), and the median step time over the timed steps (max over ranks); each communicator's step time is also
   given as a ratio to gloo's at the same P.
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
from collections.abc import Callable, Sequence
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


def _join(kind: str) -> tuple[Any, Callable[[], None]]:
    """This rank's communicator for ``kind`` (torch: gloo under torchrun; mpi, horovod: under mpirun), and a barrier."""
    from distkfac.comm import barrier

    if kind in ("torch", "torch-each"):
        import torch.distributed as dist

        from distkfac.comm.torch_dist import TorchDistCommunicator

        dist.init_process_group("gloo")
        return TorchDistCommunicator(owner_reduction="each" if kind == "torch-each" else "scatter"), dist.barrier
    if kind == "mpi":
        from distkfac.comm.mpi import MPICommunicator

        comm: Any = MPICommunicator()
    else:
        import horovod.torch as hvd

        from distkfac.comm.horovod import HorovodCommunicator

        hvd.init(process_sets="dynamic")
        comm = HorovodCommunicator()
    return comm, lambda: barrier(comm, torch.device("cpu"))


def _time_config(comm: Any, sync: Callable[[], None], settings: dict[str, Any], args: argparse.Namespace) -> dict:
    """One configuration on this rank: median step time and bytes per step over the timed steps, K-FAC memory."""
    from distkfac import KFACPreconditioner

    x, y = make_batch(args.model, args.batch_size, seed=0)
    shard = args.batch_size // comm.world_size
    x, y = x[comm.rank * shard : (comm.rank + 1) * shard], y[comm.rank * shard : (comm.rank + 1) * shard]
    torch.manual_seed(0)
    model = build_model(args.model)
    precond = KFACPreconditioner(model, inv_update_steps=10, damping=1e-3, comm=comm, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.stats.reset()
        sync()
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        optimizer.step()
        times.append(time.perf_counter() - start)
    memory = precond.memory_bytes()
    precond.remove_hooks()
    return {
        "step_s": statistics.median(times[args.warmup :]),
        "bytes_per_step": {k: v / args.steps for k, v in comm.stats.bytes_sent.items()},
        "calls_per_step": {k: v / args.steps for k, v in comm.stats.calls.items()},
        "factor_bytes": memory["factors"],
        "decomposition_bytes": memory["decompositions"],
    }


def worker(args: argparse.Namespace) -> None:
    """One rank: time every configuration over ``args.comm``, write this rank's numbers as JSON."""
    torch.set_num_threads(1)
    comm, sync = _join(args.comm)
    results = {}
    for strategy, baseline in [(s, False) for s in STRATEGIES] + [(s, True) for s in STRATEGIES]:
        settings = dict(STRATEGIES[strategy], **(BASELINE if baseline else {}))
        try:
            grad_workers_for(settings["strategy"], settings.get("grad_worker_fraction"), comm.world_size)
        except ValueError:
            continue  # hybrid with a fraction that does not fit this world size
        results[f"{strategy}{' baseline' if baseline else ''}"] = _time_config(comm, sync, settings, args)
    Path(args.out).joinpath(f"rank{comm.rank}.json").write_text(json.dumps(results))
    leave(0)  # gloo can abort at exit even after barrier + destroy_process_group (torch 2.13)


# Open MPI as root on a machine with fewer cores than ranks (../shared/notes/hpc-stack.md).
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def _launch_command(kind: str, world: int) -> list[str]:
    if kind.startswith("torch"):
        return [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={world}"]
    return ["mpirun", "-np", str(world), "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", sys.executable]


def run_world(world: int, kind: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        command = [*_launch_command(kind, world), "-m", "benchmarks.distributed", "--worker", "--comm", kind]
        command += ["--out", out, "--model", args.model, "--batch-size", str(args.batch_size)]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = {**os.environ, **MPI_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            # Both ends: the first error of the rank that failed, and the others' reports of it.
            raise SystemExit(
                f"{kind} with {world} processes failed:\n{result.stderr[:4000]}\n...\n{result.stderr[-3000:]}"
            )
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    merged = {}
    for name in ranks[0]:
        per_rank = [r[name] for r in ranks]
        merged[name] = {
            "step_s": max(r["step_s"] for r in per_rank),
            "bytes": statistics.mean(sum(r["bytes_per_step"].values()) for r in per_rank),
            "factor_calls": statistics.mean(r["calls_per_step"].get("factors", 0.0) for r in per_rank),
            "factor_bytes": max(r["factor_bytes"] for r in per_rank),
            "decomposition_bytes": max(r["decomposition_bytes"] for r in per_rank),
        }
    return merged


def print_runs(results: dict[tuple[int, str], dict[str, dict[str, Any]]]) -> None:
    """One row per world size, communicator and configuration; ratios against the baseline, P = 1 and gloo."""
    print("| P | comm | strategy | bytes/step/rank | vs baseline | factor reductions/step | factor MiB/rank | "
          "decomp. MiB/rank | step ms | vs P=1 | vs gloo |")  # fmt: skip
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    single = results.get((1, "torch"), {}).get("comm-opt", {}).get("step_s")
    for (world, kind), merged in results.items():
        gloo = results.get((world, "torch"), {})
        for name, row in merged.items():
            base = merged.get(name.removesuffix(" baseline") + " baseline")
            ratio = f"{row['bytes'] / base['bytes']:.2f}" if base and base["bytes"] and world > 1 else "-"
            speed = f"{row['step_s'] / single:.2f}" if single and not name.endswith("baseline") else "-"
            versus = f"{row['step_s'] / gloo[name]['step_s']:.2f}" if name in gloo and kind != "torch" else "-"
            print(
                f"| {world} | {COMM_NAMES[kind]} | {name} | {row['bytes'] / 1024:.1f} KiB | {ratio} | "
                f"{row['factor_calls']:.1f} | {row['factor_bytes'] / 2**20:.2f} | "
                f"{row['decomposition_bytes'] / 2**20:.2f} | {row['step_s'] * 1e3:.1f} | {speed} | {versus} |"
            )


COMM_NAMES = {"torch": "gloo", "torch-each": "gloo, one reduce per owner", "mpi": "MPI", "horovod": "Horovod"}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument(
        "--comms",
        default="torch",
        help="comma-separated: torch (gloo), torch-each (gloo, a reduce per owner), mpi, horovod",
    )
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch, split across the ranks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-balance", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--comm", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    comms = args.comms.split(",")
    print(f"command: python -m benchmarks.distributed {shlex.join(sys.argv[1:])}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}")
    if not args.skip_balance:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        print("\n" + "\n".join(balance_table([2, 4, 8])))
    print(f"\nmodel {args.model}, global batch {args.batch_size}, {args.steps} timed steps, 1 thread per rank")
    results = {}
    for world in worlds:
        for kind in comms if world > 1 else ["torch"]:  # one process: nothing travels, whatever the library
            results[(world, kind)] = run_world(world, kind, args)
    print_runs(results)


if __name__ == "__main__":
    main()
