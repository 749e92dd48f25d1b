"""A finished trial's result, kept in its folder (``result.json``) until the store has it.

The worker writes it (all or nothing, :func:`jobs.files.atomic_write_text`) before it stores the result, and renames
it to ``result.stored.json`` once the store has it. A result the store never got (the database was away for longer
than the worker's patience, the worker died right after training, or the trial was requeued meanwhile) is found by
the next reservation of the same trial, by this worker or any other that shares the work folder, and stored
instead of training again. Any attempt's folder counts (``trial<tid>.<version>``): every attempt trains the same
overrides, so the first finished one is the trial's result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.files import atomic_write_text

__all__ = ["RESULT_FILE", "STORED_FILE", "KeptResult", "find_kept", "keep", "mark_stored", "trial_dir"]

RESULT_FILE = "result.json"  # a result the store does not have yet
STORED_FILE = "result.stored.json"  # the same, once stored


@dataclass(frozen=True)
class KeptResult:
    path: Path
    result: dict[str, Any]
    error: tuple[str, str] | None  # (exception type, message) of a trial that failed, as ``TrialStore.finish`` takes


def trial_dir(workdir: str | Path, doc: Mapping[str, Any]) -> Path:
    """``<workdir>/<exp>/trial<tid>.<version>``: a fresh folder for each reservation of the trial."""
    return Path(workdir).resolve() / str(doc["exp_key"]) / f"trial{doc['tid']}.{doc['version']}"


def keep(
    out_dir: Path, doc: Mapping[str, Any], result: Mapping[str, Any], error: tuple[str, str] | None = None
) -> Path:
    """Writes the trial's result to ``out_dir/result.json`` (with what identifies the trial) and returns its path."""
    record = {
        "exp_key": doc["exp_key"],
        "tid": doc["tid"],
        "version": doc["version"],
        "overrides": list(doc["spec"]["overrides"]),
        "result": dict(result),
        "error": list(error) if error else None,
    }
    path = out_dir / RESULT_FILE
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def mark_stored(path: Path) -> None:
    os.replace(path, path.with_name(STORED_FILE))


def find_kept(workdir: str | Path, doc: Mapping[str, Any]) -> KeptResult | None:
    """A result of this trial, from any attempt's folder, that the store does not have; None when there is none.

    A file of another trial that happens to share the folder name (an experiment made again under the same name)
    is not taken: the experiment, the tid and the overrides must agree."""
    exp_dir = trial_dir(workdir, doc).parent
    for path in sorted(exp_dir.glob(f"trial{doc['tid']}.*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # unreadable: train again rather than store something doubtful
            continue
        same = (record.get("exp_key"), record.get("tid"), record.get("overrides")) == (
            doc["exp_key"], doc["tid"], list(doc["spec"]["overrides"]),
        )  # fmt: skip
        if same and isinstance(record.get("result"), dict):
            error = record.get("error")
            return KeptResult(path, record["result"], (str(error[0]), str(error[1])) if error else None)
    return None
