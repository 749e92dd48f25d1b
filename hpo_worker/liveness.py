"""Liveness of running trials: the worker's heartbeat and the check that requeues trials whose heartbeat stopped.

A worker beats while its trial runs (:class:`Heartbeat`); the driver, and any idle worker, requeue a running trial
whose beat has not moved for ``grace_s`` seconds (:class:`StaleMonitor`), or at once when its owner ran on this host
and its process is gone (:func:`process_gone_on_this_host`, also what frees a dead driver's lease). Both only talk to
:class:`TrialStore`, and neither imports hyperopt, so a worker can use them without it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpo_worker.store import TrialState, TrialStore

__all__ = ["BeatClock", "Heartbeat", "StaleMonitor", "process_gone_on_this_host"]

NOTICE_S = 10.0  # a trial silent this long (or half the grace period) is named in the log, with the time left


def process_gone_on_this_host(holder: str | None) -> bool:
    """True when ``holder`` (a driver's ``host:pid`` or a worker's ``host:pid:random[:job=...]``) names a process
    of this host that no longer runs. False when it runs, or when it cannot be known (another host)."""
    parts = (holder or "").split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@dataclass
class BeatClock:
    """How long each running trial's heartbeat has not moved, for anyone who watches (requeuing or only reporting).

    Time is measured on this machine's monotonic clock from the moment a beat value was first seen, so clocks of
    other machines do not matter. Silence counts only while the clock is read: when two readings are more than
    ``blind_after_s`` apart (the database was away or paused, so no one could beat), every clock starts again."""

    blind_after_s: float
    _seen: dict[Any, tuple[Any, float]] = field(default_factory=dict)
    _last_reading: float | None = None

    def silences(self, docs: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
        """Seconds of silence of each running trial among ``docs``, by ``_id`` (0 for a beat not seen before)."""
        now = time.monotonic()
        blind = self._last_reading is not None and now - self._last_reading > self.blind_after_s
        self._last_reading = now
        silences = {}
        for doc in docs:
            if doc.get("state") != TrialState.RUNNING:
                continue
            beat = (doc.get("owner"), doc.get("version"), doc.get("heartbeat"))
            previous = self._seen.get(doc["_id"])
            if previous is None or previous[0] != beat or blind:
                self._seen[doc["_id"]] = (beat, now)
            silences[doc["_id"]] = now - self._seen[doc["_id"]][1]
        for key in set(self._seen) - set(silences):
            del self._seen[key]
        return silences

    def forget(self, key: Any) -> None:
        self._seen.pop(key, None)


@dataclass
class StaleMonitor:
    """Finds running trials whose heartbeat has not moved for ``grace_s`` seconds (on a :class:`BeatClock`) and
    requeues them (or marks them failed after ``max_retries`` requeues); a trial whose owner ran on this host and is
    gone is requeued at once."""

    store: TrialStore
    grace_s: float
    max_retries: int
    log: Callable[[str], None] = print
    _noticed: set[Any] = field(default_factory=set)  # silent trials already named in the log
    _clock: BeatClock = field(init=False)

    def __post_init__(self) -> None:
        self._clock = BeatClock(blind_after_s=self.grace_s / 2)

    def check(self, docs: Sequence[Mapping[str, Any]]) -> int:
        """Requeues the stale ones among ``docs`` (others are ignored); returns how many changed state."""
        by_id = {doc["_id"]: doc for doc in docs}
        silences = self._clock.silences(docs)
        changed = 0
        for key, silent_s in silences.items():
            doc = by_id[key]
            if process_gone_on_this_host(doc.get("owner")):
                changed += self._requeue(doc, f"worker {doc.get('owner')} is gone (its process on this host ended)")
            elif silent_s == 0:
                self._noticed.discard(key)
            elif silent_s >= self.grace_s:
                changed += self._requeue(doc, f"worker {doc.get('owner')} sent no heartbeat for {silent_s:.0f} s")
            elif silent_s >= self.notice_s and key not in self._noticed:
                self._noticed.add(key)
                self.log(self._waiting(doc, silent_s))
        self._noticed &= set(silences)
        return changed

    @property
    def notice_s(self) -> float:
        """Silence after which a trial is named in the log as waiting for the grace period."""
        return min(NOTICE_S, self.grace_s / 2)

    def silent(self) -> int:
        """How many running trials are silent and waiting for the grace period (for a progress line)."""
        return len(self._noticed)

    def _waiting(self, doc: Mapping[str, Any], silent_s: float) -> str:
        owner = str(doc.get("owner"))
        where = "it runs on this host" if owner.split(":")[0] == socket.gethostname() else "on another host"
        return (
            f"trial {doc['tid']}: owner {owner} silent for {silent_s:.0f} s ({where}): requeued after "
            f"{self.grace_s:g} s grace, in {self.grace_s - silent_s:.0f} s, unless it beats"
        )

    def _requeue(self, doc: Mapping[str, Any], reason: str) -> int:
        self._clock.forget(doc["_id"])
        outcome = self.store.requeue_if_unchanged(doc, max_retries=self.max_retries, reason=reason)
        if outcome is None:  # it beat or finished meanwhile
            return 0
        self.log(f"trial {doc['tid']}: {reason}: {outcome}")
        return 1


class Heartbeat:
    """``with Heartbeat(store, doc, owner, interval_s) as beat:`` beats for the trial ``doc`` in a thread while the
    block runs; ``beat.lost`` turns True when the trial was taken away (requeued by a monitor meanwhile)."""

    def __init__(self, store: TrialStore, doc: Mapping[str, Any], owner: str, interval_s: float) -> None:
        self.store, self.doc, self.owner, self.interval_s = store, doc, owner, interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.beat(self.doc, self.owner):
                    self.lost = True
                    return
                failing = False
            except Exception as exc:  # the database is away: the next beat tries again; said once per outage
                if not failing:
                    print(
                        f"hpo_worker worker: heartbeat failed ({type(exc).__name__}); training goes on, beats "
                        "resume when MongoDB answers",
                        file=sys.stderr,
                        flush=True,
                    )
                failing = True

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
