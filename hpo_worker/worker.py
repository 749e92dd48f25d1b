"""The worker: reserves queued trials one at a time and runs each as a ``jobs`` training run.

Each trial runs in ``<workdir>/<exp>/trial<tid>.<attempt>``, in this process or under a launcher as a distributed run
(:mod:`hpo_worker.trial`). The result (``loss``, ``status``, ``test_accuracy``, ``test_loss``, the learning curve
from the run's ``metrics.jsonl``) is stored in the trial document.

While a trial runs, a thread refreshes its heartbeat; if the trial was taken away meanwhile (requeued after a
missed grace period) its result is discarded. SIGTERM (e.g. a scheduler's walltime) stops the training, puts the
trial back in the queue at once and exits with status 143. An idle worker also requeues trials of dead workers, so
the queue recovers without a driver, and exits after ``idle_timeout_s`` seconds without work.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pymongo.errors

from hpo_worker.driver import StaleMonitor
from hpo_worker.store import JOB_STATE_RUNNING, TrialStore
from hpo_worker.trial import TrialLaunch, run_trial

__all__ = ["WorkerOptions", "WorkerTerminated", "make_owner", "run_worker"]

EXIT_TERMINATED = 143
TrialFn = Callable[[Mapping[str, Any], Mapping[str, Any], Path, TrialLaunch], dict[str, Any]]


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
    # What runs a trial: jobs training (the default). The dispatch benchmark swaps in a trivial objective.
    trial_fn: TrialFn = run_trial


class _Heartbeat:
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

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _describe(launch: TrialLaunch) -> str:
    if launch.launcher == "none":
        return "trials in this process"
    return f"trials as {launch.ranks} rank(s) under {launch.launcher}"


def run_worker(store: TrialStore, options: WorkerOptions, log: Callable[[str], None] | None = None) -> int:
    say = log or (lambda message: print(f"hpo_worker worker: {message}", file=sys.stderr, flush=True))
    owner = make_owner()
    state = {"running": False, "terminate": False}

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        state["terminate"] = True
        if state["running"]:
            state["running"] = False
            raise WorkerTerminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    monitor = StaleMonitor(store, options.grace_s, options.max_retries, log=say)
    experiments: dict[str, dict[str, Any]] = {}
    done = 0
    idle_since = time.monotonic()
    say(f"{owner} started (exp {options.exp_key or 'any'}, workdir {options.workdir}, {_describe(options.launch)})")
    try:
        while not state["terminate"] and (not options.max_trials or done < options.max_trials):
            try:
                doc = store.reserve(owner, options.exp_key)
                if doc is None and options.grace_s > 0:
                    query: dict[str, Any] = {"state": JOB_STATE_RUNNING}
                    if options.exp_key:
                        query["exp_key"] = options.exp_key
                    monitor.check(list(store.trials.find(query)))
            except pymongo.errors.ConnectionFailure as exc:  # the server went away: wait for it up to the idle timeout
                say(f"MongoDB unreachable: {type(exc).__name__}")
                doc = None
            if doc is None:
                if time.monotonic() - idle_since > options.idle_timeout_s:
                    say(f"no queued trial for {options.idle_timeout_s:g} s: exiting after {done} trial(s)")
                    break
                time.sleep(options.poll_s)
                continue
            exp_key = str(doc["exp_key"])
            experiment = experiments.get(exp_key) or store.get_experiment(exp_key)
            tid = doc["tid"]
            out_dir = Path(options.workdir).resolve() / exp_key / f"trial{tid}.{doc['version']}"
            if experiment is None:
                store.finish(doc, owner, {"status": "fail"}, error=("NoExperiment", f"no experiment {exp_key!r}"))
                continue
            experiments[exp_key] = experiment
            say(f"trial {tid} of {exp_key}: {' '.join(doc['spec']['overrides'])}")
            result: dict[str, Any] | None = None
            error: tuple[str, str] | None = None
            with _Heartbeat(store, doc, owner, options.heartbeat_s) as beat:
                try:
                    state["running"] = True
                    try:
                        result = options.trial_fn(experiment, doc, out_dir, options.launch)
                    finally:
                        state["running"] = False
                except WorkerTerminated:
                    released = store.release(doc, owner)
                    say(f"SIGTERM: trial {tid} {'back in the queue' if released else 'was no longer mine'}")
                    return EXIT_TERMINATED
                except Exception as exc:
                    error = (type(exc).__name__, str(exc))
                    say(f"trial {tid} failed: {error[0]}: {error[1]}")
                    traceback.print_exc(file=sys.stderr)
            if beat.lost:
                say(f"trial {tid} was requeued by another process meanwhile: result discarded")
            elif error is not None:
                store.finish(doc, owner, {"status": "fail", "failure": f"{error[0]}: {error[1]}"}, error=error)
            elif result is not None:
                stored = store.finish(doc, owner, result)
                if stored:
                    say(f"trial {tid}: {result['status']} loss {result.get('loss')}")
                else:
                    say(f"trial {tid} was requeued by another process meanwhile: result discarded")
            done += 1
            idle_since = time.monotonic()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_TERMINATED if state["terminate"] else 0
