"""study.replays.run_in_processes, with real ``python -m jobs.train`` processes: runs trained two at a time in the
order given and read back when they ended before; a diverged run and a failed one; a run stopped with the study
(SIGTERM to the study's process only) ends with it and continues from its newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.checkpoint import choose_checkpoint
from study.config import StudyError
from study.replays import LOG_HEADER, Replay, run_in_processes
from tests.processes import ENV, ROOT
from tests.synthetic_configs import synthetic_mlp_toml

RUN = "steps = {steps}\neval_every_steps = 10\ntarget_accuracy = 0.99\ntensorboard = false\nseed = {seed}"


def _replay(tmp_path: Path, name: str, steps: int = 60, seed: int = 0, lr: str = "0.1", extra: str = "") -> Replay:
    config = tmp_path / "configs" / f"{name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    run = RUN.format(steps=steps, seed=seed)
    config.write_text(synthetic_mlp_toml(batch_size=32, train_size=512, test_size=256, lr=lr, run=run) + extra)
    return Replay(name, config, tmp_path / "runs" / name, tmp_path / "logs" / f"{name}.log")


def test_runs_are_trained_two_at_a_time_in_order_and_read_back_once_ended(tmp_path: Path) -> None:
    replays = [_replay(tmp_path, f"seed{seed}", seed=seed) for seed in (1, 2, 3)]
    said: list[tuple[float, str]] = []
    summaries = run_in_processes(replays, 2, 0.99, lambda message: said.append((time.time(), message)))
    assert [s["steps"] for s in summaries] == [60, 60, 60] and not any(s["reached_target"] for s in summaries)
    assert [json.loads((r.run_dir / "config.json").read_text())["run"]["seed"] for r in replays] == [1, 2, 3]
    started = {message.split(":")[0]: when for when, message in said if message.endswith(": training")}
    assert list(started) == ["seed1", "seed2", "seed3"]
    ended = {r.name: (r.run_dir / "summary.json").stat().st_mtime for r in replays}
    assert started["seed2"] < ended["seed1"], "the second run started while the first ran"
    assert started["seed3"] >= min(ended["seed1"], ended["seed2"]), "the third waited for one of them to end"
    for replay in replays:
        log = replay.log_path.read_text()
        assert log.startswith(LOG_HEADER) and "--resume" in log.splitlines()[0] and "done: 60 steps" in log, log[-2000:]
    # Started again: every run had ended, so none is trained; each summary is read back as it was.
    said.clear()
    assert run_in_processes(replays, 2, 0.99, lambda message: said.append((0.0, message))) == summaries
    assert [m for _, m in said] == [f"{r.name}: done before (finished), reusing {r.run_dir / 'summary.json'}"
                                    for r in replays]  # fmt: skip


def test_a_diverged_run_is_a_miss_and_a_failed_run_stops_the_others(tmp_path: Path) -> None:
    diverging = _replay(tmp_path, "diverging", lr="1e6", extra="diverge_above = 100\n")
    summary = run_in_processes([diverging], 1, 0.99, lambda message: None)
    assert summary == [{"target_accuracy": 0.99, "reached_target": False}]
    assert json.loads((diverging.run_dir / "summary.json").read_text())["end"] == "diverged"
    missing = _replay(tmp_path, "missing")  # a data set that is not there: jobs.train refuses it (exit 2)
    text = missing.config_path.read_text().replace('name = "synthetic"', 'name = "mnist"\npath = "/nonexistent/mnist"')
    missing.config_path.write_text(text)
    long = _replay(tmp_path, "long", steps=100000)
    with pytest.raises(StudyError) as raised:
        run_in_processes([long, missing], 2, 0.99, lambda message: None)
    message = str(raised.value)
    assert "missing ended with exit status 2" in message and "/nonexistent/mnist" in message, message
    assert "run the study again" in message
    assert not (long.run_dir / "summary.json").exists(), "the long run was stopped when the other failed"


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


STOPPABLE = """
import signal, sys
from pathlib import Path
from study.__main__ import _on_sigterm
from study.replays import Replay, run_in_processes
signal.signal(signal.SIGTERM, _on_sigterm)
tmp = Path(sys.argv[1])
replay = Replay("long", tmp / "configs" / "long.toml", tmp / "runs" / "long", tmp / "logs" / "long.log")
try:
    run_in_processes([replay], 1, 0.99, print, checkpoint_every_s=0.2)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_run_stopped_with_the_study_continues_from_its_newest_checkpoint(tmp_path: Path) -> None:
    replay = _replay(tmp_path, "long", steps=3000)
    study = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(tmp_path)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while (choice := choose_checkpoint(replay.run_dir)).ref is None or choice.ref.step < 50:
        assert study.poll() is None and time.monotonic() < deadline, study.communicate()
        time.sleep(0.2)
    os.kill(study.pid, signal.SIGTERM)  # the study's process only: it stops its runs itself
    assert study.wait(60) == 130, study.communicate()
    assert not _processes_naming(str(replay.run_dir)), "the run's process ended with the study"
    assert not (replay.run_dir / "summary.json").exists()
    newest = choose_checkpoint(replay.run_dir).ref
    assert newest is not None and 50 <= newest.step < 3000
    (summary,) = run_in_processes([replay], 1, 0.99, lambda message: None)
    assert summary["resumed_from"] == newest.step and summary["steps"] == 3000, summary
