"""A live view of experiments in the store: trials per state, the best so far, workers alive, a rate and an ETA.

``python -m hpo_worker status --exp NAME [--exp NAME2 ...] [--watch SECONDS]`` and ``python -m study status``
(docs/hpo.md). Everything is read from the store, as the driver and the workers leave it:

- **workers alive**: the distinct owners of running trials whose heartbeat (``refresh_time``) is at most
  :data:`ALIVE_S` old; running trials with an older heartbeat are counted as silent. An idle worker holds no trial
  and is not seen. Heartbeats are stamped with the workers' clocks: hosts whose clocks differ by more than
  :data:`ALIVE_S` seconds show as silent.
- **done** and **diverged**: the done trials whose run finished, and those whose run diverged (a done trial with
  status fail: the objective's value of a diverged run, not an error);
- **rate**: trials that finished (done, pruned or failed) in the last :data:`RATE_WINDOW_S` seconds, per minute;
  **ETA**: the trials still to finish (``max_evals`` less the finished ones) at that rate.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from hpo_worker.report import summarize
from hpo_worker.store import FINISHED_STATES, TrialState, TrialStore, state_counts, utcnow

__all__ = [
    "ALIVE_S", "RATE_WINDOW_S", "ExperimentStatus", "StateReader", "experiment_status", "format_status", "watch",
]  # fmt: skip

ALIVE_S = 30.0
RATE_WINDOW_S = 600.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: a terminal redraws the view in place


class StateReader:
    """The states of some experiments' trials, read again and again at little cost: a finished trial never changes
    again (FINISHED_STATES), so after the first read only the trials seen unfinished and the newer ones (larger
    tids) are asked for. A study's progress line read every trial every 15 s: about a second of nx-27017's time at
    1700 trials, past the line's patience, so that it said "unavailable" for the rest of the study."""

    def __init__(self, store: TrialStore, exp_keys: Sequence[str]) -> None:
        self.store, self.exp_keys = store, list(exp_keys)
        self.seen: dict[tuple[str, int], dict[str, Any]] = {}

    def read(self) -> list[dict[str, Any]]:
        """Every trial of the experiments as ``TrialStore.trial_states`` gives them, as they are now. One query
        per experiment, each within the store's patience (a progress line's is a second)."""
        newest: dict[str, int] = {}
        for exp_key, tid in self.seen:
            newest[exp_key] = max(tid, newest.get(exp_key, -1))
        unfinished = [d["_id"] for d in self.seen.values() if d["state"] not in FINISHED_STATES]
        docs = [doc for k in self.exp_keys for doc in self.store.trial_states([k], newest.get(k, -1))]
        docs += self.store.trial_states_of(unfinished) if unfinished else []
        for doc in docs:
            self.seen[(doc["exp_key"], int(doc["tid"]))] = doc
        return list(self.seen.values())


@dataclass(frozen=True)
class ExperimentStatus:
    exp_key: str
    max_evals: int | None
    counts: Mapping[TrialState, int]
    diverged: int  # of the done trials: the runs that diverged (done with status fail, hpo_worker.trial)
    best_tid: int | None
    best_loss: float | None
    workers_alive: int
    silent: int
    rate_per_min: float | None
    eta_s: float | None

    @property
    def finished(self) -> int:
        return sum(self.counts[state] for state in FINISHED_STATES)


def _naive(value: Any) -> dt.datetime | None:
    """A stored time as a naive UTC datetime, or None. nx-27017 (0.8.1) hands back a time written by ``$set`` (every
    heartbeat) as text, ``2026-12-02 13:39:27.752000``: read as that time, not as no time."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def _rate(docs: Sequence[Mapping[str, Any]], now: dt.datetime) -> float | None:
    """Trials finished per minute over the last RATE_WINDOW_S (or since the first trial started, if later)."""
    started = [t for d in docs if (t := _naive(d.get("book_time"))) is not None]
    ended = [t for d in docs if d.get("state") in FINISHED_STATES and (t := _naive(d.get("refresh_time")))]
    if not started or not ended:
        return None
    window = min(RATE_WINDOW_S, max((now - min(started)).total_seconds(), 1.0))
    recent = sum((now - t).total_seconds() <= window for t in ended)
    return 60.0 * recent / window if recent else None


def experiment_status(store: TrialStore, exp_key: str, now: dt.datetime | None = None) -> ExperimentStatus:
    now = now or utcnow()
    docs = store.trial_docs(exp_key, curves=False)
    counts = state_counts(docs)
    diverged = sum(d["state"] == TrialState.DONE and (d.get("result") or {}).get("status") == "fail" for d in docs)
    running = [d for d in docs if d["state"] == TrialState.RUNNING]
    fresh = [d for d in running if (t := _naive(d.get("refresh_time"))) and (now - t).total_seconds() <= ALIVE_S]
    best = summarize(docs, top_k=1)["best"]
    max_evals = (store.get_experiment(exp_key) or {}).get("max_evals")
    rate = _rate(docs, now)
    left = max(int(max_evals) - sum(counts[s] for s in FINISHED_STATES), 0) if max_evals else None
    return ExperimentStatus(
        exp_key=exp_key, max_evals=int(max_evals) if max_evals else None, counts=counts, diverged=diverged,
        best_tid=best["tid"] if best else None, best_loss=best["loss"] if best else None,
        workers_alive=len({d.get("owner") for d in fresh}), silent=len(running) - len(fresh),
        rate_per_min=rate, eta_s=60.0 * left / rate if rate and left is not None else None,
    )  # fmt: skip


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_status(statuses: Sequence[ExperimentStatus], now: dt.datetime | None = None) -> str:
    """One row per experiment, then the totals when there are several."""
    header = ("experiment", "finished", "done", "diverged", "pruned", "failed", "running", "queued", "best loss",
              "best tid", "workers", "silent", "per min", "ETA")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for s in statuses:
        c = s.counts
        rows.append((
            s.exp_key, f"{s.finished}/{s.max_evals or '?'}", str(c[TrialState.DONE] - s.diverged), str(s.diverged),
            str(c[TrialState.PRUNED]),
            str(c[TrialState.ERROR]), str(c[TrialState.RUNNING]), str(c[TrialState.NEW]),
            "-" if s.best_loss is None else f"{s.best_loss:.6g}", "-" if s.best_tid is None else str(s.best_tid),
            str(s.workers_alive), str(s.silent), "-" if s.rate_per_min is None else f"{s.rate_per_min:.2f}",
            _duration(s.eta_s),
        ))  # fmt: skip
    if len(statuses) > 1:
        finished = sum(s.finished for s in statuses)
        total = sum(s.max_evals or 0 for s in statuses)
        rate = sum(s.rate_per_min or 0.0 for s in statuses)
        eta = 60.0 * (total - finished) / rate if rate and total else None
        rows.append(("all", f"{finished}/{total or '?'}", *[""] * 8, str(sum(s.workers_alive for s in statuses)),
                     str(sum(s.silent for s in statuses)), f"{rate:.2f}" if rate else "-", _duration(eta)))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    stamp = (now or utcnow()).isoformat(timespec="seconds")
    return f"hpo status at {stamp} UTC\n" + "\n".join(lines)


def watch(
    read: Callable[[], Sequence[ExperimentStatus]], every_s: float, out: TextIO = sys.stdout, rounds: int = 0
) -> None:
    """Prints the view every ``every_s`` seconds, redrawn in place on a terminal, until every experiment has its
    ``max_evals`` finished (or ``rounds`` views, when given)."""
    done = 0
    while True:
        statuses = read()
        out.write((CLEAR if out.isatty() else "") + format_status(statuses) + "\n")
        out.flush()
        done += 1
        complete = all(s.max_evals and s.finished >= s.max_evals for s in statuses)
        if complete or (rounds and done >= rounds):
            return
        time.sleep(every_s)
