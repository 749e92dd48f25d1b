"""hpo_worker.trial without a server: the objectives TPE minimises, launcher command lines and their errors, how a
launched run's end is read (exit status and summary.json, never its log), the JSON export that the study reads, the
typed trial states, a worker that runs without hyperopt, and which earlier attempt a trial continues from."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpo_worker.attempts import ATTEMPT_FILE, prepare_attempt
from hpo_worker.report import trials_json
from hpo_worker.store import TrialState
from hpo_worker.trial import TrialLaunch, learning_curve, objective_value, run_trial
from jobs.outcome import EXIT_STATUS, RunEnd, read_summary
from tests.processes import ENV, MPI_ENV, PYTHON, ROOT
from tests.synthetic_configs import synthetic_mlp_toml

SUMMARY = {"test_loss": 0.5, "test_accuracy": 0.8, "train_accuracy": 0.9, "total_steps": 200, "target_accuracy": 0.85}


def test_objectives() -> None:
    assert objective_value(SUMMARY, "test_loss") == 0.5
    assert objective_value(SUMMARY, "test_error") == pytest.approx(0.2)
    assert objective_value(SUMMARY, "train_error") == pytest.approx(0.1)
    reached = {**SUMMARY, "steps_to_target": 50}
    assert objective_value(reached, "steps_to_target") == pytest.approx(0.25)
    # A miss ranks behind every hit (loss > 1), a close miss ahead of a far one.
    missed = objective_value(SUMMARY, "steps_to_target")
    far = objective_value({**SUMMARY, "test_accuracy": 0.5}, "steps_to_target")
    assert 1.0 < missed < far and missed == pytest.approx(1.05)
    assert objective_value({**SUMMARY, "steps_to_target": 200}, "steps_to_target") <= 1.0 < missed


def test_objective_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"needs run\.target_accuracy"):
        objective_value({**SUMMARY, "target_accuracy": None}, "steps_to_target")
    with pytest.raises(ValueError, match=r"run\.train_eval_examples"):
        objective_value({**SUMMARY, "train_accuracy": None}, "train_error")
    with pytest.raises(ValueError, match="not evaluated on the test split"):
        objective_value({"test_loss": None, "test_accuracy": None}, "test_loss")


def test_launcher_command_lines() -> None:
    args = ["--config", "c.toml", "optim.lr=0.1"]
    assert TrialLaunch("mpirun", 4, ("--bind-to", "none"), python="py").command(args) == [
        "mpirun", "-np", "4", "--bind-to", "none", "py", "-m", "jobs.train", *args,
    ]  # fmt: skip
    assert TrialLaunch("srun", 2, python="py").command(args)[:3] == ["srun", "--ntasks=2", "--kill-on-bad-exit=1"]
    torchrun = TrialLaunch("torchrun", 2).command(args)
    assert torchrun[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert torchrun[5:8] == ["-m", "jobs.train", "--config"]
    with pytest.raises(ValueError, match="choose --launcher srun, mpirun or torchrun"):
        TrialLaunch("none", 2)
    with pytest.raises(ValueError, match="unknown trial launcher 'aprun'"):
        TrialLaunch("aprun", 2)
    with pytest.raises(ValueError, match="at least 1"):
        TrialLaunch("mpirun", 0)


def test_trials_json_is_plain_json() -> None:
    when = dt.datetime(2026, 11, 24, 12, 0, 0)
    doc = {
        "tid": 3, "state": 2, "owner": "h:1:abc", "attempts": 1, "book_time": when, "refresh_time": "2026-11-24",
        "spec": {"overrides": ["optim.lr=0.1"]}, "misc": {"vals": {"optim.lr": [0.1], "inactive": []}},
        "result": {"status": "ok", "loss": 0.2, "learning_curve": [{"step": 1}]},
    }  # fmt: skip
    [record] = trials_json([doc])
    assert record["params"] == {"optim.lr": 0.1} and record["overrides"] == ["optim.lr=0.1"]
    assert "learning_curve" not in record["result"] and record["result"]["loss"] == 0.2
    assert record["book_time"] == "2026-11-24T12:00:00" and record["refresh_time"] == "2026-11-24"


def test_trial_states_are_hyperopts_ints() -> None:
    import hyperopt

    states = [(s.name, int(s)) for s in TrialState]
    assert states == [("NEW", 0), ("RUNNING", 1), ("DONE", 2), ("ERROR", 3), ("PRUNED", 5)]
    # PRUNED is ours: no hyperopt state has its number, and hyperopt's Trials leave such trials out
    assert TrialState.PRUNED not in hyperopt.base.JOB_STATES
    assert TrialState.NEW == hyperopt.JOB_STATE_NEW and TrialState.RUNNING == hyperopt.JOB_STATE_RUNNING
    assert TrialState.DONE == hyperopt.JOB_STATE_DONE and TrialState.ERROR == hyperopt.JOB_STATE_ERROR
    assert TrialState(2) is TrialState.DONE and json.dumps({"state": TrialState.ERROR}) == '{"state": 3}'


def test_the_worker_and_the_store_do_not_import_hyperopt() -> None:
    """A worker node needs pymongo and jobs, not hyperopt: the driver (TPE) is the only module that imports it."""
    code = (
        "import sys, hpo_worker.worker, hpo_worker.store, hpo_worker.liveness, hpo_worker.report; "
        "assert 'hyperopt' not in sys.modules, 'hyperopt imported'; assert 'hpo_worker.driver' not in sys.modules"
    )
    result = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# A launched run stand-in: writes summary.json (end, reason), metrics.jsonl and stderr as jobs.train does, then exits
# with the status of its end. Only for the ends a real run cannot be steered into reliably (failed with a reason).
FAKE_TRAIN = r"""
import json, sys
end, status = sys.argv[1], int(sys.argv[2])
out = next(json.loads(a.split("=", 1)[1]) for a in sys.argv[3:] if a.startswith("run.out_dir="))
import pathlib
run = pathlib.Path(out)
run.mkdir(parents=True, exist_ok=True)
(run / "metrics.jsonl").write_text(
    '{"kind": "step", "step": 1, "loss": 2.0}\n{"kind": "eval", "step": 1, "test_accuracy": 0.25, "seconds": 1}\n{"kind'
)
summary = {"end": end, "reason": None if end == "finished" else f"the {end} reason", "test_loss": 0.5,
           "test_accuracy": 0.75, "total_steps": 1}
(run / "summary.json").write_text(json.dumps(summary))
print("Traceback: TrainingDiverged in the log must not matter", file=sys.stderr)
sys.exit(status)
"""


@dataclass(frozen=True)
class _FakeLaunch(TrialLaunch):
    end: str = "finished"
    status: int = 0

    def command(self, train_args: Sequence[str]) -> list[str]:
        return [PYTHON, "-c", FAKE_TRAIN, self.end, str(self.status), *train_args]


EXPERIMENT = {"config_text": "", "objective": "test_loss", "config_name": "base"}
DOC: dict[str, Any] = {"spec": {"overrides": []}}


def test_a_launched_runs_end_comes_from_its_exit_status_and_summary(tmp_path: Path) -> None:
    finished = run_trial(EXPERIMENT, DOC, tmp_path / "f", _FakeLaunch("mpirun"))
    assert finished["status"] == "ok" and finished["loss"] == 0.5 and finished["test_accuracy"] == 0.75
    assert finished["learning_curve"] == [{"kind": "eval", "step": 1, "test_accuracy": 0.25}]

    status = EXIT_STATUS[RunEnd.DIVERGED]
    diverged = run_trial(EXPERIMENT, DOC, tmp_path / "d", _FakeLaunch("mpirun", end="diverged", status=status))
    assert diverged["status"] == "fail" and diverged["failure"] == "diverged: the diverged reason", diverged
    assert diverged["learning_curve"] == [{"kind": "eval", "step": 1, "test_accuracy": 0.25}]

    failed = _FakeLaunch("mpirun", end="failed", status=EXIT_STATUS[RunEnd.FAILED])
    with pytest.raises(ValueError, match="exited with status 1: the failed reason; Traceback: TrainingDiverged in"):
        run_trial(EXPERIMENT, DOC, tmp_path / "x", failed)
    # The log says TrainingDiverged, the summary says finished, the status says failed: not a diverged trial.
    with pytest.raises(ValueError, match="exited with status 1"):
        run_trial(EXPERIMENT, DOC, tmp_path / "y", _FakeLaunch("mpirun", end="finished", status=1))


def test_learning_curve_keeps_epoch_and_eval_records(tmp_path: Path) -> None:
    assert learning_curve(tmp_path) == []
    records = [{"kind": "step", "step": 1}, {"kind": "epoch", "step": 2, "seconds": 3.0}, {"kind": "eval", "step": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "ev')
    assert learning_curve(tmp_path) == [{"kind": "epoch", "step": 2}, {"kind": "eval", "step": 2}]


DIVERGING = synthetic_mlp_toml(
    batch_size=64,
    train_size=256,
    test_size=128,
    lr="1e30",
    run="steps = 20\nlog_every = 1\neval_every = 0\ntensorboard = false",
)


def test_a_launched_run_that_diverges_is_a_diverged_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `mpirun -np 1 python -m jobs.train` whose loss becomes infinite: jobs.train writes summary.json with
    end = diverged and exits 3 (jobs.outcome), and the trial is a diverged failure, not an error."""
    for key, value in MPI_ENV.items():
        monkeypatch.setenv(key, value)
    experiment = {**EXPERIMENT, "config_text": DIVERGING}
    result = run_trial(experiment, DOC, tmp_path / "t", TrialLaunch("mpirun", 1))
    assert result["status"] == "fail" and result["failure"].startswith("diverged: "), result
    summary = read_summary(tmp_path / "t" / "run")
    assert summary is not None and summary["end"] == RunEnd.DIVERGED
    assert result["failure"] == f"diverged: {summary['reason']}"


def test_an_attempt_continues_only_the_same_trials_furthest_run(tmp_path: Path) -> None:
    doc = {"exp_key": "e", "tid": 0, "spec": {"overrides": ["optim.lr=0.1"]}}
    experiment = {"config_text": "[run]\nsteps = 100\n"}
    exp_dir = tmp_path / "e"
    assert prepare_attempt(exp_dir / "trial0.0", doc, experiment, ranks=1) is None  # nothing earlier

    def earlier(version: int, step: int, **changed: Any) -> None:
        folder = exp_dir / f"trial0.{version}"
        ranks = changed.pop("ranks", 1)
        prepare_attempt(folder, {**doc, **changed}, experiment, ranks=ranks)  # may copy an earlier one: replaced
        shutil.rmtree(folder / "run", ignore_errors=True)
        (folder / "run" / "checkpoints").mkdir(parents=True)
        (folder / "run" / "checkpoints" / f"ckpt-step{step:08d}.manifest.json").write_text("{}")
        (folder / "run" / "metrics.jsonl").write_text(f'{{"step": {step}}}\n')

    earlier(1, 5)
    earlier(2, 9)
    earlier(3, 20, spec={"overrides": ["optim.lr=0.2"]})  # another trial under the same folder name
    earlier(4, 30, ranks=2)  # its checkpoint cannot resume on one rank
    (exp_dir / "trial0.5").mkdir()
    (exp_dir / "trial0.5" / ATTEMPT_FILE).write_text("{not json")
    said = prepare_attempt(exp_dir / "trial0.6", doc, experiment, ranks=1)
    assert said == "continues from trial0.2's checkpoint at step 9"
    assert (exp_dir / "trial0.6" / "run" / "metrics.jsonl").read_text() == '{"step": 9}\n'
    assert (exp_dir / "trial0.2" / "run" / "metrics.jsonl").exists()  # copied, not moved
    other_config = {"config_text": "[run]\nsteps = 200\n"}
    assert prepare_attempt(exp_dir / "trial0.7", doc, other_config, ranks=1) is None
