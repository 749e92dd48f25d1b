"""A study killed as the OOM killer or a scheduler kills it (SIGKILL of its whole process group) during the server's
start, while trials run and while the report is written, then started again with the same command: it finishes,
every trial is stored once, no trial stored as finished is trained again, and no process is left behind: the
embedded nx-27017, in a session of its own so that the signal misses it, ends with its owner.

A trial killed while it trains is trained again (it is still stored once). A trial that finished training while the
database was gone keeps its result in its folder, and the next run stores it without training it again: the second
test kills the study's server, not the study.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpo_worker.server import EmbeddedServer
from hpo_worker.store import TrialState, connect
from tests.processes import ENV, PYTHON, ROOT, processes_mentioning, wait_until_gone
from tests.test_study import BASE, SPACE

STUDY = """
[study]
name = "kill"
base_config = "base.toml"
optimizers = ["sgd"]
batch_sizes = [32]
target_accuracy = 0.6
max_steps = 20
eval_every_steps = 5
[tune]
trials = 3
workers = 1
grace = 5
spaces = { sgd = "space.toml" }
"""
EXP = "kill-sgd-b32"
TRIALS = 3


def _start(tmp_path: Path, run: int) -> subprocess.Popen[bytes]:
    config, out = str(tmp_path / "study.toml"), str(tmp_path / "out")
    with (tmp_path / f"run{run}.err").open("wb") as err:  # a process group of its own, as a batch job's
        return subprocess.Popen(
            [PYTHON, "-m", "study", "scaling", "--config", config, "--out", out],
            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip


def _kill_when(study: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert study.poll() is None, f"the study ended (status {study.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.02)
    os.killpg(study.pid, signal.SIGKILL)
    study.wait()


def _nothing_left(out: Path) -> None:
    assert wait_until_gone(str(out), timeout_s=20) == [], "a process of the killed study is still running"


def _stored(out: Path) -> list[dict[str, Any]]:
    """The experiment's trials, read through a server of the test's own on the study's data directory."""
    notes: list[str] = []
    with EmbeddedServer(out / "hpo_data", write_url_file=False, log=notes.append) as server:
        store = connect(server.url)
        try:
            docs = list(store.trials.find({"exp_key": EXP}))
        finally:
            store.close()
    assert notes == [], f"the killed study left its server running: {notes}"
    return docs


def _trained(out: Path) -> dict[str, int]:
    """Every trial run folder, with its metrics' modification time (0 before its first line)."""
    folders = sorted((out / "trials" / EXP).glob("trial*")) if (out / "trials" / EXP).exists() else []
    return {f.name: (f / "run" / "metrics.jsonl").stat().st_mtime_ns if (f / "run" / "metrics.jsonl").exists() else 0
            for f in folders}  # fmt: skip


def _done_runs(out: Path, docs: list[dict[str, Any]]) -> dict[str, int]:
    done = {f"trial{doc['tid']}." for doc in docs if doc["state"] == TrialState.DONE}
    return {name: mtime for name, mtime in _trained(out).items() if name.startswith(tuple(done))}


def test_a_study_killed_at_any_point_finishes_on_the_same_command(tmp_path: Path) -> None:
    for name, text in (("base.toml", BASE), ("space.toml", SPACE), ("study.toml", STUDY)):
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"

    study = _start(tmp_path, 1)  # killed while its embedded server starts
    _kill_when(study, lambda: (out / "hpo_data" / "nx-27017.owner").exists(), "the server's start")
    _nothing_left(out)

    study = _start(tmp_path, 2)  # killed while trials run: one stored, the next one training
    _kill_when(study, lambda: len(_trained(out)) >= 2, "a second trial")
    _nothing_left(out)
    docs = _stored(out)
    done_before = _done_runs(out, docs)
    assert done_before, f"a trial was stored before the kill: {[(d['tid'], d['state']) for d in docs]}"

    study = _start(tmp_path, 3)  # killed after the tuning, while the report is written
    _kill_when(study, lambda: (out / "trials" / "sgd-b32.json").exists(), "the tuning's end")
    _nothing_left(out)
    tuned = _done_runs(out, _stored(out))
    assert tuned.items() >= done_before.items(), "a trial stored as finished was trained again"

    study = _start(tmp_path, 4)
    assert study.wait(timeout=600) == 0, (tmp_path / "run4.err").read_text()[-4000:]
    _nothing_left(out)
    docs = _stored(out)
    assert sorted(doc["tid"] for doc in docs) == list(range(TRIALS)), "every trial stored once"
    assert all(doc["state"] == TrialState.DONE for doc in docs), [(d["tid"], d["state"]) for d in docs]
    assert _trained(out) == tuned, "the last run trained nothing: every trial was stored"
    assert len(json.loads((out / "trials" / "sgd-b32.json").read_text())) == TRIALS
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == TRIALS
    assert (out / "report.md").exists()
    for run in range(2, 5):
        err = (tmp_path / f"run{run}.err").read_text()
        assert "stopped nx-27017" not in err and "did not start" not in err, err[-3000:]
    assert processes_mentioning(str(out)) == []


def _kept_results(out: Path) -> dict[str, int]:
    """Trial folders holding a result the store does not have yet (``result.json``), with their metrics' mtime."""
    return {
        name: mtime for name, mtime in _trained(out).items() if (out / "trials" / EXP / name / "result.json").exists()
    }


def test_a_study_whose_database_dies_says_so_in_one_line_and_the_rerun_stores_the_kept_results(tmp_path: Path) -> None:
    """SIGKILL of the embedded server while a trial trains: the trial finishes and keeps its result on disk; every
    process gives up after $HPO_DB_PATIENCE (3 s here) with exit status 4, and the study says in one line which
    database was lost. The same command again stores the kept result without training it again, and finishes."""
    # A trial long enough to kill the server in. Its first evaluation comes late too: the target is easy, and a trial
    # that met it at its first evaluation (step 5) was once stored before the kill landed, leaving nothing to keep.
    study_text = STUDY.replace("max_steps = 20", "max_steps = 300").replace(
        "eval_every_steps = 5", "eval_every_steps = 50"
    )
    for name, text in (("base.toml", BASE), ("space.toml", SPACE), ("study.toml", study_text)):
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    config = str(tmp_path / "study.toml")
    command = [PYTHON, "-m", "study", "scaling", "--config", config, "--out", str(out)]
    with (tmp_path / "run1.err").open("wb") as stderr_file:
        study = subprocess.Popen(command, cwd=ROOT, env={**ENV, "HPO_DB_PATIENCE": "3"}, stdout=subprocess.DEVNULL,
                                 stderr=stderr_file, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not any(mtime for mtime in _trained(out).values()):  # a trial has written its first metrics
        assert study.poll() is None and time.monotonic() < deadline, (tmp_path / "run1.err").read_text()[-3000:]
        time.sleep(0.05)
    server_pid = json.loads((out / "hpo_data" / "nx-27017.owner").read_text())["server_pid"]
    os.kill(server_pid, signal.SIGKILL)
    assert study.wait(timeout=300) == 1
    err = (tmp_path / "run1.err").read_text()
    last = err.strip().splitlines()[-1]
    assert "MongoDB at 127.0.0.1:" in last and "was unreachable for longer than --db-patience" in last, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _nothing_left(out)
    kept = _kept_results(out)
    assert kept, f"the trial that was training kept its result: {sorted(_trained(out))}"

    with (tmp_path / "run2.err").open("wb") as err2:
        again = subprocess.run(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err2, timeout=600)
    assert again.returncode == 0, (tmp_path / "run2.err").read_text()[-4000:]
    _nothing_left(out)
    docs = _stored(out)
    assert sorted(doc["tid"] for doc in docs) == list(range(TRIALS)), "every trial stored once"
    assert all(doc["state"] == TrialState.DONE for doc in docs), [(d["tid"], d["state"]) for d in docs]
    trained = _trained(out)
    for name, mtime in kept.items():
        assert trained[name] == mtime, f"{name} was trained again instead of storing its kept result"
        assert (out / "trials" / EXP / name / "result.stored.json").exists(), name
    assert not _kept_results(out), "every kept result was stored"
