"""Train a model as a TOML config says: ``python -m jobs.train --config FILE [--resume] [section.key=value ...]``.

Examples::

    python -m jobs.train --config jobs/configs/fashion_mlp_kfac.toml
    python -m jobs.train --config jobs/configs/fashion_mlp_sgd.toml optim.lr=0.1 data.batch_size=256 run.out_dir=runs/a
    torchrun --nproc-per-node=4 -m jobs.train --config jobs/configs/cifar10_resnet_kfac.toml
    python -m jobs.train --config runs/x/config.toml --resume      # continue from runs/x's newest checkpoint

The run's folder (``run.out_dir``, default ``runs/<config name>``) receives ``config.json`` (the resolved
configuration), ``metrics.jsonl``, ``metrics.csv``, ``summary.json`` (at the end) and ``checkpoints/`` (layout:
:mod:`jobs.checkpoint`). Keys and defaults: :mod:`jobs.config`. Exit status: 0 on success, 2 for a configuration
error (nothing was trained), 1 when training failed (the message says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from jobs.config import Config, ConfigError, load_config
from jobs.datasets import resolve_data_path

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="TOML config file (see jobs/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=0.1")
    return parser.parse_args(argv)


def _configure(args: argparse.Namespace) -> Config:
    config = load_config(args.config, args.overrides)
    if args.resume:
        config.run.resume = True
    resolve_data_path(config.data)  # a missing data set is reported before any process group is joined
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = _configure(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"jobs.train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0

    # Imported here: torch and distkfac are heavy, and the launch package is only needed to run.
    from jobs import parallel
    from jobs.loop import TrainingDiverged, run_training

    try:
        context = parallel.start(config.run.backend)
    except RuntimeError as exc:  # launch.environment.LaunchError and friends: the launcher's variables are wrong
        print(f"jobs.train: error: cannot join the other ranks: {exc}", file=sys.stderr)
        return 1
    try:
        summary = run_training(config, context)
    except ConfigError as exc:
        print(f"jobs.train: error (rank {context.rank}): {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, ValueError, OSError) as exc:
        print(f"jobs.train: training failed (rank {context.rank}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    parallel.stop(context)
    if context.rank == 0:
        print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    # Leave without the interpreter's teardown: by now every file is closed and the process group destroyed, and
    # what is left is C++ static destruction, where torch.distributed's threads can abort the process ("terminate
    # called without an active exception", SIGABRT: 2 of 25 two-rank srun launches on a loaded node) and so turn a
    # finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
