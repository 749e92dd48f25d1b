"""Training a known configuration again, as a study does outside its search: given values, each tuned cell's best
trial with other seeds (``tune.repeats``) or with the [fisher] records.

- :func:`given_summary`: one run in this process.
- :func:`run_in_processes`: many runs, ``workers`` at a time, each ``python -m jobs.train`` in its own process with
  the machine's cores shared out among them (:func:`shared_threads_env`, as among the search's workers), its output
  in its own log, and a checkpoint every ``checkpoint_every_s`` (hpo_worker's 5 minutes), so that a stopped study
  loses little: the processes are stopped with it (SIGTERM), and the study started again continues each run from
  its newest checkpoint.

Either way, a run whose ``summary.json`` says it finished or diverged is not trained again, and a run folder that
holds a run of another configuration is set aside, not reused (:func:`set_aside_other_run`). The process helpers
(:func:`start_logged`, :func:`log_tail`) are also the search's (:mod:`study.tuning`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo_worker.attempts import CHECKPOINT_EVERY_S
from hpo_worker.server import terminate
from study.config import StudyError, config_toml

if TYPE_CHECKING:
    from jobs.config import Config

__all__ = [
    "LOG_HEADER", "STOP_GRACE_S", "Replay", "diverged_summary", "ended_summary", "given_summary", "log_tail",
    "replay_toml", "run_in_processes", "set_aside_other_run", "shared_threads_env", "start_logged",
]  # fmt: skip

Log = Callable[[str], None]

LOG_HEADER = "--- study: started "  # begins the line above each process's output in its log, one per run
STOP_GRACE_S = 15.0  # a worker's SIGTERM puts its running trial back in the queue; this is its time to do so
POLL_S = 2.0  # how often run_in_processes looks at its runs: they take minutes


def start_logged(command: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``command`` started with its output appended to ``log_path``, under a header line naming it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output:  # appended: the logs of earlier runs of the study stay, above the header
        now = dt.datetime.now().isoformat(timespec="seconds")
        output.write(f"{LOG_HEADER}{now} by PID {os.getpid()}: {shlex.join(command)}\n".encode())
        output.flush()
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=dict(env or os.environ))


def log_tail(path: Path, chars: int = 1500) -> str:
    """The end of the current run's output in the log ``path``: what follows its last header, never an earlier run's."""
    if not path.exists():
        return "(no output)"
    run = path.read_text(errors="replace").rpartition(LOG_HEADER)[2].partition("\n")[2]
    return run[-chars:].strip() or "(no output)"


def shared_threads_env(processes: int) -> dict[str, str]:
    """The environment for one of ``processes`` processes that share this machine's cores: OMP_NUM_THREADS set to
    its share (at least one), so that they do not oversubscribe it."""
    threads = max(1, (os.cpu_count() or 1) // max(processes, 1))
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def replay_toml(run_dir: Path, overrides: Sequence[str], why: str) -> str:
    """The config of the run in ``run_dir`` (its config.json, every key resolved) with ``overrides``, as TOML."""
    document = {k: v for k, v in json.loads((run_dir / "config.json").read_text()).items() if k != "derived"}
    return config_toml(document, overrides, f"# {run_dir}: trained again {why} (study.runner).")


def set_aside_other_run(run_dir: Path, config: Config, log: Log, name: str) -> None:
    """Renames ``run_dir`` to ``<name>.superseded<n>`` when it holds a run of another configuration (a cell's best
    trial that changed when its search went on, or a changed given value), so that it is neither reused as this
    run's result nor lost."""
    from jobs.config import trajectory_differences

    saved = run_dir / "config.json"
    if not saved.is_file() or not (differences := trajectory_differences(json.loads(saved.read_text()), config)):
        return
    number = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.superseded{number}")).exists():
        number += 1
    run_dir.rename(aside)
    log(f"{name}: {run_dir} held a run of another configuration ({'; '.join(differences)}): moved to {aside}")


def diverged_summary(target: float) -> dict[str, Any]:
    """What a study records of a run that diverged: no accuracy, the target missed."""
    return {"target_accuracy": target or None, "reached_target": False}


def ended_summary(run_dir: Path, target: float) -> dict[str, Any] | None:
    """What a study records of the run in ``run_dir`` if it ended: its summary when it finished,
    :func:`diverged_summary` when it diverged; None when it never began, was stopped, or failed."""
    from jobs.outcome import RunEnd, read_summary

    summary = read_summary(run_dir)
    if summary is None or summary["end"] not in (RunEnd.FINISHED, RunEnd.DIVERGED):
        return None
    return summary if summary["end"] == RunEnd.FINISHED else diverged_summary(target)


def _earlier_summary(config_path: Path, run_dir: Path, target: float, log: Log, name: str) -> dict[str, Any] | None:
    """The summary of a run in ``run_dir`` of ``config_path`` that ended before (finished or diverged); None when it
    must be trained (never begun, stopped, or failed: continued from its newest checkpoint)."""
    from jobs.config import load_config

    set_aside_other_run(run_dir, load_config(config_path, [f"run.out_dir={json.dumps(str(run_dir))}"]), log, name)
    if (before := ended_summary(run_dir, target)) is not None:  # diverged_summary has no "end" key
        log(f"{name}: done before ({before.get('end', 'diverged')}), reusing {run_dir / 'summary.json'}")
    return before


def given_summary(config_path: Path, run_dir: Path, target: float, log: Log, name: str) -> dict[str, Any]:
    """The summary of the run of ``config_path`` in ``run_dir``, trained in this process unless it ended before."""
    if (before := _earlier_summary(config_path, run_dir, target, log, name)) is not None:
        return before
    from jobs.config import load_config
    from jobs.loop import TrainingDiverged, run_training
    from jobs.parallel import SingleContext

    log(f"{name}: training")
    config = load_config(config_path, [f"run.out_dir={json.dumps(str(run_dir))}"])
    config.run.resume = True  # a run killed before is continued from its newest checkpoint
    try:
        return asdict(run_training(config, SingleContext(), log=lambda message: None))
    except TrainingDiverged as exc:
        log(f"  {name}: diverged: {exc}")
        return diverged_summary(target)


@dataclass(frozen=True)
class Replay:
    """One run for :func:`run_in_processes`: its config file, its run folder, its log, its name in messages."""

    name: str
    config_path: Path
    run_dir: Path
    log_path: Path

    def command(self, checkpoint_every_s: float) -> list[str]:
        return [
            sys.executable, "-m", "jobs.train", "--config", str(self.config_path), "--resume",
            f"run.out_dir={json.dumps(str(self.run_dir))}", f"run.checkpoint_every_s={checkpoint_every_s:g}",
        ]  # fmt: skip


def _ended(replay: Replay, status: int, target: float, log: Log) -> dict[str, Any]:
    """The summary of ``replay``, whose process exited with ``status``; a StudyError when it failed or was stopped
    from outside (the study started again continues it from its newest checkpoint)."""
    from jobs.outcome import EXIT_STATUS, RunEnd, read_summary

    summary = read_summary(replay.run_dir)
    end = summary["end"] if summary is not None else None
    if status == 0 and end == RunEnd.FINISHED:
        assert summary is not None
        return summary
    if status == EXIT_STATUS[RunEnd.DIVERGED] or end == RunEnd.DIVERGED:
        log(f"  {replay.name}: diverged: {log_tail(replay.log_path, 300)}")
        return diverged_summary(target)
    raise StudyError(
        f"{replay.name} ended with exit status {status} (summary: {end or 'none'}); the end of {replay.log_path}:\n"
        f"{log_tail(replay.log_path)}\nrun the study again to continue it from its newest checkpoint"
    )


def run_in_processes(
    replays: Sequence[Replay], workers: int, target: float, log: Log, checkpoint_every_s: float = CHECKPOINT_EVERY_S
) -> list[dict[str, Any]]:
    """The summaries of ``replays``, in their order: those that ended before read back, the others trained
    ``workers`` at a time (at least one), each started in the order given. A run that fails stops the others (they
    continue from their checkpoints when the study is started again) and raises a StudyError. Each checkpoints
    every ``checkpoint_every_s``, as hpo_worker's trials by default."""
    summaries = {i: _earlier_summary(r.config_path, r.run_dir, target, log, r.name) for i, r in enumerate(replays)}
    pending = [i for i, summary in summaries.items() if summary is None]
    running: dict[int, subprocess.Popen[bytes]] = {}
    env = shared_threads_env(workers)
    try:
        while pending or running:
            while pending and len(running) < max(workers, 1):
                index = pending.pop(0)
                log(f"{replays[index].name}: training")
                running[index] = start_logged(replays[index].command(checkpoint_every_s), replays[index].log_path, env)
            time.sleep(POLL_S)
            for index, process in list(running.items()):
                if process.poll() is not None:
                    del running[index]
                    summaries[index] = _ended(replays[index], process.returncode, target, log)
    finally:  # stopped (SIGTERM, Ctrl-C) or failed: the other runs stop too, after their last checkpoint
        for process in running.values():
            terminate(process, STOP_GRACE_S)
    return [summary for _, summary in sorted(summaries.items()) if summary is not None]
