"""How a run reports its end (jobs.outcome): summary.json's ``end`` and ``reason`` for a finished, stopped, diverged
and failed run, ``python -m jobs.train``'s exit status, and a configuration error that leaves the run in place
untouched. About 20 s on 2 CPU cores."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import jobs.loop
from jobs.config import ConfigError, load_config
from jobs.loop import TrainingDiverged, run_training
from jobs.outcome import EXIT_BAD_CONFIG, EXIT_STATUS, RunEnd, read_summary
from jobs.parallel import SingleContext
from jobs.train import main
from tests.processes import ENV, PYTHON, ROOT

SMOKE = ROOT / "jobs" / "configs" / "smoke.toml"
SHORT = ("run.epochs=1", "run.tensorboard=false")
HUGE_LR = "optim.lr=1e12"  # SGD with momentum: the loss is infinite or NaN within a few steps


def train(out_dir: Path, *overrides: str) -> int:
    return main(["--config", str(SMOKE), f"run.out_dir='{out_dir}'", *SHORT, *overrides])


def test_a_finished_run_says_finished(tmp_path: Path) -> None:
    assert train(tmp_path) == EXIT_STATUS[RunEnd.FINISHED] == 0
    summary = read_summary(tmp_path)
    assert summary is not None and summary["end"] == RunEnd.FINISHED and summary["reason"] is None
    assert summary["steps"] == summary["total_steps"] == 8


def test_a_run_stopped_by_stop_after_steps_says_stopped_and_finishes_when_resumed(tmp_path: Path) -> None:
    assert train(tmp_path, "run.stop_after_steps=4") == EXIT_STATUS[RunEnd.STOPPED]
    summary = read_summary(tmp_path)
    assert summary is not None and summary["end"] == RunEnd.STOPPED and summary["reason"] is None
    assert summary["steps"] == 4 and summary["stopped_early"]
    assert train(tmp_path, "--resume") == 0
    resumed = read_summary(tmp_path)
    assert resumed is not None and resumed["end"] == RunEnd.FINISHED and resumed["steps"] == 8


def test_a_diverging_run_exits_3_and_says_diverged_with_a_reason(tmp_path: Path) -> None:
    argv = ["--config", str(SMOKE), f"run.out_dir={tmp_path}", *SHORT, HUGE_LR]
    done = subprocess.run(
        [PYTHON, "-m", "jobs.train", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == EXIT_STATUS[RunEnd.DIVERGED] == 3, done.stderr[-3000:]
    assert "training diverged" in done.stderr
    summary = read_summary(tmp_path)
    assert summary is not None and summary["end"] == RunEnd.DIVERGED
    assert "the training loss is" in summary["reason"] and summary["steps"] < summary["total_steps"] == 8


def test_a_diverging_run_in_process_raises_after_writing_its_summary(tmp_path: Path) -> None:
    config = load_config(SMOKE, [f"run.out_dir='{tmp_path}'", *SHORT, HUGE_LR])
    with pytest.raises(TrainingDiverged) as raised:
        run_training(config, SingleContext(), log=lambda _: None)
    summary = read_summary(tmp_path)
    assert summary is not None and summary["end"] == RunEnd.DIVERGED and summary["reason"] == str(raised.value)


def test_a_loss_above_run_diverge_above_ends_the_run_as_diverged(tmp_path: Path) -> None:
    """A finite loss that exploded is a divergence too when run.diverge_above says so: the same run with a
    learning rate that leaves the loss finite (but far above its start) finishes without the limit."""
    lr = "optim.lr=30"  # the smoke MLP's loss grows to thousands without overflowing within 8 steps
    assert train(tmp_path / "free", lr) == 0
    free = read_summary(tmp_path / "free")
    assert free is not None and free["end"] == RunEnd.FINISHED
    assert train(tmp_path / "capped", lr, "run.diverge_above=50") == EXIT_STATUS[RunEnd.DIVERGED]
    capped = read_summary(tmp_path / "capped")
    assert capped is not None and capped["end"] == RunEnd.DIVERGED, capped
    assert "above run.diverge_above = 50" in capped["reason"] and capped["steps"] < 8
    with pytest.raises(ConfigError, match=r"run\.diverge_above must be >= 0"):
        load_config(SMOKE, ["run.diverge_above=-1"])


def test_a_failing_run_writes_what_is_known_then_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken_evaluate(*args: object, **kwargs: object) -> tuple[float, float]:
        calls.append(1)
        raise RuntimeError("the test split went away")

    monkeypatch.setattr(jobs.loop, "evaluate", broken_evaluate)
    config = load_config(SMOKE, [f"run.out_dir='{tmp_path}'", *SHORT, "run.eval_every_steps=3"])
    with pytest.raises(RuntimeError, match="went away"):
        run_training(config, SingleContext(), log=lambda _: None)
    summary = read_summary(tmp_path)
    assert summary is not None and summary["end"] == RunEnd.FAILED
    assert summary["reason"] == "RuntimeError: the test split went away"
    assert summary["steps"] == 3 and summary["total_steps"] == 8 and calls == [1]  # the first evaluation failed
    assert summary["test_accuracy"] is None


def test_a_run_that_fails_while_setting_up_says_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(jobs.loop, "load_dataset", no_data)
    config = load_config(SMOKE, [f"run.out_dir='{tmp_path}'", *SHORT])
    with pytest.raises(OSError, match="disk gone"):
        run_training(config, SingleContext(), log=lambda _: None)
    summary = read_summary(tmp_path)
    assert summary is not None and summary["end"] == RunEnd.FAILED and summary["reason"] == "OSError: disk gone"
    assert summary["steps"] == 0


def test_a_configuration_error_leaves_the_run_in_its_folder_untouched(tmp_path: Path) -> None:
    assert train(tmp_path) == 0
    before = (tmp_path / "summary.json").read_bytes()
    assert train(tmp_path) == EXIT_BAD_CONFIG  # no --resume: refused, nothing trained
    assert (tmp_path / "summary.json").read_bytes() == before
    config = load_config(SMOKE, [f"run.out_dir='{tmp_path}'", *SHORT, "optim.lr=0.01", "run.resume=true"])
    with pytest.raises(ConfigError, match="different configuration"):
        run_training(config, SingleContext(), log=lambda _: None)
    assert (tmp_path / "summary.json").read_bytes() == before
