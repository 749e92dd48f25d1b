"""The pruner's threshold stop replayed on a study's stored learning curves: what it would have stopped, whether any
of those trials reached the target later, and the training time after the stops.

Run from the repository root (it reads files only; a running study may go on)::

    python -m benchmarks.threshold_replay --config jobs/configs/studies/critical_cifar10_cnn.toml
    python -m benchmarks.threshold_replay --config jobs/configs/studies/critical_fashion_mlp.toml --accuracy 0.11

For the ``steps_to_target`` objective, the stop with ``threshold = 1 + target - ACCURACY`` and ``threshold_after =
AFTER`` stops a trial whose best test accuracy is still at most ACCURACY once it has trained AFTER of its budget
(docs/hpo.md). Every trial's evaluations, over all its attempts (a resumed attempt writes only its own steps), are
turned into the pruner's values by ``hpo_worker.trial.intermediate_values`` and judged by
``hpo_worker.pruning.threshold_reason`` after each evaluation, as a worker would. The time after a stop is the sum
of the step and evaluation records' own seconds past the stop's step: what the trial spent training that the stop
would have saved (a trial already stopped by another rule saves only up to where it ended).
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpo_worker.pruning import PrunerSettings, threshold_reason
from hpo_worker.trial import intermediate_values
from jobs.metrics import read_metrics
from study.config import load_study


def trial_records(exp_dir: Path) -> dict[int, tuple[int, list[dict[str, Any]]]]:
    """Per tid: its budget in steps and its records over all attempts, by step (a later attempt's record of a step
    replaces an earlier one's: it is what the trial kept after resuming from a checkpoint)."""
    trials: dict[int, tuple[int, dict[tuple[str, int], dict[str, Any]]]] = {}
    attempts = sorted(exp_dir.glob("trial*.*/run"), key=lambda p: [int(x) for x in p.parent.name[5:].split(".")])
    for run in attempts:
        try:
            total = int(json.loads((run / "config.json").read_text())["derived"]["total_steps"])
        except (OSError, ValueError, KeyError):
            continue  # an attempt that never started training
        tid = int(run.parent.name[5:].split(".")[0])
        _, records = trials.setdefault(tid, (total, {}))
        for record in read_metrics(run):
            if record.get("kind") in ("step", "eval") and "step" in record:
                records[(record["kind"], int(record["step"]))] = record
    return {tid: (total, sorted(r.values(), key=lambda r: r["step"])) for tid, (total, r) in trials.items()}


def replay(records: Sequence[dict[str, Any]], total: int, target: float, settings: PrunerSettings) -> int | None:
    """The step at which the threshold stop would have stopped the trial, None if never."""
    reports = intermediate_values(records, "steps_to_target", total, target)
    for i in range(len(reports)):
        if threshold_reason(reports[: i + 1], settings) is not None:
            return reports[i].step
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threshold_replay", description=__doc__)
    parser.add_argument("--config", required=True, help="study file (jobs/configs/studies/)")
    parser.add_argument("--out", help="the study's output folder (default: the file's study.out_dir)")
    parser.add_argument("--accuracy", type=float, default=0.11, help="best accuracy still stopped (default 0.11)")
    parser.add_argument("--after", type=float, default=0.2, help="budget fraction before the stop (default 0.2)")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    args.command = shlex.join(["python", "-m", "benchmarks.threshold_replay", *given])
    study = load_study(args.config, out_dir=args.out)
    target = study.target_accuracy
    settings = PrunerSettings(threshold=1 + target - args.accuracy, threshold_after=args.after)
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    stopped_rows = []
    closest: list[tuple[float, str, int]] = []  # the trials that reached the target: best accuracy when judged
    for exp_dir in sorted((study.out_dir / "trials").glob("*/")):
        optimizer = exp_dir.name.split("-")[-2]
        for tid, (total, records) in sorted(trial_records(exp_dir).items()):
            seconds = sum(float(r.get("seconds") or 0) for r in records)
            reached = any((r.get("test_accuracy") or 0) >= target for r in records if r["kind"] == "eval")
            stop = replay(records, total, target, settings)
            if reached:
                closest.append((_best_when_judged(records, total, args.after), exp_dir.name, tid))
            count = counts[optimizer]
            count["trials"] += 1
            count["seconds"] += seconds  # type: ignore[assignment]
            if stop is None:
                continue
            after = sum(float(r.get("seconds") or 0) for r in records if r["step"] > stop)
            count["stopped"] += 1
            count["reached later"] += reached
            count["seconds after"] += after  # type: ignore[assignment]
            stopped_rows.append((exp_dir.name, tid, stop, total, reached, after))
    _print(args, study.target_accuracy, counts, stopped_rows)
    for accuracy, cell, tid in sorted(closest)[:3]:
        print(f"- closest of the trials that reached the target: {cell} trial {tid}, best accuracy {accuracy:.3f} "
              f"when judged")  # fmt: skip
    return 0


def _best_when_judged(records: Sequence[dict[str, Any]], total: int, after: float) -> float:
    """The best test accuracy up to the first evaluation at or past ``after`` of the budget: what the stop reads."""
    best = 0.0
    for record in records:
        if record["kind"] == "eval":
            best = max(best, float(record.get("test_accuracy") or 0))
            if record["step"] >= after * total:
                break
    return best


def _print(args: argparse.Namespace, target: float, counts: Any, stopped: Sequence[tuple[Any, ...]]) -> None:
    print(f"# {args.command}")
    print(f"threshold stop: best test accuracy <= {args.accuracy:g} (value >= {1 + target - args.accuracy:g}) "
          f"after {args.after:g} of the budget; target {target:g}")  # fmt: skip
    print(
        "\n| optimizer | trials | stopped | of them reached the target later | training hours | hours after the stops |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in sorted(counts, key=lambda o: ("sgd", "adam", "kfac").index(o) if o in ("sgd", "adam", "kfac") else 9):
        c = counts[name]
        print(f"| {name} | {c['trials']} | {c['stopped']} | {c['reached later']} | {c['seconds'] / 3600:.2f} | "
              f"{c['seconds after'] / 3600:.2f} |")  # fmt: skip
    total = sum(c["seconds"] for c in counts.values())
    after = sum(c["seconds after"] for c in counts.values())
    trials, stops = sum(c["trials"] for c in counts.values()), sum(c["stopped"] for c in counts.values())
    reached = sum(c["reached later"] for c in counts.values())
    print(f"| all | {trials} | {stops} | {reached} | {total / 3600:.2f} | {after / 3600:.2f} |")
    print("\nstopped: cell, tid, step of the stop / budget, reached the target later, hours after")
    for cell, tid, stop, budget, reached, seconds in stopped:
        print(f"- {cell} trial {tid}: step {stop} / {budget}, {'REACHED' if reached else 'no'}, {seconds / 3600:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
