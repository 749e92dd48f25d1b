"""A trial reserved again continues from its earlier attempt's newest checkpoint, not from step 0.

Each reservation of a trial runs in its own folder (``trial<tid>.<version>``, :func:`hpo_worker.result_file.trial_dir`),
whose ``attempt.json`` says which trial it trains: experiment, tid, overrides, a digest of the base config, ranks.
While it trains, the run checkpoints every ``checkpoint_every_s`` seconds (``run.checkpoint_every_s``). When the
trial comes back (its worker got SIGTERM, was killed, or lost its heartbeat and was requeued), the earlier attempt of
the same trial whose run got furthest is copied into the new folder, and :func:`hpo_worker.trial.run_trial` resumes
it (``run.resume=true``: jobs verifies the checkpoint, and its resume computes what the uninterrupted run computes).

Copied, not moved: a worker that lost its heartbeat may still be writing in the old folder, and every attempt's files
stay as they were. An attempt of another trial that shares the folder name (an experiment made again under the same
name), or of another number of ranks (a checkpoint resumes only on as many ranks), is never taken.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jobs.checkpoint import has_checkpoint
from jobs.files import atomic_write_text

__all__ = ["ATTEMPT_FILE", "CHECKPOINT_EVERY_S", "RUN_DIR", "interrupted_attempt", "prepare_attempt"]

ATTEMPT_FILE = "attempt.json"
RUN_DIR = "run"  # the training run's out_dir inside the attempt's folder
CHECKPOINT_EVERY_S = 300.0  # a worker's default: at most about 5 minutes of a trial are trained twice after a stop


def _identity(doc: Mapping[str, Any], experiment: Mapping[str, Any], ranks: int) -> dict[str, Any]:
    config = str(experiment.get("config_text", ""))
    return {
        "exp_key": doc["exp_key"],
        "tid": doc["tid"],
        "overrides": list(doc["spec"]["overrides"]),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "ranks": ranks,
    }


def _furthest_run(
    experiment_dir: Path, tid: int, same: Callable[[Mapping[str, Any]], bool], skip: Path | None = None
) -> tuple[Path, int] | None:
    """(run folder, checkpoint step) of the attempt of trial ``tid`` in ``experiment_dir`` (other than ``skip``)
    whose attempt record is ``same`` and whose checkpoint is newest."""
    best: tuple[Path, int] | None = None
    for record in experiment_dir.glob(f"trial{tid}.*/{ATTEMPT_FILE}"):
        if record.parent == skip:
            continue
        try:
            matches = same(json.loads(record.read_text()))
        except (OSError, ValueError, AttributeError):  # unreadable: not this trial's, as far as anyone can tell
            continue
        ref = has_checkpoint(record.parent / RUN_DIR) if matches else None
        if ref is not None and (best is None or ref.step > best[1]):
            best = (record.parent / RUN_DIR, ref.step)
    return best


def interrupted_attempt(experiment_dir: Path, doc: Mapping[str, Any]) -> Path | None:
    """The attempt folder in ``experiment_dir`` (a worker's ``<workdir>/<exp>``) that a reservation of the queued
    trial ``doc`` would continue from: its attempt with the newest checkpoint, of the same experiment, trial and
    overrides (the worker also compares the base config's digest and the ranks, which the trial does not hold)."""

    def same(record: Mapping[str, Any]) -> bool:
        keys = (record.get("exp_key"), record.get("tid"), record.get("overrides"))
        return keys == (doc["exp_key"], doc["tid"], list(doc["spec"]["overrides"]))

    furthest = _furthest_run(experiment_dir, int(doc["tid"]), same)
    return furthest[0].parent if furthest else None


def prepare_attempt(out_dir: Path, doc: Mapping[str, Any], experiment: Mapping[str, Any], ranks: int) -> str | None:
    """Writes ``out_dir/attempt.json`` and copies the furthest earlier attempt's run into ``out_dir/run``; says
    what it copied (None when there was nothing to continue). A copy that fails leaves a fresh start."""
    identity = _identity(doc, experiment, ranks)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / ATTEMPT_FILE, json.dumps(identity, indent=1) + "\n")
    earlier = _furthest_run(out_dir.parent, int(doc["tid"]), lambda record: record == identity, skip=out_dir)
    if earlier is None or (out_dir / RUN_DIR).exists():
        return None
    source, step = earlier
    try:
        shutil.copytree(source, out_dir / RUN_DIR, symlinks=True)
    except (OSError, shutil.Error) as exc:  # e.g. the old attempt pruned a checkpoint while it was copied
        shutil.rmtree(out_dir / RUN_DIR, ignore_errors=True)
        return f"could not copy {source} ({exc}): starting from step 0"
    return f"continues from {source.parent.name}'s checkpoint at step {step}"
