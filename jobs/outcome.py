"""How a run ended, as ``summary.json`` and ``python -m jobs.train``'s exit status say it, for the programs above.

Rank 0 writes ``summary.json`` whenever a run ends, however it ends, with two fields besides the measurements:
``end`` (a :class:`RunEnd` value) and ``reason`` (why it did not finish, else None). ``jobs.train`` exits with
:data:`EXIT_STATUS` of the end. A program that starts a run (hpo_worker, the study) reads these two and never the
run's log text. Torch-free, so that such a program need not import torch to read them.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Final

__all__ = ["EXIT_BAD_CONFIG", "EXIT_STATUS", "SUMMARY_JSON", "RunEnd", "end_from_exit_status", "read_summary"]

SUMMARY_JSON: Final = "summary.json"


class RunEnd(enum.StrEnum):
    FINISHED = "finished"  # trained its whole budget, or stopped at its target accuracy
    STOPPED = "stopped"  # run.stop_after_steps ended this invocation; --resume continues it
    DIVERGED = "diverged"  # the loss or K-FAC's factors became NaN or infinite: a result, not an error
    FAILED = "failed"  # an error ended it (``reason`` says which)


EXIT_BAD_CONFIG: Final = 2  # the configuration or the command line is wrong: nothing was trained
EXIT_STATUS: Final[dict[RunEnd, int]] = {
    RunEnd.FINISHED: 0,
    RunEnd.STOPPED: 0,
    RunEnd.DIVERGED: 3,
    RunEnd.FAILED: 1,
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
