"""Validation: the model against benchmarks.distributed at P = 1, 2, 4 over loopback gloo, with the network and
the sharing of this machine measured."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from benchmarks.scale_model.configs import Config, Schedule
from benchmarks.scale_model.constants import ROOT, RUNS
from benchmarks.scale_model.kernels import kernels_for
from benchmarks.scale_model.layer_sets import layer_set_from_module
from benchmarks.scale_model.network import Network
from benchmarks.scale_model.projection import project


def loopback_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of ``world`` gloo ranks timing allreduces of 4 B to 4 MiB over loopback (rank 0 writes the medians)."""
    import torch.distributed as dist

    from distkfac.comm import leave

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    medians = {}
    for numel in (1, 1024, 16384, 262144, 1048576):
        buffer = torch.zeros(numel)
        for _ in range(3):
            dist.all_reduce(buffer)
        times = []
        for _ in range(15):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - start)
        medians[4 * numel] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(medians))
    leave(0)  # gloo can abort at exit in torch 2.13 (distkfac.comm.leave)


def measure_loopback(world: int, out: Path) -> Network:
    """alpha and beta of gloo over loopback at ``world`` ranks, from an allreduce sweep read as a ring's
    ``2(p-1) alpha + 2(p-1)/p n beta``: the smallest message gives alpha, the slope beta."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from benchmarks.scale_model import loopback_worker as w; w(int(sys.argv[1]), {}, {}, {!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code.format(world, port, str(out))]
    procs = [subprocess.Popen([*command, str(rank)], cwd=ROOT, env=env) for rank in range(world)]
    if any(proc.wait(timeout=300) for proc in procs):
        raise SystemExit("scale_model: the gloo loopback measurement failed")
    points = sorted((float(n), t) for n, t in json.loads(out.read_text()).items())
    (small, t_small), (large, t_large) = points[0], points[-1]
    steps = 2 * (world - 1)
    beta = max(t_large - t_small, 0.0) / (large - small) / (steps / world)
    name = f"gloo over loopback, {world} ranks (allreduce of {small:.0f} B to {large:.0f} B)"
    return Network(name, t_small / steps, beta, frozenset())


SHARED_GEMM = """
import sys, time, torch
torch.set_num_threads(1)
a, b = torch.randn(384, 384), torch.randn(384, 384)
start = float(sys.argv[1])
while time.time() < start:
    a @ b
count, began = 0, time.perf_counter()
while time.perf_counter() - began < 2.0:
    a @ b
    count += 1
print((time.perf_counter() - began) / count)
"""


def measure_sharing(worlds: Iterable[int]) -> dict[int, float]:
    """How many times slower a 1-thread GEMM runs while ``P`` processes run it at once, for each ``P``: the ranks of
    a loopback run share this machine's cores, caches and memory bandwidth (and whatever else runs on it)."""
    per_call = {}
    for world in sorted({1, *worlds}):
        start = str(time.time() + 4.0)  # every process imports torch first, then all start together
        command = [sys.executable, "-c", SHARED_GEMM, start]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(world)]
        per_call[world] = statistics.mean(float(proc.communicate(timeout=120)[0]) for proc in procs)
    return {world: seconds / per_call[1] for world, seconds in per_call.items()}


def parse_benchmark(text: str) -> tuple[int, dict[tuple[int, str], float]]:
    """benchmarks.distributed's printout: the global batch, and the median step seconds of its gloo rows."""
    found = re.search(r"global batch (\d+)", text)
    if not found:
        raise ValueError("scale_model: no 'global batch' in the benchmark's output")
    steps = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0].isdigit() and cells[1] == "gloo":
            steps[(int(cells[0]), cells[2])] = float(cells[8]) / 1e3
    return int(found.group(1)), steps


def validate(measured: Path | None, remeasure: bool) -> list[str]:
    """The model against ``python -m benchmarks.distributed --worlds 1,2,4 --skip-balance`` (run here unless
    ``measured`` holds its output): the benchmark's MLP, 1 thread per rank, loopback gloo; the benchmark reports the
    median step, a step without decompositions (9 in 10 steps), so that is what is compared."""
    from benchmarks.distributed import BASELINE, STRATEGIES
    from benchmarks.step_time import build_model

    RUNS.mkdir(exist_ok=True)
    if measured is None:
        measured = RUNS / "scale_model_validation_benchmark.txt"
        command = [sys.executable, "-m", "benchmarks.distributed", "--worlds", "1,2,4", "--skip-balance"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
        if result.returncode:
            raise SystemExit(f"scale_model: the benchmark failed:\n{result.stderr[-3000:]}")
        measured.write_text(result.stdout)
    batch, steps = parse_benchmark(measured.read_text())
    kernels = kernels_for("cpu", 1, None, remeasure)
    worlds = sorted({world for world, _ in steps})
    networks = {w: measure_loopback(w, RUNS / f"scale_model_loopback-{w}.json") for w in worlds if w > 1}
    sharing = measure_sharing(worlds)
    rows = [
        f"Validation against {measured.relative_to(ROOT) if measured.is_relative_to(ROOT) else measured} (benchmark "
        f"MLP, global batch {batch}, 1 thread per rank, {os.cpu_count()} cores). The P ranks share this machine: "
        "every kernel time is multiplied by how much slower a 1-thread GEMM runs while P processes run it at once ("
        + ", ".join(f"P = {w}: {sharing[w]:.2f}" for w in worlds)
        + "). Loopback gloo, ring formulas, measured at each P: "
        + "; ".join(f"P = {w}: alpha {n.alpha * 1e6:.1f} us, {1e-9 / n.beta:.2f} GB/s" for w, n in networks.items())
        + ".",
        "",
        "| P | strategy | measured median step ms | model ms | model / measured - 1 |",
        "|---:|---|---:|---:|---:|",
    ]
    for (world, name), seconds in sorted(steps.items()):
        baseline = name.endswith(" baseline")
        config = Config.from_settings({**STRATEGIES[name.removesuffix(" baseline")], **(BASELINE if baseline else {})})
        layer_set = layer_set_from_module("MLP", build_model("mlp"), torch.zeros(batch // world, 784))
        network = networks.get(world, Network("none", 0.0, 0.0))
        projected = project(layer_set, config, world, kernels.scaled(sharing[world]), network, Schedule(10, 1))
        predicted = projected.normal_s
        rows.append(
            f"| {world} | {name} | {seconds * 1e3:.1f} | {predicted * 1e3:.1f} | {predicted / seconds - 1:+.1%} |"
        )
    return rows
