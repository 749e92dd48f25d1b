"""hpo_worker under real faults: the database killed, paused or gone for good while drivers and workers run, and
workers that die or go silent. Real nx-27017, driver and worker processes."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors
import pytest

from hpo_worker.result_file import RESULT_FILE, STORED_FILE, keep
from hpo_worker.store import EXIT_STORE_UNREACHABLE, TrialState, TrialStore, connect, patience_from_env
from hpo_worker.worker import WorkerOptions, run_worker
from tests.mongo_server import MongoProcess
from tests.test_hpo import _check_complete, _driver, _finish, _wait_for, _worker


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MongoProcess]:
    """A server the test may kill, pause and start again on the same port and data directory."""
    process = MongoProcess(tmp_path / "mongo")
    process.start()
    yield process
    process.stop()


def _client(url: str) -> Any:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=20000)
    return client.get_default_database()


def _trainings(outputs: list[str], exp: str) -> collections.Counter[int]:
    """How many times each trial was trained, from the workers' "trial N of EXP: overrides" lines."""
    return collections.Counter(int(tid) for out in outputs for tid in re.findall(rf"trial (\d+) of {exp}:", out))


def test_server_killed_mid_run_results_on_disk_are_stored_without_training_again(
    server: MongoProcess, tmp_path: Path
) -> None:
    """SIGKILL of the server while workers train; trials that finish meanwhile keep their result in their folder;
    the server starts again on the same data directory and port: every trial is stored once, trained once."""
    driver = _driver(server.url, tmp_path, "crash", 5, "--queue-size", "2", steps=300)
    workers = [_worker(server.url, tmp_path, "--idle-timeout", "15") for _ in range(2)]
    db = _client(server.url)
    runs = tmp_path / "runs" / "crash"
    # Killed once a trial trains (its first metrics line), not merely once it is reserved: between the reservation
    # and the training the worker reads the experiment from the store, and a server gone at that moment keeps it
    # waiting for its patience (60 s), with no result to keep. A loaded machine made that window a flake.
    _wait_for(
        lambda: any(path.stat().st_size for path in runs.glob("trial*/run/metrics.jsonl")), 60, "a training trial"
    )
    server.kill()
    kept = _wait_for(lambda: list(runs.glob(f"trial*/{RESULT_FILE}")), 90, "a result kept while the server is down")
    server.start()
    rc, out = _finish(driver, 180)
    assert rc == 0, out
    outs = [_finish(worker, 60) for worker in workers]
    assert all(code == 0 for code, _ in outs), outs
    docs = _check_complete(db, "crash", 5)
    trained = _trainings([text for _, text in outs], "crash")
    assert trained == {doc["tid"]: 1 for doc in docs}, (trained, outs)
    assert all(len(list(runs.glob(f"trial{doc['tid']}.*"))) == 1 for doc in docs), "no second attempt's folder"
    assert not list(runs.glob(f"trial*/{RESULT_FILE}")), "every kept result reached the store"
    assert len(list(runs.glob(f"trial*/{STORED_FILE}"))) == 5
    held_back = json.loads(kept[0].with_name(STORED_FILE).read_text())
    stored = next(doc for doc in docs if doc["tid"] == held_back["tid"])
    assert stored["result"]["loss"] == held_back["result"]["loss"] and stored["attempts"] == 1


def test_server_paused_10_s_while_workers_run(server: MongoProcess, tmp_path: Path) -> None:
    """SIGSTOP for 10 s (longer than half the grace period): no process exits, no trial is requeued or lost."""
    driver = _driver(server.url, tmp_path, "pause", 4, "--queue-size", "2", "--grace", "6", steps=300)
    # An idle timeout well above the start-up of a loaded machine: a worker that had not yet got a trial must not
    # exit during the pause (it did once under a full `make test`); the pause comes while both hold a trial.
    workers = [_worker(server.url, tmp_path, "--idle-timeout", "40", "--grace", "6") for _ in range(2)]
    db = _client(server.url)
    _wait_for(lambda: db.jobs.count_documents({"exp_key": "pause", "state": TrialState.RUNNING}) >= 2, 90, "2 trials")
    server.pause()
    time.sleep(10)
    assert driver.poll() is None and all(worker.poll() is None for worker in workers)
    server.resume()
    rc, out = _finish(driver, 180)
    assert rc == 0, out
    outs = [_finish(worker, 60) for worker in workers]
    assert all(code == 0 for code, _ in outs), outs
    docs = _check_complete(db, "pause", 4)
    assert all(doc["attempts"] == 1 and not doc["misc"].get("lost_owners") for doc in docs), docs
    assert "requeued" not in out


def test_database_gone_longer_than_the_patience_is_one_line_and_its_own_exit_status(
    server: MongoProcess, tmp_path: Path
) -> None:
    driver = _driver(server.url, tmp_path, "gone", 2, "--queue-size", "2", "--db-patience", "3")
    idle = _worker(server.url, tmp_path, "--exp", "other", "--idle-timeout", "120", "--db-patience", "3")
    # The kill must find the idle worker connected: one still starting fails to connect instead (exit 2).
    assert idle.stdout is not None
    head = ""
    while "started" not in head and (line := idle.stdout.readline()):
        head += line
    assert "started" in head, head
    db = _client(server.url)
    _wait_for(lambda: db.jobs.count_documents({"exp_key": "gone"}) == 2, 60, "the driver's trials")
    server.kill()
    started = time.monotonic()
    for process, before in ((driver, ""), (idle, head)):
        rc, out = _finish(process, 40)
        out = before + out
        assert rc == EXIT_STORE_UNREACHABLE, out
        said = [line for line in out.splitlines() if "unreachable" in line]
        assert len(said) == 1 and said[0] == out.strip().splitlines()[-1], out
        assert f"MongoDB at 127.0.0.1:{server.port} unreachable for 3 s" in said[0], said
        assert "Traceback" not in out, out
    assert time.monotonic() - started < 30


def test_a_dead_worker_on_this_host_is_requeued_at_once(server: MongoProcess, tmp_path: Path) -> None:
    driver = _driver(server.url, tmp_path, "dead", 1, "--queue-size", "1", "--grace", "120", steps=20000)
    victim = _worker(server.url, tmp_path, "--idle-timeout", "30", "--grace", "0")
    db = _client(server.url)
    running = _wait_for(lambda: db.jobs.find_one({"exp_key": "dead", "state": TrialState.RUNNING}), 60, "the trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = time.monotonic()
    requeued = _wait_for(lambda: db.jobs.find_one({"_id": running["_id"], "state": TrialState.NEW}), 20, "a requeue")
    assert time.monotonic() - killed < 20  # the grace period is 120 s
    assert requeued["misc"]["lost_owners"] == [running["owner"]]
    driver.kill()
    _, out = _finish(driver)
    assert f"trial 0: worker {running['owner']} is gone (its process on this host ended): requeued" in out, out


def test_a_silent_worker_is_requeued_after_the_grace_period_which_the_log_announces(
    server: MongoProcess, tmp_path: Path
) -> None:
    """A worker that still runs but does not beat (SIGSTOP): the driver says it waits, how long, then requeues."""
    driver = _driver(server.url, tmp_path, "silent", 1, "--queue-size", "1", "--grace", "4", steps=20000)
    victim = _worker(server.url, tmp_path, "--idle-timeout", "30", "--grace", "0")
    db = _client(server.url)
    running = _wait_for(lambda: db.jobs.find_one({"exp_key": "silent", "state": TrialState.RUNNING}), 60, "the trial")
    victim.send_signal(signal.SIGSTOP)
    _wait_for(lambda: db.jobs.find_one({"_id": running["_id"], "state": TrialState.NEW}), 30, "the requeue")
    victim.kill()
    victim.wait()
    driver.kill()
    _, out = _finish(driver)
    owner = running["owner"]
    assert re.search(rf"trial 0: owner {owner} silent for 2 s \(it runs on this host\): requeued after 4 s grace", out)
    assert "1 silent (waiting for the 4 s grace period)" in out, out
    assert f"trial 0: worker {owner} sent no heartbeat for 4 s: requeued" in out, out


def _store_with_trial(url: str, workdir: Path) -> tuple[TrialStore, dict[str, Any]]:
    store = connect(url)
    store.ensure_indexes()
    store.create_or_check_experiment("kept", {"config_text": "", "objective": "test_loss"}, ())
    spec = {"space": "s", "params": {"optim.lr": 0.1}, "overrides": ["optim.lr=0.1"]}
    trial = {"exp_key": "kept", "tid": 0, "state": TrialState.NEW, "spec": spec, "result": {"status": "new"},
             "misc": {"tid": 0}, "owner": None, "version": 0, "heartbeat": 0, "attempts": 0}  # fmt: skip
    store.insert_trials([trial])
    return store, trial


def test_a_result_kept_by_an_earlier_attempt_is_stored_instead_of_training(
    server: MongoProcess, tmp_path: Path
) -> None:
    """A worker died after training trial 0 in trial0.1 (its result never stored; the trial requeued): the next
    worker stores that result and does not train."""
    workdir = tmp_path / "runs"
    store, trial = _store_with_trial(server.url, workdir)
    earlier = workdir / "kept" / "trial0.1"
    result = {"status": "ok", "loss": 0.25, "out_dir": str(earlier)}
    keep(earlier, {**trial, "version": 1}, result)
    keep(workdir / "kept" / "trial1.1", {**trial, "tid": 1, "version": 1}, {"status": "ok", "loss": 9.0})

    def must_not_train(*args: Any) -> dict[str, Any]:
        raise AssertionError("trained again")

    lines: list[str] = []
    options = WorkerOptions(exp_key="kept", workdir=str(workdir), idle_timeout_s=0.5, max_trials=1, poll_s=0.05)
    options.trial_fn = must_not_train
    assert run_worker(store, options, log=lines.append) == 0
    doc = store.trial_docs("kept")[0]
    assert doc["state"] == TrialState.DONE and doc["result"] == result and doc["attempts"] == 1, doc
    assert doc["misc"]["workdir"] == str(earlier)
    assert not (earlier / RESULT_FILE).exists() and (earlier / STORED_FILE).exists()
    assert (workdir / "kept" / "trial1.1" / RESULT_FILE).exists()  # another trial's: untouched
    assert any("not trained again" in line for line in lines), lines


class _SigtermInside:
    """A file object whose second write sends this process a real SIGTERM: the worker's handler then raises inside
    torch.save's writer, as when a scheduler's SIGTERM comes while a trial writes its checkpoint (after the first
    write and before the last, torch 2.13's zip writer then fails in its close, and that error replaces the stop)."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return len(data)

    def flush(self) -> None:
        pass


def test_a_sigterm_that_surfaces_as_another_error_puts_the_trial_back_in_the_queue(
    server: MongoProcess, tmp_path: Path
) -> None:
    """The stop raised inside torch.save comes out of it as a RuntimeError (its zip file's close fails), not as the
    worker's own exception: the trial must be released as a stopped one, not stored as failed."""
    import torch

    store, _ = _store_with_trial(server.url, tmp_path / "runs")
    surfaced: list[BaseException] = []

    def saves_a_checkpoint(*args: Any) -> dict[str, Any]:
        try:
            torch.save({"weights": torch.zeros(1000), "bias": torch.ones(10)}, _SigtermInside())  # type: ignore[arg-type]
        except BaseException as exc:
            surfaced.append(exc)
            raise
        raise AssertionError("the SIGTERM did not stop torch.save")

    lines: list[str] = []
    options = WorkerOptions(exp_key="kept", workdir=str(tmp_path / "runs"), idle_timeout_s=0.5, poll_s=0.05)
    options.trial_fn = saves_a_checkpoint
    assert run_worker(store, options, log=lines.append) == 143
    assert surfaced and isinstance(surfaced[0], RuntimeError), surfaced  # what the worker saw was not its own stop
    doc = store.trial_docs("kept")[0]
    assert doc["state"] == TrialState.NEW and doc["attempts"] == 0 and doc["owner"] is None, doc
    assert doc["result"] == {"status": "new"} and "error" not in doc["misc"], doc
    assert any(f"trial 0 back in the queue ({type(surfaced[0]).__name__} as it stopped" in x for x in lines), lines


class _LosesOneReply:
    """A collection whose ``method`` is applied once and then answers with a lost connection, as when the server
    fails over between doing a write and replying."""

    def __init__(self, collection: Any, method: str) -> None:
        self._collection, self._method, self.lost = collection, method, False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._collection, name)
        if name != self._method or self.lost:
            return attribute

        def applied_then_lost(*args: Any, **kwargs: Any) -> Any:
            attribute(*args, **kwargs)
            self.lost = True
            raise pymongo.errors.AutoReconnect("connection closed before the reply")

        return applied_then_lost


def test_writes_whose_reply_was_lost_are_not_applied_twice(server: MongoProcess, tmp_path: Path) -> None:
    store, trial = _store_with_trial(server.url, tmp_path)
    plain = store.trials
    second = {**trial, "tid": 1, "misc": {"tid": 1}}
    store.trials = _LosesOneReply(plain, "insert_many")  # type: ignore[assignment]
    store.insert_trials([second])  # applied, reply lost, retried: the duplicate is this caller's own
    assert plain.count_documents({"exp_key": "kept"}) == 2 and store.trials.lost

    store.trials = _LosesOneReply(plain, "find_one_and_update")
    doc = store.reserve("w:1:a", "kept")
    assert doc is not None and doc["tid"] == 0 and store.trials.lost
    assert plain.count_documents({"state": TrialState.RUNNING}) == 1, "the retry took no second trial"

    store.trials = _LosesOneReply(plain, "update_one")
    assert store.finish(doc, "w:1:a", {"status": "ok", "loss": 1.0}) is True  # not "requeued meanwhile"
    assert plain.find_one({"tid": 0})["version"] == doc["version"] + 1

    store.trials = plain
    taken = store.reserve("w:1:a", "kept")
    assert taken is not None
    store.trials = _LosesOneReply(plain, "update_one")
    assert store.release(taken, "w:1:a") is True
    assert plain.find_one({"tid": 1})["attempts"] == 0


def test_patience_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo_worker.store import DEFAULT_PATIENCE_S, StoreError

    monkeypatch.delenv("HPO_DB_PATIENCE", raising=False)
    assert patience_from_env() == DEFAULT_PATIENCE_S
    monkeypatch.setenv("HPO_DB_PATIENCE", "2.5")
    assert patience_from_env() == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("HPO_DB_PATIENCE", bad)
        with pytest.raises(StoreError, match="HPO_DB_PATIENCE"):
            patience_from_env()


def test_the_study_names_a_lost_database_by_exit_status_not_by_log_text(tmp_path: Path) -> None:
    """A driver that exits with EXIT_STORE_UNREACHABLE: the study's error names the database and what to do, from
    the exit status and the study's own URL; the driver's log is not read."""
    import subprocess
    import sys

    from study.config import StudyError
    from study.tuning import _wait_for_drivers

    log = tmp_path / "driver-c.log"
    log.write_text("an earlier line\n" * 50)
    driver = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({EXIT_STORE_UNREACHABLE})"])
    driver.wait(30)
    with pytest.raises(StudyError) as caught:
        _wait_for_drivers({"c": driver}, [], tmp_path, "127.0.0.1:9", lambda: None)
    message = str(caught.value)
    assert message.startswith("the driver of cell c stopped: MongoDB at 127.0.0.1:9 was unreachable"), message
    assert f"exit status {EXIT_STORE_UNREACHABLE}" in message and "run the same command again" in message
    assert "earlier line" not in message
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    other.wait(30)
    with pytest.raises(StudyError, match="failed \\(exit 1\\)"):  # any other failure: not the database's message
        _wait_for_drivers({"c": other}, [], tmp_path, "127.0.0.1:9", lambda: None)


def test_a_process_suspended_mid_operation_past_its_patience_goes_on(server: MongoProcess) -> None:
    """A study paused with SIGSTOP, server and all, for longer than the patience: an operation in flight finds its
    deadline gone when the process resumes. That is not an outage: the retry, with the patience started again,
    succeeds (a driver gave up with exit status 4 after such a pause, 2026-12-03). Here this very process is
    stopped for real, inside the operation, and a child sends SIGCONT 5 s later; the patience is 2 s."""
    store = connect(server.url, patience_s=2)
    calls: list[float] = []

    def operation() -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:
            waker = subprocess.Popen(
                [sys.executable, "-c", f"import os, time; time.sleep(5); os.kill({os.getpid()}, {signal.SIGCONT})"]
            )
            os.kill(os.getpid(), signal.SIGSTOP)
            waker.wait(timeout=30)
        return store.db.command("ping")

    try:
        assert store.reconnect.run(operation)["ok"] == 1
    finally:
        store.close()
    assert len(calls) == 2 and calls[1] - calls[0] >= 5, calls  # the first attempt ran out of time while stopped
