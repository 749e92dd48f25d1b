"""How a run ended, as ``summary.json`` and ``python -m jobs.train``'s exit status say it, for the programs above.

Rank 0 writes ``summary.json`` whenever a run ends, however it ends, with two fields besides the measurements:
``end`` (a :class:`RunEnd` value) and ``reason`` (why it did not finish, else None). ``jobs.train`` exits with
:data:`EXIT_STATUS` of the end. A program that starts a run (hpo_worker, the study) reads these two and never the
run's log text. Torch-free, so that such a program need not import torch to read them.

A program that started a run may ask it to stop early (a pruner of hpo_worker): it writes the file
:data:`PRUNE_REQUEST` in the run's folder, whose text says why. Rank 0 looks for it at each step record
(``run.log_every``); the answer rides on that record's all-reduce, so every rank stops after the same step, and the
run ends as :attr:`RunEnd.PRUNED` without its final evaluations. A run removes a stale request when it starts.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Final

__all__ = [
    "EXIT_BAD_CONFIG", "EXIT_STATUS", "PRUNE_REQUEST", "SUMMARY_JSON", "RunEnd", "end_from_exit_status",
    "read_summary",
]  # fmt: skip

SUMMARY_JSON: Final = "summary.json"
PRUNE_REQUEST: Final = "prune_request"  # in run.out_dir: the program that started the run asks it to stop


class RunEnd(enum.StrEnum):
    FINISHED = "finished"  # trained its whole budget, or stopped at its target accuracy
    STOPPED = "stopped"  # run.stop_after_steps ended this invocation; --resume continues it
    DIVERGED = "diverged"  # the loss or K-FAC's factors became NaN or infinite: a result, not an error
    FAILED = "failed"  # an error ended it (``reason`` says which)
    PRUNED = "pruned"  # stopped at the request of the program that started it (PRUNE_REQUEST); not resumable


EXIT_BAD_CONFIG: Final = 2  # the configuration or the command line is wrong: nothing was trained
EXIT_STATUS: Final[dict[RunEnd, int]] = {
    RunEnd.FINISHED: 0,
    RunEnd.STOPPED: 0,
    RunEnd.DIVERGED: 3,
    RunEnd.FAILED: 1,
    RunEnd.PRUNED: 0,
}


def end_from_exit_status(status: int) -> RunEnd | None:
    """The end that ``status`` reports unambiguously (3: diverged); None for 0 and 1, which summary.json tells apart."""
    return RunEnd.DIVERGED if status == EXIT_STATUS[RunEnd.DIVERGED] else None


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``summary.json``, with ``end`` as a :class:`RunEnd`; None when there is none (or it is unreadable).

    A summary written before ``end`` existed is a finished run's.
    """
    path = Path(out_dir) / SUMMARY_JSON
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    summary["end"] = RunEnd(summary.get("end") or RunEnd.FINISHED)
    return summary
