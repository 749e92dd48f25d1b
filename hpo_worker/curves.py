"""While a trial trains: its learning curve to the store, and the pruner's verdict to the run (docs/hpo.md).

A :class:`CurveWatcher` thread reads the records the run appends to its ``metrics.jsonl`` (``jobs.metrics.MetricsTail``;
rank 0's, for a distributed run), turns them into the objective's intermediate values
(:func:`hpo_worker.trial.intermediate_values`), stores the curve on the trial document whenever it grows, and asks
the experiment's pruner (:mod:`hpo_worker.pruning`) about it against the other trials' curves in the store. When the
pruner says stop, it writes the run's stop request (``jobs.outcome.PRUNE_REQUEST``, its text the reason): every rank
stops after its next step record, and the trial is stored as pruned. Curves are stored with the pruner off too.

A failure here (the database away, an unreadable file) is logged and never ends the trial: pruning only saves time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

from hpo_worker.pruning import PrunerSettings, Report, curve_of, prune_reason
from hpo_worker.store import FINISHED_STATES, StoreError, TrialState, TrialStore
from hpo_worker.trial import intermediate_values
from jobs.files import atomic_write_text
from jobs.metrics import MetricsTail
from jobs.outcome import PRUNE_REQUEST

__all__ = ["CurveWatcher"]

JOIN_S = 1.0  # how long the end of a trial waits for the watcher's last poll
POLL_S = 0.25  # how often the run's new records are read: a request reaches the run this much after its evaluation


class CurveWatcher:
    def __init__(
        self, store: TrialStore, doc: Mapping[str, Any], owner: str, run_dir: Path, experiment: Mapping[str, Any],
        say: Callable[[str], None], poll_s: float = POLL_S,
    ) -> None:  # fmt: skip
        self.store, self.doc, self.owner, self.run_dir, self.say = store, doc, owner, run_dir, say
        self.settings = PrunerSettings.from_doc(experiment.get("pruner"))
        self.objective = str(experiment.get("objective", "test_loss"))
        self.poll_s = poll_s
        self.tail = MetricsTail(run_dir)
        self.records: list[dict[str, Any]] = []
        self.plan: tuple[int, float | None] | None = None  # the run's total steps and target accuracy
        self.stored = 0  # how many intermediate values the store has
        self.requested: str | None = None  # the reason of the stop request written
        self.seen: dict[int, dict[str, Any]] = {}  # the experiment's trials as last read, by tid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"curve-{doc['tid']}", daemon=True)

    def __enter__(self) -> CurveWatcher:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        # Not longer: a poll waiting for a database that went away must not hold up keeping the trial's result.
        # A report it makes later is refused by the store (the trial is no longer running as this owner's).
        self._thread.join(JOIN_S)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except (StoreError, OSError, ValueError, KeyError) as exc:
                self.say(f"trial {self.doc['tid']}: learning curve not stored this time ({type(exc).__name__}: {exc})")

    def _read_plan(self) -> tuple[int, float | None] | None:
        """Total steps and target accuracy, from the run's config.json (written by rank 0 when it starts)."""
        try:
            config = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return int(config["derived"]["total_steps"]), config["run"].get("target_accuracy") or None

    def poll(self) -> None:
        """Reads the run's new records; stores a grown curve and asks the pruner about it."""
        self.records += [r for r in self.tail.read_new() if r.get("kind") in ("eval", "epoch")]
        self.plan = self.plan or self._read_plan()
        if self.plan is None:
            return
        reports = intermediate_values(self.records, self.objective, *self.plan)
        if len(reports) == self.stored:
            return
        if not self.store.report_curve(self.doc, self.owner, [asdict(r) for r in reports]):
            return  # no longer this worker's trial: the heartbeat stops it
        self.stored = len(reports)
        # Read again at each new evaluation: a resumed driver may have turned the behind-best stop on since.
        experiment = self.store.get_experiment(str(self.doc["exp_key"])) or {}
        self.settings = PrunerSettings.from_doc(experiment.get("pruner"))
        if self.requested is None and self.settings.active:
            reason = prune_reason(self.settings, reports, *self._others())
            if reason is not None:
                atomic_write_text(self.run_dir / PRUNE_REQUEST, reason + "\n")
                self.requested = reason
                self.say(f"trial {self.doc['tid']}: pruned at step {reports[-1].step}: {reason}")

    def _read_others(self) -> list[dict[str, Any]]:
        """The experiment's trials that train or trained, read again except those seen finished: a finished trial
        never changes again (FINISHED_STATES), and a new one has a larger tid than any seen."""
        own = int(self.doc["tid"])
        unfinished = [t for t, doc in self.seen.items() if doc["state"] not in FINISHED_STATES and t != own]
        for doc in self.store.curves(str(self.doc["exp_key"]), unfinished, max(self.seen, default=-1)):
            self.seen[int(doc["tid"])] = doc
        trained = (TrialState.RUNNING, TrialState.DONE, TrialState.PRUNED)
        return [doc for tid, doc in sorted(self.seen.items()) if doc["state"] in trained]

    def _others(self) -> tuple[list[tuple[list[Report], bool]], list[list[Report]]]:
        """The other trials' curves, each with whether it completed (done with an ok result); and the curves of the
        completed ones with smaller tids (the behind-best stop)."""
        tid = int(self.doc["tid"])
        others = [
            (curve_of(doc), doc["state"] == TrialState.DONE and doc["status"] == "ok", int(doc["tid"]))
            for doc in self._read_others()
            if doc["tid"] != tid
        ]
        return [(curve, done) for curve, done, _ in others], [curve for curve, done, t in others if done and t < tid]
