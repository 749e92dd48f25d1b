"""hpo_worker.trial without a server: the objectives TPE minimises, launcher command lines and their errors, and the
JSON export that jobs.study reads."""

from __future__ import annotations

import datetime as dt
import sys

import pytest

pytest.importorskip("hyperopt")

from hpo_worker.report import trials_json
from hpo_worker.trial import TrialLaunch, objective_value

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
