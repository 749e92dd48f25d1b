"""Running one trial: a ``jobs`` training run, in this process or as a distributed run under a launcher.

A trial's configuration is the experiment's base config (its TOML text is stored with the experiment, so the worker
needs no file from the driver's machine) plus the trial's ``spec.overrides`` plus ``run.out_dir=<out_dir>/run`` and
``run.checkpoint_every_s`` (the worker's ``--checkpoint-every-s``), so that a stopped trial loses little.

- ``TrialLaunch("none")``: ``jobs.loop.run_training`` in this process (one rank).
- ``TrialLaunch("srun" | "mpirun" | "torchrun", ranks=N)``: ``python -m jobs.train`` as N ranks under that launcher,
  in its own process group (so SIGTERM reaches every rank); rank 0's ``summary.json`` carries the result and, with
  the exit status, how the run ended (:mod:`jobs.outcome`; never its log text). ``srun``
  runs inside the worker's allocation (an ``sbatch`` job with ``--ntasks`` of at least N); ``mpirun`` and
  ``torchrun`` start the ranks on this node (``mpirun`` also on the hosts its ``args`` name).

The result is what hyperopt expects in ``result`` (``status``, ``loss``: see ``objective_value``) plus the run's
summary (``SUMMARY_KEYS``), the learning curve (epoch and eval records of ``metrics.jsonl``), ``out_dir`` and the
objective's ``intermediate`` values (:func:`intermediate_values`). A run stopped by the experiment's pruner
(``jobs.outcome.RunEnd.PRUNED``) has status ``pruned``, its last intermediate value as its loss, and ``pruned``: why.

Launched ranks end with the worker: they run under :mod:`hpo_worker.rank_guard`, which stops them once the worker is
gone, however it ended (SIGKILL included).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpo_worker.attempts import CHECKPOINT_EVERY_S, RUN_DIR
from hpo_worker.pruning import Report
from jobs.checkpoint import has_checkpoint
from jobs.metrics import read_metrics
from jobs.outcome import RunEnd, end_from_exit_status, read_summary

__all__ = [
    "LAUNCHERS", "OBJECTIVES", "TrialLaunch", "intermediate_values", "learning_curve", "objective_value", "run_trial",
]  # fmt: skip

LAUNCHERS = ("none", "srun", "mpirun", "torchrun")
STOP_GRACE_S = 10.0  # how long the ranks get to exit after SIGTERM before SIGKILL
STDERR_TAIL = 2000  # characters of a failed run's stderr kept in the trial's failure message
OBJECTIVES = ("test_loss", "test_error", "train_error", "steps_to_target", "best_test_error")
# What a trial's result keeps of the run's summary.json (besides loss, status, learning curve and out_dir).
SUMMARY_KEYS = (
    "test_loss", "test_accuracy", "train_loss", "train_accuracy", "steps", "total_steps", "seconds",
    "target_accuracy", "reached_target", "steps_to_target", "examples_to_target", "noise_scale",
    "best_test_accuracy", "best_test_step", "kl_clipped_fraction", "curvature_share",
    "curvature_energy", "resumed_from",
)  # fmt: skip


@dataclass(frozen=True)
class TrialLaunch:
    launcher: str = "none"
    ranks: int = 1
    args: tuple[str, ...] = ()  # extra launcher words, e.g. ("--bind-to", "none")
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown trial launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if self.ranks < 1:
            raise ValueError(f"--ranks must be at least 1, not {self.ranks}")
        if self.launcher == "none" and (self.ranks != 1 or self.args):
            raise ValueError(
                "trials run in this process (--launcher none) have one rank and no launcher arguments: "
                "choose --launcher srun, mpirun or torchrun for --ranks > 1"
            )

    def command(self, train_args: Sequence[str]) -> list[str]:
        """The command line that starts the trial's ranks (``train_args`` go to ``jobs.train``)."""
        if self.launcher == "torchrun":
            prefix = [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.ranks}"]
            return [*prefix, *self.args, "-m", "jobs.train", *train_args]
        if self.launcher == "srun":
            # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others waiting in a collective.
            prefix = ["srun", f"--ntasks={self.ranks}", "--kill-on-bad-exit=1"]
        else:
            prefix = ["mpirun", "-np", str(self.ranks)]
        return [*prefix, *self.args, self.python, "-m", "jobs.train", *train_args]


def learning_curve(out_dir: Path) -> list[dict[str, Any]]:
    """The epoch and evaluation records of the run's metrics.jsonl (step records are left in the file)."""
    return [
        {k: v for k, v in record.items() if k != "seconds"}
        for record in read_metrics(out_dir)
        if isinstance(record, dict) and record.get("kind") in ("epoch", "eval")
    ]


def objective_value(summary: Mapping[str, Any], objective: str) -> float:
    """The loss TPE minimises, from a run's summary (``jobs.loop.RunSummary`` fields)."""
    test_loss, test_accuracy = summary.get("test_loss"), summary.get("test_accuracy")
    if test_loss is None or test_accuracy is None:
        raise ValueError("the run was not evaluated on the test split")
    if objective == "test_loss":
        return float(test_loss)
    if objective == "test_error":
        return 1.0 - float(test_accuracy)
    if objective == "train_error":
        if summary.get("train_accuracy") is None:
            raise ValueError("the run did not evaluate its training accuracy (run.train_eval_examples)")
        return 1.0 - float(summary["train_accuracy"])
    if objective == "best_test_error":
        # A fixed-budget study's measure: the run trains its whole budget and is ranked by its best evaluation.
        if summary.get("best_test_accuracy") is None:
            raise ValueError("the run recorded no evaluation of the test split (run.eval_every or eval_every_steps)")
        return 1.0 - float(summary["best_test_accuracy"])
    if objective == "steps_to_target":
        target = summary.get("target_accuracy")
        if not target:
            raise ValueError("objective steps_to_target needs run.target_accuracy in the base config")
        if summary.get("steps_to_target") is not None:
            # In (0, 1]: the fraction of the step budget used to reach the target.
            return float(summary["steps_to_target"]) / max(int(summary["total_steps"]), 1)
        # Above 1: every run that misses the target ranks behind every run that reaches it, closer misses first.
        return 1.0 + max(float(target) - float(test_accuracy), 0.0)
    raise ValueError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def _metric(record: Mapping[str, Any], objective: str, total_steps: int, target: float | None) -> float | None:
    """The objective's measure at one record of the run (None when the record lacks it)."""
    accuracy = record.get("accuracy" if objective == "train_error" else "test_accuracy")
    if objective == "test_loss":
        return record.get("test_loss")
    if accuracy is None:
        return None
    if objective != "steps_to_target":
        return 1.0 - float(accuracy)
    if not target:
        raise ValueError("objective steps_to_target needs run.target_accuracy in the base config")
    # As objective_value: the fraction of the budget once the target is reached, else 1 + the accuracy missing.
    return record["step"] / max(total_steps, 1) if accuracy >= target else 1.0 + float(target) - float(accuracy)


def intermediate_values(
    records: Sequence[Mapping[str, Any]], objective: str, total_steps: int, target: float | None
) -> list[Report]:
    """What a pruner compares: the objective's measure at each evaluation of the test split (for ``train_error``,
    at each epoch record: the training accuracy over the epoch's batches), in step order. ``best_test_error``'s
    values are test errors; pruners compare best values so far, which is the same thing."""
    kind = "epoch" if objective == "train_error" else "eval"
    reports = []
    for record in records:
        if record.get("kind") != kind:
            continue
        value = _metric(record, objective, total_steps, target)
        if value is not None and math.isfinite(value):
            reports.append(Report(int(record["step"]), int(record["step"]) / max(total_steps, 1), float(value)))
    return reports


def _result(summary: Mapping[str, Any], objective: str, out_dir: Path) -> dict[str, Any]:
    curve = learning_curve(out_dir / "run")
    reports = intermediate_values(curve, objective, int(summary["total_steps"]), summary.get("target_accuracy"))
    result: dict[str, Any]
    if summary.get("end") == RunEnd.PRUNED:
        last = reports[-1].value if reports else None
        result = {"status": "pruned", "loss": last, "pruned": summary.get("reason")}
    else:
        result = {"status": "ok", "loss": float(objective_value(summary, objective))}
    for key in SUMMARY_KEYS:
        if summary.get(key) is not None:
            result[key] = summary[key]
    result["learning_curve"] = curve
    result["intermediate"] = [asdict(report) for report in reports]
    result["out_dir"] = str(out_dir)
    return result


def _diverged(message: str, out_dir: Path, started: float) -> dict[str, Any]:
    return {
        "status": "fail",
        "failure": f"diverged: {message}",
        "learning_curve": learning_curve(out_dir / "run"),
        "seconds": time.time() - started,
    }


def _prepare(
    experiment: Mapping[str, Any], doc: Mapping[str, Any], out_dir: Path, checkpoint_every_s: float
) -> tuple[Path, list[str]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{experiment.get('config_name') or 'base'}.toml"
    base.write_text(str(experiment["config_text"]))
    run_dir = out_dir / RUN_DIR
    overrides = [*doc["spec"]["overrides"], f"run.out_dir={json.dumps(str(run_dir))}", "run.progress=false"]
    overrides.append(f"run.checkpoint_every_s={checkpoint_every_s!r}")
    if has_checkpoint(run_dir) is not None:  # an earlier attempt's run, copied here (hpo_worker.attempts)
        overrides.append("run.resume=true")
    return base, overrides


def run_trial(
    experiment: Mapping[str, Any], doc: Mapping[str, Any], out_dir: Path, launch: TrialLaunch | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> dict[str, Any]:  # fmt: skip
    """Trains the trial and returns its hyperopt result. Bad configs and failed runs raise ``ValueError``. A run
    already in ``out_dir/run`` (an earlier attempt's, :mod:`hpo_worker.attempts`) is continued from its checkpoint.
    """
    launch = launch or TrialLaunch()
    base, overrides = _prepare(experiment, doc, out_dir, checkpoint_every_s)
    objective = str(experiment.get("objective", "test_loss"))
    if launch.launcher == "none":
        return _run_here(base, overrides, out_dir, objective)
    return _run_launched(launch, base, overrides, out_dir, objective)


def _run_here(base: Path, overrides: list[str], out_dir: Path, objective: str) -> dict[str, Any]:
    from jobs.config import load_config
    from jobs.datasets import resolve_data_path
    from jobs.loop import TrainingDiverged, run_training
    from jobs.parallel import SingleContext

    config = load_config(base, overrides)
    resolve_data_path(config.data)
    started = time.time()
    try:
        summary = run_training(config, SingleContext(), log=lambda message: None)
    except TrainingDiverged as exc:
        return _diverged(str(exc), out_dir, started)
    return _result(asdict(summary), objective, out_dir)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the ranks' process group, SIGKILL after the grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _run_launched(
    launch: TrialLaunch, base: Path, overrides: list[str], out_dir: Path, objective: str
) -> dict[str, Any]:
    command = launch.command(["--config", str(base), *overrides])
    (out_dir / "command.sh").write_text(shlex.join(command) + "\n")
    if shutil.which(command[0]) is None and not os.path.isfile(command[0]):
        raise ValueError(f"cannot start the trial: {command[0]} is not on PATH (--launcher {launch.launcher})")
    stderr_path = out_dir / "stderr.log"
    started = time.time()
    read_end, owner_end = os.pipe()  # the guard watches the read end; this process holds the other until the end
    guarded = [launch.python, "-m", "hpo_worker.rank_guard", "--owner-fd", str(read_end), "--", *command]
    try:
        with open(out_dir / "stdout.log", "wb") as stdout, open(stderr_path, "wb") as stderr:
            try:
                process = subprocess.Popen(
                    guarded, stdout=stdout, stderr=stderr, start_new_session=True, pass_fds=(read_end,)
                )
            finally:
                os.close(read_end)
            try:
                code = process.wait()
            except BaseException:  # SIGTERM (WorkerTerminated) or Ctrl-C: the ranks must not outlive the worker
                _stop_group(process)
                raise
    finally:
        os.close(owner_end)
    return _launched_outcome(command, code, out_dir, stderr_path, objective, started)


def _launched_outcome(
    command: Sequence[str], code: int, out_dir: Path, stderr_path: Path, objective: str, started: float
) -> dict[str, Any]:
    """The result of a launched run from its exit status and rank 0's summary.json (``end``, ``reason``)."""
    summary = read_summary(out_dir / "run")
    end = summary["end"] if summary is not None else end_from_exit_status(code)
    reason = summary.get("reason") if summary is not None else None
    if end == RunEnd.DIVERGED:
        return _diverged(str(reason or f"exit status {code}"), out_dir, started)
    if code == 0 and summary is not None and end != RunEnd.FAILED:
        return _result(summary, objective, out_dir)
    tail = stderr_path.read_text(errors="replace")[-STDERR_TAIL:].strip()
    because = f"{reason}; " if reason else ""
    raise ValueError(f"{shlex.join(command[:4])} ... exited with status {code}: {because}{tail or 'no output'}")
