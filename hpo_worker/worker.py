"""The worker: reserves queued trials one at a time and runs each as a ``jobs`` training run.

Each trial runs in ``<workdir>/<exp>/trial<tid>.<attempt>``, in this process or under a launcher as a distributed run
(:mod:`hpo_worker.trial`), checkpointing every ``checkpoint_every_s``; a trial reserved again continues from its
earlier attempt's newest checkpoint (:mod:`hpo_worker.attempts`). The result (``loss``, ``status``,
``test_accuracy``, ``test_loss``, the learning curve from the run's ``metrics.jsonl``) is stored in the trial
document. While it trains, a thread stores its curve of intermediate values and asks the experiment's pruner
whether to stop it (:mod:`hpo_worker.curves`); a pruned trial is stored in its own state.

While a trial runs, a thread refreshes its heartbeat. A finished trial's result is kept in its folder until the store
has it (:mod:`hpo_worker.result_file`): if the trial was taken away meanwhile (requeued after a missed grace period),
or the database stays away for longer than the store's patience, the next reservation of the trial stores that
result instead of training again. SIGTERM (e.g. a scheduler's walltime) stops the training, puts the
trial back in the queue at once and exits with status 143. An idle worker also requeues trials of dead workers, so
the queue recovers without a driver, and exits after ``idle_timeout_s`` seconds without work.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from hpo_worker.attempts import CHECKPOINT_EVERY_S, prepare_attempt
from hpo_worker.curves import CurveWatcher
from hpo_worker.liveness import Heartbeat, StaleMonitor
from hpo_worker.result_file import KeptResult, find_kept, keep, mark_stored, trial_dir
from hpo_worker.store import StoreUnreachable, TrialStore
from hpo_worker.trial import TrialLaunch, run_trial

__all__ = ["WorkerOptions", "WorkerTerminated", "make_owner", "run_worker"]

EXIT_TERMINATED = 143
# (experiment, trial document, the attempt's folder, launch, checkpoint_every_s) -> the trial's result
TrialFn = Callable[[Mapping[str, Any], Mapping[str, Any], Path, TrialLaunch, float], dict[str, Any]]
Log = Callable[[str], None]


class WorkerTerminated(BaseException):
    """SIGTERM arrived while a trial was running."""


def make_owner() -> str:
    """``host:pid:random``, plus ``:job=<id>`` under a scheduler, so that a trial names the job that ran it."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    array_task = (
        os.environ.get("SLURM_ARRAY_TASK_ID") or os.environ.get("PBS_ARRAYID") or os.environ.get("PBS_ARRAY_INDEX")
    )
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    if job:
        owner += f":job={job}" + (f"_{array_task}" if array_task else "")
    return owner


@dataclass
class WorkerOptions:
    exp_key: str | None = None
    workdir: str = "hpo_runs"
    idle_timeout_s: float = 60.0
    heartbeat_s: float = 5.0
    poll_s: float = 0.2
    max_trials: int = 0  # 0 = no limit
    grace_s: float = 60.0  # for requeueing other workers' trials while idle (0 = never)
    max_retries: int = 2
    launch: TrialLaunch = field(default_factory=TrialLaunch)
    checkpoint_every_s: float = CHECKPOINT_EVERY_S  # the trials' run.checkpoint_every_s
    # What runs a trial: jobs training (the default). The dispatch benchmark swaps in a trivial objective.
    trial_fn: TrialFn = run_trial


def _describe(launch: TrialLaunch) -> str:
    if launch.launcher == "none":
        return "trials in this process"
    return f"trials as {launch.ranks} rank(s) under {launch.launcher}"


class _SigtermState:
    """SIGTERM while a trial runs raises :class:`WorkerTerminated` in the main thread; while idle it only asks the
    loop to stop."""

    def __init__(self) -> None:
        self.running = False
        self.terminate = False

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.terminate = True
        if self.running:
            self.running = False
            raise WorkerTerminated()


def _reserve(
    store: TrialStore, owner: str, options: WorkerOptions, monitor: StaleMonitor, idle_left_s: float, say: Log
) -> dict[str, Any] | None:
    """The next trial, or None; while idle, requeues the trials of dead workers.

    The store waits out a database restart for its patience, but an idle worker no longer than its idle timeout:
    with no trial in hand it has nothing to lose, and the database of a finished experiment may be gone for good
    (the driver's embedded server). Only a patience shorter than the idle time left ends it with StoreUnreachable."""
    patience = store.reconnect.patience_s
    with store.reconnect.limited(max(idle_left_s, 0.1)):
        try:
            doc = store.reserve(owner, options.exp_key)
            if doc is None and options.grace_s > 0:
                monitor.check(store.running_docs(options.exp_key or None))
            return doc
        except StoreUnreachable as exc:
            if idle_left_s >= patience:
                raise
            say(f"MongoDB at {exc.address} unreachable while idle")
            return None


# A SIGTERM raises WorkerTerminated wherever the trial's code is, and code that it passes through may turn it into
# another error: torch.save, stopped inside its writer, raises a RuntimeError from its zip file's close instead.
# After a SIGTERM, any error that ends the trial is therefore taken as the stop, and the trial goes back in the
# queue (a real failure fails again on the next attempt, from the same checkpoint).
def _release(store: TrialStore, doc: Mapping[str, Any], owner: str, say: Log, how: str = "") -> None:
    released = store.release(doc, owner)
    say(f"SIGTERM: trial {doc['tid']} {'back in the queue' if released else 'was no longer mine'}{how}")


Outcome = tuple[dict[str, Any], tuple[str, str] | None]  # the result, and (type, message) when the trial failed


def _run(
    store: TrialStore, doc: dict[str, Any], owner: str, experiment: dict[str, Any], out_dir: Path,
    options: WorkerOptions, signals: _SigtermState, say: Log,
) -> tuple[Outcome, bool]:  # fmt: skip
    """Trains the trial under a heartbeat: its outcome, and whether it was taken away (requeued) meanwhile."""
    tid = doc["tid"]
    watcher = CurveWatcher(store, doc, owner, out_dir / "run", experiment, say)
    with Heartbeat(store, doc, owner, options.heartbeat_s) as beat, watcher:
        try:
            signals.running = True
            try:
                if signals.terminate:  # SIGTERM came after the reservation, before the trial started
                    raise WorkerTerminated()
                result = options.trial_fn(experiment, doc, out_dir, options.launch, options.checkpoint_every_s)
                outcome: Outcome = (result, None)
            finally:
                signals.running = False
        except WorkerTerminated:
            _release(store, doc, owner, say)
            raise
        except Exception as exc:
            if signals.terminate:  # the stop surfaced as another error: a trial stopped, not a failed one
                _release(store, doc, owner, say, f" ({type(exc).__name__} as it stopped: {exc})")
                raise WorkerTerminated() from exc
            error = (type(exc).__name__, str(exc))
            say(f"trial {tid} failed: {error[0]}: {error[1]}")
            traceback.print_exc(file=sys.stderr)
            outcome = ({"status": "fail", "failure": f"{error[0]}: {error[1]}"}, error)
    return outcome, beat.lost


def _train(
    store: TrialStore, doc: dict[str, Any], owner: str, experiment: dict[str, Any], options: WorkerOptions,
    signals: _SigtermState, say: Log,
) -> None:  # fmt: skip
    """Runs the trial, keeps its result in its folder and stores it; a result kept by an earlier attempt is stored
    instead of training again."""
    tid = doc["tid"]
    kept = find_kept(options.workdir, doc)
    if kept is not None:
        say(f"trial {tid}: stored the result kept in {kept.path} (trained before; not trained again)")
    else:
        say(f"trial {tid} of {doc['exp_key']}: {' '.join(doc['spec']['overrides'])}")
        out_dir = trial_dir(options.workdir, doc)
        carried = prepare_attempt(out_dir, doc, experiment, options.launch.ranks)
        if carried:
            say(f"trial {tid}: {carried}")
        (result, error), lost = _run(store, doc, owner, experiment, out_dir, options, signals, say)
        kept = KeptResult(keep(out_dir, doc, result, error), result, error)
        if lost:
            say(f"trial {tid} was requeued by another process meanwhile: result kept in {kept.path} for it")
            return
    # The database may be away here: the store waits for it; if it gives up, the kept file outlives this worker.
    if not store.finish(doc, owner, kept.result, error=kept.error):
        say(f"trial {tid} was requeued by another process meanwhile: result kept in {kept.path} for it")
        return
    mark_stored(kept.path)
    if kept.error is None:
        say(f"trial {tid}: {kept.result['status']} loss {kept.result.get('loss')}")


def run_worker(store: TrialStore, options: WorkerOptions, log: Log | None = None) -> int:
    """Runs queued trials until idle for ``options.idle_timeout_s``, ``max_trials`` are done, or SIGTERM (143)."""
    say = log or (lambda message: print(f"hpo_worker worker: {message}", file=sys.stderr, flush=True))
    owner = make_owner()
    signals = _SigtermState()
    previous = signal.signal(signal.SIGTERM, signals.on_sigterm)
    monitor = StaleMonitor(store, options.grace_s, options.max_retries, log=say)
    done = 0
    idle_since = time.monotonic()
    say(f"{owner} started (exp {options.exp_key or 'any'}, workdir {options.workdir}, {_describe(options.launch)})")
    try:
        while not signals.terminate and (not options.max_trials or done < options.max_trials):
            idle_left = options.idle_timeout_s - (time.monotonic() - idle_since)
            doc = _reserve(store, owner, options, monitor, idle_left, say)
            if doc is None:
                if time.monotonic() - idle_since > options.idle_timeout_s:
                    say(f"no queued trial for {options.idle_timeout_s:g} s: exiting after {done} trial(s)")
                    break
                time.sleep(options.poll_s)
                continue
            exp_key = str(doc["exp_key"])
            # Read for every trial: a resumed driver may have changed its settings (hpo_worker.driver.pruner_changed).
            experiment = store.get_experiment(exp_key)
            if experiment is None:
                store.finish(doc, owner, {"status": "fail"}, error=("NoExperiment", f"no experiment {exp_key!r}"))
                continue
            try:
                _train(store, doc, owner, experiment, options, signals, say)
            except WorkerTerminated:
                return EXIT_TERMINATED
            done += 1
            idle_since = time.monotonic()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_TERMINATED if signals.terminate else 0
