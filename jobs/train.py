"""Train a model as a TOML config says: ``python -m jobs.train --config FILE [--resume] [section.key=value ...]``.

Examples::

    python -m jobs.train --config jobs/configs/fashion_mlp_kfac.toml
    python -m jobs.train --config jobs/configs/fashion_mlp_sgd.toml optim.lr=0.1 data.batch_size=256 run.out_dir=runs/a
    torchrun --nproc-per-node=4 -m jobs.train --config jobs/configs/cifar10_resnet_kfac.toml
    python -m jobs.train --config runs/x/config.toml --resume      # continue from runs/x's newest checkpoint

The run's folder (``run.out_dir``, default ``runs/<config name>``) receives ``config.json`` (the resolved
configuration), ``metrics.jsonl``, ``metrics.csv``, ``summary.json`` (however the run ends: ``end`` and ``reason``
say how, see :mod:`jobs.outcome`) and ``checkpoints/`` (layout: :mod:`jobs.checkpoint`). Keys and defaults:
:mod:`jobs.config`. Exit status (``jobs.outcome.EXIT_STATUS``): 0 when the run finished or stopped
(run.stop_after_steps), 3 when it diverged, 1 when it failed (the message says why), 2 for a configuration error
(nothing was trained).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from jobs.config import Config, ConfigError, load_config
from jobs.datasets import resolve_data_path
from jobs.outcome import EXIT_BAD_CONFIG, EXIT_STATUS, RunEnd

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
    """Runs ``python -m jobs.train``; returns the exit status (the process itself leaves through ``leave``)."""
    args = parse_args(argv)
    try:
        config = _configure(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"jobs.train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
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
        return EXIT_STATUS[RunEnd.FAILED]
    try:
        summary = run_training(config, context)
    except ConfigError as exc:
        print(f"jobs.train: error (rank {context.rank}): {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except TrainingDiverged as exc:
        print(f"jobs.train: training diverged (rank {context.rank}): {exc}", file=sys.stderr)
        return EXIT_STATUS[RunEnd.DIVERGED]
    except (ValueError, OSError) as exc:
        print(f"jobs.train: training failed (rank {context.rank}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_STATUS[RunEnd.FAILED]
    if context.rank == 0:
        print(summary.line(), flush=True)
    return EXIT_STATUS[RunEnd(summary.end)]


def _main_then_leave() -> None:
    try:
        status = main()
    except Exception:  # unexpected: the whole traceback, then the failed run's status
        traceback.print_exc()
        status = EXIT_STATUS[RunEnd.FAILED]
    from distkfac.comm import leave

    leave(status)  # a barrier and the process group's end when all went well; no interpreter teardown either way


if __name__ == "__main__":
    _main_then_leave()
