"""The driver: hyperopt's TPE proposes trials, which are queued in the store; it waits for max-evals results.

Each round it brings its copy of the experiment's trials up to date (:class:`ExperimentView`: only the queued and
running ones are read), requeues trials whose worker stopped beating (:class:`StaleMonitor`), and tops the queue up
to ``queue_size`` new trials with ``hyperopt.tpe.suggest`` on an in-memory ``hyperopt.Trials``, where the trials
still queued or running, and those proposed earlier in the same round, carry the lie ``pending``
(:mod:`hpo_worker.pending`), and pruned trials their last value or nothing (:func:`hpo_worker.pruning.tell_pruned`).
Trial ids come from
an atomic counter in the database, so a restarted driver continues the experiment without reusing a tid; the
experiment ends when ``max_evals`` trials are done, pruned or failed. One driver per experiment: it holds a lease on the
experiment document (see ``LEASE_S``).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hyperopt
import numpy as np
from hyperopt import tpe

from hpo_worker.liveness import StaleMonitor, process_gone_on_this_host
from hpo_worker.pending import STARTUP_TRIALS, tell_pending
from hpo_worker.pruning import PrunerSettings, tell_pruned
from hpo_worker.spaces import SearchSpace, plain_value
from hpo_worker.store import (
    FINISHED_STATES,
    ExperimentMismatch,
    StoreError,
    StoreUnreachable,
    TrialState,
    TrialStore,
    state_counts,
    utcnow,
)  # fmt: skip
from hpo_worker.warm_start import hyperopt_vals

__all__ = [
    "EXPERIMENT_IDENTITY", "DriverOptions", "ExperimentView", "build_trials", "check_experiment", "experiment_meta",
    "make_point_docs", "make_trial_docs", "pruner_changed", "run_driver",
]  # fmt: skip

CMD = ["hpo_worker", "jobs.train"]  # misc.cmd: what runs a trial (a name, never code)
# A driver renews its lease on the experiment every round; a second driver is refused while the lease is valid.
# A killed driver's lease is taken over at once on the same host (its pid is gone), else after LEASE_S.
LEASE_S = 30.0
# What makes an experiment the same one: a driver resumes an experiment only when these agree with the stored ones,
# and its pruner too, but for one change that leaves every result as it was (pruner_changed).
EXPERIMENT_IDENTITY = ("space", "space_definition", "config_text", "objective", "seed")


def _hyperopt_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: value for key, value in doc.items() if key != "_id"}
    for key in ("book_time", "refresh_time"):
        if isinstance(out.get(key), dt.datetime):
            out[key] = out[key].replace(tzinfo=None)
    return out


def build_trials(docs: Sequence[Mapping[str, Any]], exp_key: str) -> hyperopt.Trials:
    """An in-memory ``hyperopt.Trials`` holding the stored documents (what hyperopt's own tools read)."""
    trials = hyperopt.Trials(exp_key=exp_key)
    trials.insert_trial_docs([_hyperopt_doc(doc) for doc in docs if doc.get("exp_key") == exp_key])
    trials.refresh()
    return trials


def _never_called(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the driver never evaluates trials: workers run them as jobs training runs")


def _trial_doc(space: SearchSpace, exp_key: str, tid: int, vals: Mapping[str, list[Any]]) -> dict[str, Any]:
    """A queued trial document for hyperopt ``misc.vals`` ``vals``: its spec, overrides and hyperopt fields."""
    values = space.evaluate(vals)
    spec = {
        "space": space.name,
        "params": {k: plain_value(v) for k, v in values.items()},
        "overrides": space.to_overrides(values),
    }
    return {
        "state": TrialState.NEW,
        "tid": tid,
        "spec": spec,
        "result": {"status": "new"},
        "misc": {
            "tid": tid,
            "cmd": CMD,
            "workdir": None,
            "idxs": {k: [tid] * len(v) for k, v in vals.items()},
            "vals": {k: [plain_value(x) for x in v] for k, v in vals.items()},
        },
        "exp_key": exp_key,
        "owner": None,
        "version": 0,
        "book_time": None,
        "refresh_time": None,
        "heartbeat": 0,
        "attempts": 0,
    }


def make_trial_docs(
    space: SearchSpace,
    exp_key: str,
    tids: Sequence[int],
    history: Sequence[Mapping[str, Any]],
    seed: int,
    algo: Callable[..., Any] = tpe.suggest,
    pending: str = "worst",
    pruned_history: str = "last",
    startup_trials: int = STARTUP_TRIALS,
) -> list[dict[str, Any]]:
    """New trial documents for ``tids``, proposed one by one by ``algo`` (TPE) from the trial documents ``history``;
    pending trials, the new ones included, carry the lie ``pending`` (hpo_worker.pending), and pruned trials are
    told as ``pruned_history`` says (hpo_worker.pruning.tell_pruned). TPE draws from the prior (random search)
    until ``startup_trials`` trials exist."""
    domain = hyperopt.Domain(_never_called, space.hyperopt_space)
    docs: list[dict[str, Any]] = []
    for tid in tids:
        rng_seed = int(np.random.default_rng([seed, tid]).integers(2**31 - 1))
        trials = build_trials(tell_pending(tell_pruned([*history, *docs], pruned_history), pending), exp_key)
        for proposed in algo([tid], domain, trials, rng_seed, n_startup_jobs=startup_trials):
            docs.append(_trial_doc(space, exp_key, tid, proposed["misc"]["vals"]))
    return docs


def make_point_docs(
    space: SearchSpace, exp_key: str, tids: Sequence[int], points: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Queued trial documents for given points (hpo_worker.warm_start), marked ``misc.warm_start``."""
    docs = [_trial_doc(space, exp_key, tid, hyperopt_vals(space, p)) for tid, p in zip(tids, points, strict=True)]
    for doc in docs:
        doc["misc"]["warm_start"] = True
    return docs


def _without_curve(doc: dict[str, Any]) -> dict[str, Any]:
    """The document less its learning curve (TPE needs the loss; the curve only costs memory and copying)."""
    result = doc.get("result")
    if isinstance(result, dict) and "learning_curve" in result:
        return {**doc, "result": {k: v for k, v in result.items() if k != "learning_curve"}}
    return doc


@dataclass
class ExperimentView:
    """The driver's copy of its experiment's trials, kept current by reading only the queued and running ones.

    Reading every trial document each round costs the server O(trials): on nx-27017 about 0.4 ms a document, so
    120 ms a round at 300 trials, for each driver of a study. Finished trials never change, so the view reads them
    once: each round it reads the queued and running trials (an indexed query on ``state``) and fetches, by tid,
    those that left that set since the last round. A full read every ``resync_s`` seconds (and at the start) catches
    anything changed behind its back.
    """

    store: TrialStore
    exp_key: str
    resync_s: float = 60.0
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)
    active: dict[int, dict[str, Any]] = field(default_factory=dict)
    _synced_at: float | None = None

    def refresh(self) -> None:
        if self._synced_at is None or time.monotonic() - self._synced_at >= self.resync_s:
            docs = self.store.trial_docs(self.exp_key, curves=False)
            self.finished = {d["tid"]: _without_curve(d) for d in docs if d["state"] in FINISHED_STATES}
            self.active = {d["tid"]: d for d in docs if d["state"] not in FINISHED_STATES}
            self._synced_at = time.monotonic()
            return
        current = {d["tid"]: d for d in self.store.active_docs(self.exp_key)}
        gone = [tid for tid in self.active if tid not in current]
        for doc in self.store.docs_by_tid(self.exp_key, gone) if gone else []:
            if doc["state"] in FINISHED_STATES:
                self.finished[doc["tid"]] = _without_curve(doc)
            else:  # it went back in the queue between the two reads
                current[doc["tid"]] = doc
        self.active = current

    def added(self, docs: Sequence[dict[str, Any]]) -> None:
        """Trials this driver just inserted: known at once, so that one that finishes before the next round is
        fetched when it is seen to have left the queue."""
        self.active.update((doc["tid"], doc) for doc in docs)

    @property
    def docs(self) -> list[dict[str, Any]]:
        return sorted([*self.finished.values(), *self.active.values()], key=lambda d: int(d["tid"]))

    def counts(self) -> dict[TrialState, int]:
        return state_counts([*self.finished.values(), *self.active.values()])


@dataclass
class DriverOptions:
    exp_key: str
    space: SearchSpace
    config_path: str
    max_evals: int
    queue_size: int = 4
    seed: int = 0
    grace_s: float = 60.0
    max_retries: int = 2
    objective: str = "test_loss"
    poll_s: float = 0.5
    idle_poll_s: float = 0.0  # rounds that see no change wait longer, doubling up to this (0 or <= poll_s: never)
    pending: str = "worst"  # what TPE is told about queued and running trials (hpo_worker.pending.PENDING_LIES)
    warm_start: tuple[Mapping[str, Any], ...] = ()  # points queued as the first trials (hpo_worker.warm_start)
    pruner: PrunerSettings = field(default_factory=PrunerSettings)  # what workers stop early (hpo_worker.pruning)
    startup_trials: int = STARTUP_TRIALS  # TPE's random draws before it models the history (n_startup_jobs)


def experiment_meta(options: DriverOptions) -> dict[str, Any]:
    """The experiment document's settings (:data:`EXPERIMENT_IDENTITY` among them) for ``options``."""
    path = Path(options.config_path)
    return {
        "space": options.space.name,
        "space_source": str(getattr(options.space, "source", "")),
        "space_definition": options.space.definition,
        "config_name": path.stem,
        "config_text": path.read_text(),
        "objective": options.objective,
        "seed": options.seed,
        "max_evals": options.max_evals,
        "pending": options.pending,
        "warm_start": [dict(point) for point in options.warm_start],
        "pruner": options.pruner.to_doc(),
        "startup_trials": options.startup_trials,
        "driver": f"{socket.gethostname()}:{os.getpid()}",
    }


def pruner_changed(exp_key: str, stored: Mapping[str, Any] | None, new: PrunerSettings) -> bool:
    """Whether an experiment stored with the pruner ``stored`` continues under another one, ``new``: False when
    they agree (or none is stored: an experiment made before pruning existed), True when ``new`` only turns stops
    on: the behind-best stop, which leaves the best of every prefix of the trials as it was, or the threshold stop,
    which stops only trials still at the objective's bad end (hpo_worker.pruning; not exact, so the change and the
    trials made before it are recorded, ``pruner_changes``). Raises :class:`ExperimentMismatch` for any other
    change: two searches would mix."""
    if stored is None:
        return False
    old = PrunerSettings.from_doc(stored)
    if old == new:
        return False
    turned_on = _stops_turned_on(old, new)
    if turned_on and replace(old, **turned_on) == new:
        return True
    raise ExperimentMismatch(exp_key, ["pruner"])


def _stops_turned_on(old: PrunerSettings, new: PrunerSettings) -> dict[str, Any]:
    """The settings of the stops that ``new`` turns on and ``old`` had off (behind-best, threshold)."""
    turned_on: dict[str, Any] = {}
    if new.behind_best and not old.behind_best:
        turned_on["behind_best"] = True
    if new.threshold is not None and old.threshold is None:
        turned_on.update(threshold=new.threshold, threshold_after=new.threshold_after)
    return turned_on


def check_experiment(store: TrialStore, options: DriverOptions) -> bool:
    """Raises :class:`ExperimentMismatch` when ``options`` cannot continue the stored experiment; True when its
    pruner is to change (:func:`pruner_changed`)."""
    store.check_experiment(options.exp_key, experiment_meta(options), EXPERIMENT_IDENTITY)
    existing = store.get_experiment(options.exp_key) or {}
    return pruner_changed(options.exp_key, existing.get("pruner"), options.pruner)


def _change_pruner(store: TrialStore, options: DriverOptions, say: Callable[[str], None]) -> None:
    """Stores the new pruner, and when it came: ``pruner_changes`` lists each change with the trials made before."""
    made = sum(store.count_states(options.exp_key).values())
    existing = store.get_experiment(options.exp_key) or {}
    change = {"at": utcnow(), "trials_before": made, "from": existing.get("pruner"), "to": options.pruner.to_doc()}
    changes = [*existing.get("pruner_changes", []), change]
    store.update_experiment(options.exp_key, {"pruner": options.pruner.to_doc(), "pruner_changes": changes})
    turned_on = _stops_turned_on(PrunerSettings.from_doc(existing.get("pruner")), options.pruner)
    stops = ["the behind-best stop"] if "behind_best" in turned_on else []
    if "threshold" in turned_on:
        stops.append(f"the threshold stop ({turned_on['threshold']:g} after {turned_on['threshold_after']:g})")
    verb = "are" if len(stops) > 1 else "is"
    say(f"experiment {options.exp_key!r}: {' and '.join(stops)} {verb} on from now; {made} trial(s) were made before")


def round_pause(poll_s: float, idle_poll_s: float, quiet_rounds: int) -> float:
    """Seconds before the next round: ``poll_s`` after a change of the trials' counts, then doubling with each quiet
    round up to ``idle_poll_s``, so that a driver whose trials run for minutes reads the database a few times a
    minute (a study runs one per cell: 27 on CIFAR-10); a change (a trial taken or finished) brings the short pause
    back at once. At most a third of the driver's lease, which each round renews."""
    return max(poll_s, min(idle_poll_s, LEASE_S / 3, poll_s * 2.0 ** min(quiet_rounds, 32)))


def run_driver(store: TrialStore, options: DriverOptions, log: Callable[[str], None] | None = None) -> int:
    say = log or (lambda message: print(f"hpo_worker driver: {message}", file=sys.stderr, flush=True))
    store.ensure_indexes()
    meta = experiment_meta(options)
    created = store.create_or_check_experiment(options.exp_key, meta, compare=EXPERIMENT_IDENTITY)
    stored_pruner = None if created else (store.get_experiment(options.exp_key) or {}).get("pruner")
    if pruner_changed(options.exp_key, stored_pruner, options.pruner):  # the identity's other keys were checked above
        _change_pruner(store, options, say)
    say(
        f"{'new' if created else 'resuming'} experiment {options.exp_key!r}: space {options.space.name}, "
        f"max-evals {options.max_evals}, queue {options.queue_size}, pending trials told {options.pending!r}, "
        f"pruner {options.pruner.name}"
    )
    holder = meta["driver"]
    previous_dead = process_gone_on_this_host(store.lease_holder(options.exp_key))
    store.acquire_driver_lease(options.exp_key, holder, LEASE_S, previous_dead)
    changes = {"max_evals": options.max_evals, "pending": options.pending, "driver": meta["driver"]}
    store.update_experiment(options.exp_key, changes)
    try:
        code = _drive(store, options, holder, say)
    except StoreUnreachable:
        raise  # no release (it would wait for the database again): a driver on this host sees this pid is gone
    except BaseException:
        store.release_driver_lease(options.exp_key, holder)
        raise
    store.release_driver_lease(options.exp_key, holder)
    return code


def _queue_warm_start(
    store: TrialStore, options: DriverOptions, view: ExperimentView, say: Callable[[str], None]
) -> None:
    """The warm-start points, as the first trials of an experiment that has none yet (a resumed one has them)."""
    view.refresh()
    if not options.warm_start or view.docs:
        return
    if len(options.warm_start) > options.max_evals:
        raise ValueError(f"{len(options.warm_start)} warm-start points but max_evals {options.max_evals}: raise it")
    tids = store.new_tids(options.exp_key, len(options.warm_start))
    docs = make_point_docs(options.space, options.exp_key, tids, options.warm_start)
    store.insert_trials(docs)
    view.added(docs)
    say(f"queued {len(docs)} warm-start point(s) as trials {tids[0]}..{tids[-1]}")


def _drive(store: TrialStore, options: DriverOptions, holder: str, say: Callable[[str], None]) -> int:
    monitor = StaleMonitor(store, options.grace_s, options.max_retries, log=say)
    view = ExperimentView(store, options.exp_key)
    _queue_warm_start(store, options, view, say)
    last_line = ""
    quiet_rounds = 0
    while True:
        if not store.renew_driver_lease(options.exp_key, holder, LEASE_S):
            raise StoreError(f"another driver took over experiment {options.exp_key!r}: this one stops")
        view.refresh()
        if monitor.check(list(view.active.values())):
            view.refresh()
        counts = view.counts()
        finished = counts[TrialState.DONE] + counts[TrialState.ERROR] + counts[TrialState.PRUNED]
        pruned = f", {counts[TrialState.PRUNED]} pruned" if counts[TrialState.PRUNED] else ""
        line = (
            f"{finished}/{options.max_evals} finished ({counts[TrialState.ERROR]} failed{pruned}), "
            f"{counts[TrialState.RUNNING]} running, {counts[TrialState.NEW]} queued"
        )
        if monitor.silent():  # each is named in the log with its grace period and the time left
            line += f", {monitor.silent()} silent (waiting for the {options.grace_s:g} s grace period)"
        quiet_rounds = quiet_rounds + 1 if line == last_line else 0
        if line != last_line:
            say(line)
            last_line = line
        if finished >= options.max_evals:
            break
        wanted = min(options.queue_size - counts[TrialState.NEW], options.max_evals - sum(counts.values()))
        if wanted > 0:
            tids = store.new_tids(options.exp_key, wanted)
            new_docs = make_trial_docs(
                options.space, options.exp_key, tids, view.docs, options.seed, pending=options.pending,
                pruned_history=options.pruner.pruned_history, startup_trials=options.startup_trials,
            )  # fmt: skip
            store.insert_trials(new_docs)
            view.added(new_docs)
            continue
        time.sleep(round_pause(options.poll_s, options.idle_poll_s, quiet_rounds))
    store.update_experiment(options.exp_key, {"finished": utcnow()})
    trials = build_trials(store.trial_docs(options.exp_key, curves=False), options.exp_key)
    ok = [t for t in trials.trials if t["result"].get("status") == "ok"]
    if ok:
        best = min(ok, key=lambda t: t["result"]["loss"])
        say(f"best: trial {best['tid']} loss {best['result']['loss']:.6g} {best['spec']['overrides']}")
    return 0
