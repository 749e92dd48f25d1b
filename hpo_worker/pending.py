"""What TPE is told about trials still queued or running: the driver's "constant liar" (docs/hpo.md).

With many workers, several trials are always pending. hyperopt 0.2.7's ``tpe.suggest`` already keeps them in its
history with an infinite loss ("associate infinite loss to new/running/failed jobs"), so they fall into TPE's worse
group whatever the group's size. The choices here replace that infinity with a finite lie from the finished
trials' losses, or drop pending trials:

- ``worst`` (the default): the largest finished loss;
- ``mean``: their mean;
- ``best``: the smallest (pending points join the better group: TPE exploits around them);
- ``inf``: hyperopt's own handling, unchanged;
- ``ignore``: pending trials are left out, as if they did not exist.

A lie lives only in the driver's in-memory copy of the history that TPE reads; the store never holds it. Before
any trial has finished there is nothing to lie with, and pending trials keep hyperopt's infinity.

TPE uses losses only by rank: it splits the history into its best ``ceil(0.25 sqrt(n))`` trials and the rest. So a
lie that ranks among the rest (``worst``, and ``mean`` nearly always) proposes exactly what ``inf`` does; ``best``
and ``ignore`` change the proposals (tests/test_hpo_pending.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Final

from hpo_worker.store import TrialState

__all__ = ["PENDING_LIES", "STARTUP_TRIALS", "lie_loss", "tell_pending"]

PENDING_LIES: Final = ("worst", "mean", "best", "inf", "ignore")
# TPE proposes from the prior (random search) until this many trials exist: hyperopt's own n_startup_jobs default.
# The driver's --startup-trials changes it; a budget of at most this many trials per search is random search.
STARTUP_TRIALS: Final = 20


def _finished_losses(docs: Sequence[Mapping[str, Any]]) -> list[float]:
    return [
        float(d["result"]["loss"])
        for d in docs
        if d.get("state") == TrialState.DONE
        and d["result"].get("status") == "ok"
        and d["result"].get("loss") is not None
    ]


def lie_loss(docs: Sequence[Mapping[str, Any]], how: str) -> float | None:
    """The loss ``how`` gives pending trials, from the finished ones in ``docs`` (None: leave them as they are)."""
    if how not in PENDING_LIES:
        raise ValueError(f"unknown pending-trial lie {how!r}; choose one of {', '.join(PENDING_LIES)}")
    losses = _finished_losses(docs)
    if how in ("inf", "ignore") or not losses:
        return None
    if how == "worst":
        return max(losses)
    return min(losses) if how == "best" else statistics.fmean(losses)


def tell_pending(docs: Sequence[Mapping[str, Any]], how: str) -> list[dict[str, Any]]:
    """``docs`` as TPE should see them: pending trials given the lie ``how`` (copies; ``docs`` is not changed)."""
    lie = lie_loss(docs, how)
    told = []
    for doc in docs:
        if doc.get("state") not in (TrialState.NEW, TrialState.RUNNING):
            told.append(dict(doc))
        elif how == "ignore":
            continue
        elif lie is None:
            told.append(dict(doc))
        else:
            told.append({**doc, "state": TrialState.DONE, "result": {"status": "ok", "loss": lie, "lie": how}})
    return told
