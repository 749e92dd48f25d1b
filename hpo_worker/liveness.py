"""Liveness of running trials: the worker's heartbeat and the check that requeues trials whose heartbeat stopped.

A worker beats while its trial runs (:class:`Heartbeat`); the driver, and any idle worker, requeue a running trial
whose beat has not moved for ``grace_s`` seconds (:class:`StaleMonitor`). Both only talk to :class:`TrialStore`,
and neither imports hyperopt, so a worker can use them without it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpo_worker.store import TrialState, TrialStore

__all__ = ["Heartbeat", "StaleMonitor"]


@dataclass
class StaleMonitor:
    """Finds running trials whose heartbeat has not moved for ``grace_s`` seconds and requeues them (or marks them
    failed after ``max_retries`` requeues). Time is measured on this machine's monotonic clock from the moment a
    beat value was first seen, so clocks of other machines do not matter."""

    store: TrialStore
    grace_s: float
    max_retries: int
    log: Callable[[str], None] = print
    _seen: dict[Any, tuple[Any, float]] = field(default_factory=dict)

    def check(self, docs: Sequence[Mapping[str, Any]]) -> int:
        """Requeues the stale ones among ``docs`` (others are ignored); returns how many changed state."""
        now = time.monotonic()
        changed = 0
        running = set()
        for doc in docs:
            if doc.get("state") != TrialState.RUNNING:
                continue
            key = doc["_id"]
            running.add(key)
            beat = (doc.get("owner"), doc.get("version"), doc.get("heartbeat"))
            previous = self._seen.get(key)
            if previous is None or previous[0] != beat:
                self._seen[key] = (beat, now)
                continue
            if now - previous[1] < self.grace_s:
                continue
            changed += self._requeue(doc, now - previous[1])
            self._seen.pop(key, None)
        for key in set(self._seen) - running:
            del self._seen[key]
        return changed

    def _requeue(self, doc: Mapping[str, Any], silent_s: float) -> int:
        reason = f"worker {doc.get('owner')} sent no heartbeat for {silent_s:.0f} s"
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
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.beat(self.doc, self.owner):
                    self.lost = True
                    return
            except Exception as exc:  # a network hiccup: try again at the next beat
                print(f"hpo_worker worker: heartbeat failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
