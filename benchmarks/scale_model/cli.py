"""The command line: ``python -m benchmarks.scale_model`` (its help is the package's docstring)."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.scale_model.configs import Schedule
from benchmarks.scale_model.constants import WORLDS
from benchmarks.scale_model.kernels import Kernels, kernels_for
from benchmarks.scale_model.layer_sets import bert_large, resnet50
from benchmarks.scale_model.network import Network, infiniband_hdr
from benchmarks.scale_model.speedup import speedup_table
from benchmarks.scale_model.tables import Scenario, breakdown_table, step_table
from benchmarks.scale_model.validation import validate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from benchmarks import scale_model  # its docstring is the help; imported here, where the package is complete

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_model",
        description=scale_model.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sets", default="resnet50,bert-large", help="comma-separated: resnet50, bert-large")
    parser.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="world sizes P")
    parser.add_argument("--device", default="cpu", help="where the kernels are timed: cpu, cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for the kernels")
    parser.add_argument("--kernels", type=Path, help="kernel table JSON (default runs/scale_model_kernels-...)")
    parser.add_argument("--remeasure", action="store_true", help="time the kernels again (else the cached table)")
    parser.add_argument("--alpha-us", type=float, default=5.0, help="network latency per message step (us)")
    parser.add_argument("--bandwidth-gbs", type=float, default=24.0, help="per-rank network bandwidth (GB/s)")
    parser.add_argument(
        "--tree", choices=["allreduce", "all"], default="allreduce",
        help="collectives that may take a tree: allreduce only (NCCL: reduce and broadcast are rings), or all "
        "(reduce and broadcast too, as MPI libraries do)",
    )  # fmt: skip
    parser.add_argument("--breakdown-worlds", default="64,4096", help="world sizes of the time breakdown ('' none)")
    parser.add_argument("--inv-update-steps", type=int, default=10)
    parser.add_argument("--factor-update-steps", type=int, default=1)
    parser.add_argument("--split-above", type=int, default=1024, help="stage (2): split dense factors above this")
    parser.add_argument("--hybrid-fraction", type=float, default=0.5, help="gradient workers per layer / P")
    parser.add_argument("--resnet-batch", type=int, default=32, help="images per rank")
    parser.add_argument("--bert-batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--bert-seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--validate", action="store_true", help="compare with benchmarks.distributed at P = 1, 2, 4")
    parser.add_argument("--measured", type=Path, help="with --validate: that benchmark's saved output, not a new run")
    return parser.parse_args(argv)


def _header(args: argparse.Namespace, kernels: Kernels, network: Network) -> list[str]:
    from benchmarks.step_time import cpu_model

    peak = max(flops / seconds for flops, seconds in kernels.gemm) / 1e9
    eigh = ", ".join(f"{n:.0f}: {s * 1e3:.1f} ms" for n, s in kernels.eigh if n >= 256)
    return [
        f"command: python -m benchmarks.scale_model {shlex.join(sys.argv[1:])}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}",
        f"kernels: {kernels.device}, {kernels.threads} threads, float32: best GEMM {peak:.0f} GFLOP/s, eigh {eigh}, "
        f"copy {kernels.copy_bytes_per_s / 1e9:.1f} GB/s",
        f"network (our assumption): {network.name}; beta = 1 / bandwidth; per call the cheaper of ring and tree "
        f"(tree for: {', '.join(sorted(network.tree))}; reduce-scatter ring only)",
        f"schedule: factors every {args.factor_update_steps} step(s), decompositions every {args.inv_update_steps} "
        "steps; eigen; float32 model, factors, decompositions and communication; 8 MiB buckets; no DDP (the "
        "preconditioner averages the gradients); hybrid and the KAISA-like baseline with "
        f"grad_worker_fraction {args.hybrid_fraction:g}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.validate:
        print(f"command: python -m benchmarks.scale_model {shlex.join(sys.argv[1:])}\n")
        print("\n".join(validate(args.measured, args.remeasure)))
        return
    kernels = kernels_for(args.device, args.threads, args.kernels, args.remeasure)
    network = infiniband_hdr(args.alpha_us, args.bandwidth_gbs, args.tree)
    schedule = Schedule(args.inv_update_steps, args.factor_update_steps)
    worlds = [int(w) for w in args.worlds.split(",")]
    makers = {
        "resnet50": lambda: resnet50(args.resnet_batch),
        "bert-large": lambda: bert_large(args.bert_batch, args.bert_seq),
    }
    print("\n".join(_header(args, kernels, network)))
    for name in args.sets.split(","):
        layer_set = makers[name]()
        print(f"\n### {layer_set.note}\n")
        print("\n".join(speedup_table(layer_set, worlds, args.split_above, args.hybrid_fraction, kernels)))
        print()
        scenario = Scenario(kernels, network, schedule, args.split_above, args.hybrid_fraction)
        print("\n".join(step_table(layer_set, worlds, scenario)))
        breakdown = [int(w) for w in args.breakdown_worlds.split(",") if w]
        if breakdown:
            print("\n" + "\n".join(breakdown_table(layer_set, breakdown, scenario)), flush=True)
