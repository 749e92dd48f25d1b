"""study.tuning against a real nx-27017 server, without training: progress read from the store, a changed study
refused through the store before any process starts, and ``python -m jobs.study`` forwarding to ``python -m study``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import study.tuning
from hpo_worker.liveness import BeatClock
from hpo_worker.status import StateReader
from hpo_worker.store import TrialState, connect
from study.config import StudyError, cell_toml, load_study
from study.tuning import progress, tune_cells
from tests.mongo_server import MongoProcess
from tests.processes import ENV, PYTHON, ROOT
from tests.test_study import BASE

STUDY = """
[study]
name = "tiny"
base_config = "base.toml"
optimizers = ["sgd", "kfac"]
batch_sizes = [32]
target_accuracy = 0.6
max_steps = 40
eval_every_steps = 5
[tune]
trials = 2
workers = 1
mongo = "{mongo}"
"""


def _study_file(tmp_path: Path, mongo: str = "") -> Path:
    (tmp_path / "base.toml").write_text(BASE)
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(mongo=mongo))
    return path


def test_progress_counts_the_studys_trials_by_state_in_the_store(mongo: str, db: Any) -> None:
    states = {"a": [TrialState.DONE, TrialState.ERROR, TrialState.RUNNING], "b": [TrialState.DONE, TrialState.NEW]}
    db.jobs.insert_many(
        [{"exp_key": exp, "tid": tid, "state": state} for exp, row in states.items() for tid, state in enumerate(row)]
    )
    store = connect(mongo)
    try:
        assert progress(store, ["a", "b"], 4) == "  3/8 trials finished (1 failed), 1 running"
        assert progress(store, ["a", "b", "c"], 2) == "  3/6 trials finished (1 failed), 1 running"
        db.jobs.insert_one({"exp_key": "b", "tid": 2, "state": TrialState.DONE, "result": {"status": "fail"}})
        assert progress(store, ["a", "b"], 4) == "  4/8 trials finished (1 failed, 1 diverged), 1 running"
        db.jobs.insert_one({"exp_key": "z", "tid": 0, "state": TrialState.DONE, "result": {"status": "fail"}})
        assert progress(store, ["a", "b"], 4) == "  4/8 trials finished (1 failed, 1 diverged), 1 running"  # not ours
    finally:
        store.close()


def test_a_state_reader_reads_the_finished_trials_once_and_counts_as_a_whole_read(mongo: str, db: Any) -> None:
    """Between two lines a running trial finishes, a queued one starts, and two new trials come (one finishing at
    once): the reader's line is the line of a whole read; its later reads ask only for the unfinished and newer
    trials (a finished trial changed behind its back, which never happens, stays as first read)."""
    db.jobs.insert_many([
        {"exp_key": "a", "tid": 0, "state": TrialState.DONE, "result": {"status": "ok"}},
        {"exp_key": "a", "tid": 1, "state": TrialState.RUNNING},
        {"exp_key": "b", "tid": 0, "state": TrialState.NEW},
    ])  # fmt: skip
    store = connect(mongo)
    try:
        reader = StateReader(store, ["a", "b"])
        assert progress(store, ["a", "b"], 4, reader=reader) == "  1/8 trials finished (0 failed), 1 running"
        db.jobs.update_one({"exp_key": "a", "tid": 1}, {"$set": {"state": TrialState.PRUNED}})
        db.jobs.update_one({"exp_key": "b", "tid": 0}, {"$set": {"state": TrialState.RUNNING}})
        db.jobs.insert_many([
            {"exp_key": "b", "tid": 1, "state": TrialState.DONE, "result": {"status": "fail"}},
            {"exp_key": "a", "tid": 2, "state": TrialState.NEW},
        ])  # fmt: skip
        whole = progress(store, ["a", "b"], 4)
        assert whole == "  3/8 trials finished (0 failed, 1 pruned, 1 diverged), 1 running"
        assert progress(store, ["a", "b"], 4, reader=reader) == whole
        db.jobs.update_one({"exp_key": "a", "tid": 0}, {"$set": {"state": TrialState.ERROR}})  # finished: not read
        assert progress(store, ["a", "b"], 4, reader=reader) == whole
    finally:
        store.close()


def test_progress_waits_little_for_a_lost_database_and_does_not_raise(tmp_path: Path) -> None:
    """The study's progress line is no reason to end the study: the drivers and workers decide, by exit status, that
    the database is lost (tests/test_study_kill.py)."""
    server = MongoProcess(tmp_path / "mongo")
    store = connect(server.start())
    try:
        assert progress(store, ["a"], 2) == "  0/2 trials finished (0 failed), 0 running"
        server.kill()
        started = time.monotonic()
        assert progress(store, ["a"], 2) == "  progress unavailable: MongoDB StoreUnreachable"
        assert time.monotonic() - started < 10  # the store's own patience is 60 s
    finally:
        store.close()
        server.stop()


def test_progress_names_running_trials_whose_heartbeat_stopped(
    mongo: str, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(study.tuning, "SILENT_AFTER_S", 0.3)
    db.jobs.insert_many([
        {"exp_key": "a", "tid": 0, "state": TrialState.RUNNING, "owner": "h:1:x", "version": 1, "heartbeat": 1},
        {"exp_key": "a", "tid": 1, "state": TrialState.RUNNING, "owner": "h:2:y", "version": 1, "heartbeat": 1},
    ])  # fmt: skip
    store, clock = connect(mongo), BeatClock(blind_after_s=60)
    try:
        assert "silent" not in progress(store, ["a"], 2, clock)  # beats seen for the first time
        time.sleep(0.4)
        db.jobs.update_one({"tid": 1}, {"$inc": {"heartbeat": 1}})  # trial 1 beats, trial 0 does not
        line = progress(store, ["a"], 2, clock)
        assert "0/2 trials finished (0 failed), 2 running; 1 silent for up to 0 s" in line, line
        assert "tune.grace" in line
        db.jobs.update_one({"tid": 0}, {"$inc": {"heartbeat": 1}})
        assert "silent" not in progress(store, ["a"], 2, clock)
    finally:
        store.close()


def test_a_changed_study_is_refused_through_the_store_before_anything_starts(
    mongo: str, db: Any, tmp_path: Path
) -> None:
    study = load_study(_study_file(tmp_path, mongo), out_dir=tmp_path / "out")
    out = tmp_path / "out"
    (out / "configs").mkdir(parents=True)
    cells = study.cells()
    for cell in cells:
        (out / "configs" / f"{cell.slug}.toml").write_text(cell_toml(study, cell))
    # The kfac cell's experiment was made with another search space (e.g. the study's space file changed since).
    db.hpo_experiments.insert_one({"_id": "tiny-kfac-b32", "space": "kfac", "space_definition": {"params": []}})
    lines: list[str] = []
    with pytest.raises(StudyError) as caught:
        tune_cells(study, cells, out, lines.append)
    message = str(caught.value)
    assert "cell kfac/b32: experiment 'tiny-kfac-b32' already exists with another space_definition" in message
    assert "settings changed" in message and "another [study] name or --out folder" in message
    assert "sgd" not in message.split("--")[0], "only the changed cell is named"
    assert not (out / "logs").exists() and not lines, "no driver or worker was started"
    assert db.hpo_experiments.count_documents({}) == 1, "the check creates no experiment"


def test_python_m_jobs_study_forwards_to_python_m_study(tmp_path: Path) -> None:
    command = [PYTHON, "-m", "jobs.study", "scaling", "--config", str(_study_file(tmp_path)), "--check"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "jobs.study: moved to `python -m study`" in result.stderr
    assert "2 cells, all configs valid: sgd/b32, kfac/b32" in result.stdout, result.stdout
    bad = subprocess.run([*command[:5], str(tmp_path / "missing.toml")], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "study: error: study file" in bad.stderr, bad.stderr
