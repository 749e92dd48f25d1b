"""One diagnostic pass of the empirical Fisher's top eigenpair over the whole Fashion-MNIST training set, against one
training epoch of the same model, with 1 and 2 ranks (torchrun, gloo, one thread per rank)::

    python -m benchmarks.fisher_pass                       # worlds 1 and 2, layers 5 (output), 3, and the model
    python -m benchmarks.fisher_pass --worlds 1 --layers 5 --examples 10000
    python -m benchmarks.fisher_pass --worlds 1 --examples 6000 --ways factors rows   # factors against rows

The model is ``jobs/configs/fashion_mlp_sgd.toml``'s MLP (784-256-128-10, 235,146 parameters) after the timed
epoch of SGD from its initial weights (batch 128, lr 0.05, no momentum: our choice for the benchmark). The epoch:
every global batch split over the ranks, gradients averaged through the communicator, as ``jobs.train`` does
without DDP. The pass: ``jobs.diagnostics.gradient_rows`` (the layer's per-example gradients: Linear factors, or
rows) and ``distkfac.diagnostics.top_eigenpairs`` (k = 1, its automatic route). The whole record
(``jobs.diagnostics.fisher_record``: also the trimmed eigenvalue, recomputed, and the MAD outliers) is timed as
well. Times are the maximum over the ranks. ``--ways rows`` turns the Linear factors off
(``jobs.diagnostics.FACTORS_BYTES = 0``): the per-example gradients are then rows, in memory below 256 MiB per
rank, else recomputed on every Lanczos step (the code before the factors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CONFIG = "jobs/configs/fashion_mlp_sgd.toml"


def _epoch(model: torch.nn.Module, data: Any, context: Any, batch: int) -> float:
    from distkfac.comm.ops import average_gradients

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    shard = batch // context.world_size
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for start in range(0, len(order) - batch + 1, batch):
        idx = order[start + context.rank * shard : start + (context.rank + 1) * shard]
        optimizer.zero_grad()
        F.cross_entropy(model(data.prepare(data.train_x[idx], context.device)), data.train_y[idx]).backward()
        average_gradients(model.parameters(), context.comm)
        optimizer.step()
    return time.perf_counter() - started


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: the epoch, then each layer's pass and record; this rank's seconds as JSON."""
    import jobs.diagnostics
    from distkfac.comm import leave
    from distkfac.comm.ops import barrier
    from distkfac.diagnostics import top_eigenpairs
    from jobs.config import load_config
    from jobs.datasets import load_dataset
    from jobs.diagnostics import fisher_record, gradient_rows
    from jobs.models import build_model
    from jobs.parallel import start

    if args.way == "rows":
        jobs.diagnostics.FACTORS_BYTES = 0
    torch.set_num_threads(1)
    context = start("gloo")
    base = load_config(CONFIG, [f"data.train_examples={args.examples}", "run.fisher_every=1"])
    data = load_dataset(base.data)
    torch.manual_seed(0)
    model = build_model(base.model, data.input_shape, data.classes)
    results: dict[str, Any] = {"epoch_s": _epoch(model, data, context, args.batch)}
    for layer in args.layers:
        config = load_config(CONFIG, [f"data.train_examples={args.examples}", "run.fisher_every=1",
                                      f"run.fisher_layer={json.dumps('' if layer == 'all' else layer)}"])  # fmt: skip
        barrier(context.comm, context.device)
        started = time.perf_counter()
        top = top_eigenpairs(gradient_rows(model, data, config, context), 1, comm=context.comm)
        pass_s = time.perf_counter() - started
        started = time.perf_counter()
        fisher_record(model, data, config, context, None)
        results[layer] = {"pass_s": pass_s, "record_s": time.perf_counter() - started, "method": top.method,
                          "lambda1": float(top.values[0])}  # fmt: skip
    Path(args.out, f"rank{context.rank}.json").write_text(json.dumps(results))
    leave(0)  # gloo can abort at exit even after barrier + destroy_process_group (torch 2.13)


def run_world(world: int, way: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={world}",
            "-m", "benchmarks.fisher_pass", "--worker", "--out", out, "--examples", str(args.examples),
            "--batch", str(args.batch), "--way", way, "--layers", *args.layers,
        ]  # fmt: skip
        result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {world} processes failed:\n{result.stderr[-5000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    merged: dict[str, Any] = {"epoch_s": max(r["epoch_s"] for r in ranks)}
    for layer in args.layers:
        merged[layer] = {key: max(r[layer][key] for r in ranks) for key in ("pass_s", "record_s")}
        merged[layer].update(method=ranks[0][layer]["method"], lambda1=ranks[0][layer]["lambda1"])
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fisher_pass", description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", nargs="+", default=["5", "3", "all"], help="module names, or all (the model)")
    parser.add_argument("--examples", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ways", nargs="+", default=["factors"], choices=["factors", "rows"])
    parser.add_argument("--way", default="factors", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    print("| ranks | gradients | parameters | route | epoch (s) | top eigenpair pass (s) | pass / epoch | "
          "whole record (s) | record / epoch |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for world in args.worlds:
        for way in args.ways:
            _print_rows(world, way, run_world(world, way, args), args.layers)


def _print_rows(world: int, way: str, merged: dict[str, Any], layers: Sequence[str]) -> None:
    epoch = merged["epoch_s"]
    for layer in layers:
        entry, name = merged[layer], "model" if layer == "all" else f"layer {layer}"
        print(f"| {world} | {way} | {name} | {entry['method']} | {epoch:.2f} | "
              f"{entry['pass_s']:.2f} | {entry['pass_s'] / epoch:.2f} | {entry['record_s']:.2f} | "
              f"{entry['record_s'] / epoch:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
