"""hpo_worker against a real nx-27017 server process: driver, workers, faults, errors, hyperopt's schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpo_worker.driver import ExperimentView, build_trials
from hpo_worker.store import ExperimentMismatch, TrialState, connect, mask_url
from tests.mongo_server import free_port
from tests.processes import MPI_ENV
from tests.synthetic_configs import synthetic_mlp_toml

ROOT = Path(__file__).resolve().parents[1]

BASE_CONFIG = synthetic_mlp_toml(
    batch_size=64,
    train_size=256,
    test_size=128,
    lr="0.05",
    run="steps = {steps}\neval_every = 0\nprogress = false\ntensorboard = false",
)

SPACE = """
[fixed]
"optim.schedule" = "constant"
[params."optim.lr"]
dist = "loguniform"
low = 1e-3
high = 1.0
[params."optim.momentum"]
dist = "uniform"
low = 0.0
high = 0.95
"""


def _files(tmp_path: Path, steps: int = 8) -> tuple[Path, Path]:
    config = tmp_path / "base.toml"
    config.write_text(BASE_CONFIG.format(steps=steps))
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    return config, space


def _start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(MPI_ENV)  # some workers start their trials under mpirun
    env.pop("HPO_MONGO_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "hpo_worker", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _driver(mongo: str, tmp_path: Path, exp: str, max_evals: int, *extra: str, steps: int = 8) -> subprocess.Popen[str]:
    config, space = _files(tmp_path, steps)
    return _start(
        "driver", "--mongo", mongo, "--exp", exp, "--space", str(space), "--config", str(config),
        "--max-evals", str(max_evals), "--poll", "0.1", *extra, cwd=tmp_path,
    )  # fmt: skip


def _worker(mongo: str, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return _start(
        "worker", "--mongo", mongo, "--workdir", str(tmp_path / "runs"), "--poll", "0.05", "--heartbeat", "0.2",
        *extra, cwd=tmp_path,
    )  # fmt: skip


def _finish(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"timed out: {out}") from None
    return process.returncode, out


def _wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _check_complete(db: Any, exp: str, n: int) -> list[dict[str, Any]]:
    docs = list(db.jobs.find({"exp_key": exp}))
    tids = [d["tid"] for d in docs]
    assert len(tids) == n and len(set(tids)) == n, tids
    not_done = [(d["tid"], d["state"], d["misc"].get("error"), d["result"].get("failure")) for d in docs
                if d["state"] != TrialState.DONE]  # fmt: skip
    assert not not_done, not_done
    return docs


def test_mask_url() -> None:
    assert mask_url("mongodb://alice:s3cr%40t@db.example:27017/hpo?tls=true") == (
        "mongodb://alice:***@db.example:27017/hpo?tls=true"
    )
    assert mask_url("mongodb://db:27017/") == "mongodb://db:27017/"


def test_experiment_view_reads_finished_trials_once(mongo: str, db: Any) -> None:
    """The driver's rounds read only queued and running trials; finished ones are fetched once, when they finish."""
    curve = [{"kind": "eval", "step": 1, "test_accuracy": 0.5}]

    def trial(tid: int, state: int, loss: float | None = None) -> dict[str, Any]:
        result = {"status": "ok", "loss": loss, "learning_curve": curve} if loss is not None else {"status": "new"}
        misc = {"tid": tid, "cmd": None, "workdir": None, "idxs": {"x": [tid]}, "vals": {"x": [0.1 * tid]}}
        return {"exp_key": "v", "tid": tid, "state": state, "result": result, "misc": misc, "spec": None,
                "owner": None, "version": 0, "book_time": None, "refresh_time": None}  # fmt: skip

    db.jobs.insert_many([trial(0, TrialState.DONE, 0.5), trial(1, TrialState.RUNNING), trial(2, TrialState.NEW)])
    db.jobs.insert_one({**trial(0, TrialState.DONE, 0.1), "exp_key": "other"})
    store = connect(mongo)
    view = ExperimentView(store, "v", resync_s=3600)
    view.refresh()
    assert sorted(view.finished) == [0] and sorted(view.active) == [1, 2]
    assert "learning_curve" not in view.finished[0]["result"], "TPE needs the loss, not the curve"

    # A finished trial is not read again: a change behind the view's back shows only at the next full read.
    db.jobs.update_one({"exp_key": "v", "tid": 0}, {"$set": {"result.loss": 0.25}})
    # Trial 1 finishes; trial 3, inserted by the driver, finishes before the next round without ever being seen queued.
    db.jobs.update_one({"exp_key": "v", "tid": 1}, {"$set": {"state": TrialState.DONE, "result.loss": 0.75}})
    db.jobs.insert_one(trial(3, TrialState.DONE, 0.9))
    view.added([trial(3, TrialState.NEW)])
    # Trial 2 is taken and given back between rounds: still active.
    db.jobs.update_one({"exp_key": "v", "tid": 2}, {"$set": {"state": TrialState.RUNNING}})
    view.refresh()
    assert sorted(view.finished) == [0, 1, 3] and sorted(view.active) == [2]
    assert view.finished[0]["result"]["loss"] == 0.5 and view.finished[1]["result"]["loss"] == 0.75
    assert view.counts() == {TrialState.NEW: 0, TrialState.RUNNING: 1, TrialState.DONE: 3, 3: 0, TrialState.PRUNED: 0}
    assert [d["tid"] for d in view.docs] == [0, 1, 2, 3]
    assert len(build_trials(view.docs, "v").trials) == 4

    view.resync_s = 0.0
    view.refresh()
    assert view.finished[0]["result"]["loss"] == 0.25 and sorted(view.active) == [2]
    store.close()


def test_store_counts_states_lists_running_trials_and_checks_an_experiment(mongo: str, db: Any) -> None:
    """What the study reads for its progress (count_states), the worker's stale check (running_docs), and the typed
    error for an experiment that exists with other settings (check_experiment)."""
    states = [TrialState.DONE, TrialState.DONE, TrialState.ERROR, TrialState.RUNNING, TrialState.NEW]
    db.jobs.insert_many([{"exp_key": "c", "tid": tid, "state": state} for tid, state in enumerate(states)])
    db.jobs.insert_one({"exp_key": "other", "tid": 0, "state": TrialState.RUNNING})
    store = connect(mongo)
    counts = store.count_states("c")
    assert counts == {
        TrialState.NEW: 1,
        TrialState.RUNNING: 1,
        TrialState.DONE: 2,
        TrialState.ERROR: 1,
        TrialState.PRUNED: 0,
    }
    assert all(isinstance(state, TrialState) for state in counts)
    assert store.count_states("none") == dict.fromkeys(TrialState, 0)
    assert [d["tid"] for d in store.running_docs("c")] == [3]
    assert sorted(d["exp_key"] for d in store.running_docs()) == ["c", "other"]
    assert db.jobs.find_one({"exp_key": "c", "tid": 0})["state"] == 2 and type(counts[TrialState.DONE]) is int

    meta = {"space": "sgd", "seed": 0, "objective": "test_loss"}
    assert store.check_experiment("c", meta, ("space", "seed")) is False  # none stored: nothing to disagree with
    assert store.create_or_check_experiment("c", meta, ("space", "seed")) is True
    assert store.check_experiment("c", meta, ("space", "seed")) is True
    with pytest.raises(ExperimentMismatch, match="already exists with another seed, space") as caught:
        store.check_experiment("c", {**meta, "space": "adam", "seed": 1}, ("seed", "space"))
    assert caught.value.exp_key == "c" and caught.value.different == ("seed", "space")
    with pytest.raises(ExperimentMismatch):
        store.create_or_check_experiment("c", {**meta, "objective": "test_error"}, ("objective",))
    store.close()


def test_concurrent_reservations_take_each_trial_once_oldest_first(mongo: str, db: Any) -> None:
    """Four connections race for 40 queued trials (and 5 of another experiment): each is taken exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    db.jobs.insert_many([{"exp_key": "r", "tid": tid, "state": TrialState.NEW, "version": 0} for tid in range(40)])
    db.jobs.insert_many([{"exp_key": "other", "tid": tid, "state": TrialState.NEW, "version": 0} for tid in range(5)])
    connect(mongo).ensure_indexes()

    def drain(owner: str) -> list[int]:
        store = connect(mongo)
        taken = []
        while (doc := store.reserve(owner, "r")) is not None:
            assert doc["owner"] == owner and doc["state"] == TrialState.RUNNING and doc["attempts"] == 1
            taken.append(doc["tid"])
        store.close()
        return taken

    with ThreadPoolExecutor(4) as pool:
        taken = list(pool.map(drain, [f"w{i}" for i in range(4)]))
    everything = sorted(tid for tids in taken for tid in tids)
    assert everything == list(range(40)), taken
    assert all(tids == sorted(tids) for tids in taken), "each worker takes the oldest queued trial first"
    assert db.jobs.count_documents({"exp_key": "other", "state": TrialState.NEW}) == 5
    anyone = connect(mongo).reserve("w", None)  # without --exp: any experiment's trial
    assert anyone is not None and anyone["exp_key"] == "other"


def test_driver_and_three_workers(mongo: str, db: Any, tmp_path: Path) -> None:
    import hyperopt

    driver = _driver(mongo, tmp_path, "three", 8, "--queue-size", "3", "--pending", "mean")
    workers = [_worker(mongo, tmp_path, "--idle-timeout", "5") for _ in range(3)]
    rc, out = _finish(driver)
    assert rc == 0, out
    assert "8/8 finished" in out and "best: trial" in out
    outs = [_finish(w) for w in workers]
    assert all(rc == 0 for rc, _ in outs), outs
    docs = _check_complete(db, "three", 8)
    assert db.hpo_experiments.find_one({"_id": "three"})["pending"] == "mean"
    owners = {d["owner"].split(":")[1] for d in docs}
    assert len(owners) >= 2, owners  # the work was shared
    for doc in docs:
        result = doc["result"]
        assert result["status"] == "ok" and result["loss"] == pytest.approx(result["test_loss"])
        assert "lie" not in result  # the pending trials' lie lives only in the driver's copy
        assert 0 <= result["test_accuracy"] <= 1
        assert [r["kind"] for r in result["learning_curve"]][-2:] == ["epoch", "eval"]
        assert any(o.startswith("optim.schedule=") for o in doc["spec"]["overrides"])
        assert any(o.startswith("optim.lr=") for o in doc["spec"]["overrides"])
        assert doc["misc"]["tid"] == doc["tid"] and set(doc["misc"]["vals"]) == {"optim.lr", "optim.momentum"}
        assert doc["book_time"] is not None and doc["refresh_time"] is not None
    # hyperopt's own Trials reads the stored documents
    trials = hyperopt.Trials(exp_key="three")
    trials.insert_trial_docs([{k: v for k, v in d.items() if k != "_id"} for d in docs])
    trials.refresh()
    assert len(trials.losses()) == 8 and None not in trials.losses()
    assert trials.best_trial["result"]["loss"] == min(d["result"]["loss"] for d in docs)
    assert set(trials.argmin) == {"optim.lr", "optim.momentum"}
    assert len(build_trials(docs, "three").trials) == 8

    # The report reads the same documents back from the server.
    shown = subprocess.run(
        [sys.executable, "-m", "hpo_worker", "report", "--mongo", mongo, "--exp", "three", "--top-k", "3",
         "--csv", str(tmp_path / "trials.csv"), "--plots", str(tmp_path / "plots")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    best = min(docs, key=lambda d: d["result"]["loss"])
    assert f"{best['tid']}" in shown.stdout and "top 3" in shown.stdout.lower(), shown.stdout
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 1 + 8
    assert (tmp_path / "plots" / "loss_by_trial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [sys.executable, "-m", "hpo_worker", "report", "--mongo", mongo, "--exp", "nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no experiment 'nope'" in missing.stderr


def test_sigkill_worker_trial_is_requeued(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "kill", 3, "--queue-size", "1", "--grace", "1", steps=400)
    victim = _worker(mongo, tmp_path, "--idle-timeout", "20", "--grace", "0")
    running = _wait_for(
        lambda: db.jobs.find_one(
            {"exp_key": "kill", "state": TrialState.RUNNING, "owner": {"$regex": f":{victim.pid}:"}}
        ),
        what="the victim's trial",
    )
    victim.kill()
    victim.wait()
    other = _worker(mongo, tmp_path, "--idle-timeout", "8", "--grace", "0")
    rc, out = _finish(driver, 60)
    assert rc == 0, out
    # Same host: its pid is gone, so the trial is requeued at once, not after the grace period (the grace path, a
    # silent worker whose process still runs, is tests/test_hpo_faults.py's stopped worker).
    assert f"worker {running['owner']} is gone (its process on this host ended): requeued" in out, out
    _finish(other)
    docs = _check_complete(db, "kill", 3)
    again = next(d for d in docs if d["tid"] == running["tid"])
    assert again["owner"] != running["owner"] and again["attempts"] == 2
    assert running["owner"] in again["misc"]["lost_owners"]


def test_driver_restart_resumes_without_duplicates(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "restart", 6, "--queue-size", "2")
    worker = _worker(mongo, tmp_path, "--idle-timeout", "15")
    _wait_for(lambda: db.jobs.count_documents({"exp_key": "restart", "state": TrialState.DONE}) >= 2, what="2 done")
    driver.kill()
    driver.wait()
    driver = _driver(mongo, tmp_path, "restart", 6, "--queue-size", "2")
    rc, out = _finish(driver)
    assert rc == 0, out
    assert "resuming experiment 'restart'" in out
    _finish(worker)
    _check_complete(db, "restart", 6)


def test_a_second_driver_on_one_experiment_is_refused(mongo: str, db: Any, tmp_path: Path) -> None:
    first = _driver(mongo, tmp_path, "one", 2, "--queue-size", "2")
    _wait_for(lambda: db.jobs.count_documents({"exp_key": "one"}) == 2, what="the first driver's trials")
    second = _driver(mongo, tmp_path, "one", 2, "--queue-size", "2")
    rc, out = _finish(second, 30)
    assert rc == 2 and f"already has a driver ({os.uname().nodename}:{first.pid}" in out, out
    assert db.hpo_experiments.find_one({"_id": "one"})["driver"].endswith(f":{first.pid}")
    first.kill()  # SIGKILL leaves the lease behind; a driver on the same host sees its pid is gone and takes over
    first.wait()
    third = _driver(mongo, tmp_path, "one", 2, "--queue-size", "2")
    worker = _worker(mongo, tmp_path, "--idle-timeout", "5")
    rc, out = _finish(third)
    assert rc == 0 and "resuming experiment 'one'" in out, out
    _finish(worker)
    _check_complete(db, "one", 2)
    assert db.hpo_experiments.find_one({"_id": "one"})["lease_holder"] is None  # released at the end


def test_a_changed_space_or_config_does_not_resume_an_experiment(mongo: str, db: Any, tmp_path: Path) -> None:
    """Resuming with other ranges under the same space name would mix two searches in one TPE history."""
    driver = _driver(mongo, tmp_path, "same", 1)
    worker = _worker(mongo, tmp_path, "--idle-timeout", "5")
    rc, out = _finish(driver)
    assert rc == 0, out
    _finish(worker)
    config, space = tmp_path / "base.toml", tmp_path / "space.toml"
    original_space, original_config = space.read_text(), config.read_text()

    def drive() -> tuple[int, str]:
        return _finish(_start("driver", "--mongo", mongo, "--exp", "same", "--space", str(space), "--config",
                              str(config), "--max-evals", "1", "--poll", "0.1", cwd=tmp_path), 30)  # fmt: skip

    space.write_text(original_space.replace("high = 1.0", "high = 0.5"))
    rc, out = drive()
    assert rc == 2 and "already exists with another space_definition" in out and "another --exp" in out, out
    space.write_text(original_space)
    config.write_text(original_config.replace("lr = 0.05", "lr = 0.1"))
    rc, out = drive()
    assert rc == 2 and "already exists with another config_text" in out, out
    config.write_text(original_config)
    rc, out = drive()
    assert rc == 0 and "resuming experiment 'same'" in out and "1/1 finished" in out, out
    assert db.jobs.count_documents({"exp_key": "same"}) == 1
    stored = db.hpo_experiments.find_one({"_id": "same"})["space_definition"]
    assert [p["label"] for p in stored["params"]] == ["optim.lr", "optim.momentum"], stored
    assert stored["fixed"] == {"optim.schedule": "constant"}


def test_two_experiments_stay_apart(mongo: str, db: Any, tmp_path: Path) -> None:
    a = _driver(mongo, tmp_path, "exp-a", 2, "--queue-size", "2")
    b = _driver(mongo, tmp_path, "exp-b", 3, "--queue-size", "2", "--seed", "1")
    wa = _worker(mongo, tmp_path, "--exp", "exp-a", "--idle-timeout", "5")
    wb = _worker(mongo, tmp_path, "--exp", "exp-b", "--idle-timeout", "5")
    for process in (a, b, wa, wb):
        rc, out = _finish(process)
        assert rc == 0, out
    docs_a = _check_complete(db, "exp-a", 2)
    docs_b = _check_complete(db, "exp-b", 3)
    assert {d["owner"].split(":")[1] for d in docs_a} == {str(wa.pid)}
    assert {d["owner"].split(":")[1] for d in docs_b} == {str(wb.pid)}
    assert len(build_trials(docs_a + docs_b, "exp-a").trials) == 2


def test_sigterm_puts_trial_back(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "term", 1, "--queue-size", "1", steps=20000)  # long: SIGTERM must find it running
    worker = _worker(mongo, tmp_path, "--idle-timeout", "20")
    _wait_for(lambda: db.jobs.find_one({"exp_key": "term", "state": TrialState.RUNNING}), what="a running trial")
    worker.send_signal(signal.SIGTERM)
    rc, out = _finish(worker, 20)
    assert rc == 143, out
    assert "back in the queue" in out
    doc = db.jobs.find_one({"exp_key": "term"})
    assert doc["state"] == TrialState.NEW and doc["owner"] is None and doc["attempts"] == 0
    driver.kill()
    driver.wait()


def test_a_trial_stopped_by_sigterm_continues_from_its_checkpoint(mongo: str, db: Any, tmp_path: Path) -> None:
    driver = _driver(mongo, tmp_path, "again", 1, "--queue-size", "1", steps=3000)
    first = _worker(mongo, tmp_path, "--idle-timeout", "20", "--checkpoint-every-s", "0.2")
    exp_dir = tmp_path / "runs" / "again"
    _wait_for(lambda: list(exp_dir.glob("trial0.*/run/checkpoints/latest")), timeout=60, what="a timed checkpoint")
    first.send_signal(signal.SIGTERM)
    rc, out = _finish(first, 20)
    assert rc == 143 and "back in the queue" in out, out
    second = _worker(mongo, tmp_path, "--idle-timeout", "5", "--checkpoint-every-s", "0.2")
    rc, out = _finish(driver, 120)
    assert rc == 0, out
    rc, out = _finish(second)
    (doc,) = _check_complete(db, "again", 1)
    earlier = sorted(exp_dir.glob("trial0.*"))[0].name
    assert f"trial 0: continues from {earlier}'s checkpoint at step " in out, out
    assert 0 < doc["result"]["resumed_from"] < 3000
    # The same trial trained without a stop ends with the same test loss, bit for bit.
    attempt = Path(doc["result"]["out_dir"])
    whole = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", str(attempt / "base.toml"), *doc["spec"]["overrides"],
         f"run.out_dir={tmp_path / 'whole'}", "run.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["test_loss"] == doc["result"]["test_loss"] and summary["steps"] == doc["result"]["steps"] == 3000


def test_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    config, space = _files(tmp_path)
    url = f"mongodb://alice:hunter2@127.0.0.1:{free_port()}/hpo"
    started = time.monotonic()
    process = _start(
        "driver", "--mongo", url, "--exp", "x", "--space", str(space), "--config", str(config), "--max-evals", "1",
        "--timeout", "1", cwd=tmp_path,
    )  # fmt: skip
    rc, out = _finish(process, 30)
    assert rc == 2, out
    assert time.monotonic() - started < 15
    assert "cannot reach MongoDB at mongodb://alice:***@127.0.0.1" in out and "hunter2" not in out
    assert len(out.strip().splitlines()) == 1, out


def test_wrong_credentials_are_a_clear_error(mongo: str, tmp_path: Path) -> None:
    # nx-27017 does not implement SCRAM: a client that authenticates gets a reply it cannot parse. A real MongoDB
    # answers with code 18 (AuthenticationFailed); both are reported as an authentication failure, exit status 2.
    url = mongo.replace("mongodb://", "mongodb://alice:wrong-pw@") + "?authSource=admin"
    process = _start("worker", "--mongo", url, "--timeout", "2", cwd=tmp_path)
    rc, out = _finish(process, 30)
    assert rc == 2, out
    assert "authentication failed" in out and "wrong-pw" not in out and "alice:***@" in out


def test_unknown_space_and_missing_embedded_server(tmp_path: Path) -> None:
    config, _ = _files(tmp_path)
    process = _start(
        "driver", "--exp", "x", "--space", "nonesuch", "--config", str(config), "--max-evals", "1", cwd=tmp_path
    )
    rc, out = _finish(process, 30)
    assert rc == 2 and "unknown search space 'nonesuch'" in out, out
    process = _start(
        "driver", "--exp", "x", "--space", "sgd", "--config", str(config), "--max-evals", "1",
        "--objective", "steps_to_target", cwd=tmp_path,
    )  # fmt: skip
    rc, out = _finish(process, 30)
    assert rc == 2 and "steps_to_target needs run.target_accuracy" in out, out
    process = _start("worker", "--data-dir", str(tmp_path / "nothing"), cwd=tmp_path)
    rc, out = _finish(process, 30)
    assert rc == 2 and "no embedded server" in out, out


def test_embedded_server_shared_through_data_dir(tmp_path: Path) -> None:
    """No --mongo: the driver starts nx-27017 in --data-dir and writes its URL there; the worker reads it."""
    config, space = _files(tmp_path)
    data = tmp_path / "hpo_data"
    driver = _start(
        "driver", "--data-dir", str(data), "--exp", "emb", "--space", str(space), "--config", str(config),
        "--max-evals", "2", "--poll", "0.1", cwd=tmp_path,
    )  # fmt: skip
    _wait_for(lambda: (data / "mongo-url").exists(), what="the embedded server's URL file")
    worker = _start("worker", "--data-dir", str(data), "--idle-timeout", "5", "--poll", "0.05", cwd=tmp_path)
    rc, out = _finish(driver)
    assert rc == 0 and "embedded nx-27017 at mongodb://127.0.0.1:" in out and "2/2 finished" in out, out
    assert not (data / "mongo-url").exists()  # removed when the driver stopped its server
    assert list((data / "db").glob("*.db"))
    _finish(worker)


def test_a_driver_whose_trials_do_not_change_polls_less_until_one_does(
    mongo: str, db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing taken or finished, the pause between rounds doubles up to --idle-poll (a study's 27 idle
    drivers kept its database busy); a trial taken brings the short pause back at once. The rounds are timed where
    each renews the driver's lease, on a real store; taking the lease away ends the driver."""
    import threading

    from hpo_worker.driver import DriverOptions, round_pause, run_driver
    from hpo_worker.spaces import load_space
    from hpo_worker.store import StoreError

    assert [round_pause(0.1, 0.5, n) for n in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert round_pause(0.1, 0.0, 9) == 0.1 and round_pause(2.0, 600.0, 99) == 10.0  # off; a third of the lease
    config, space = _files(tmp_path)
    options = DriverOptions("idle", load_space(str(space)), str(config), max_evals=50, queue_size=2, poll_s=0.05,
                            idle_poll_s=0.8)  # fmt: skip
    store, rounds, taken = connect(mongo), list[float](), threading.Event()
    renew = store.renew_driver_lease

    def timed_renew(*args: Any) -> bool:
        rounds.append(time.monotonic())
        return not taken.is_set() and bool(renew(*args))

    monkeypatch.setattr(store, "renew_driver_lease", timed_renew)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(lambda: run_driver(store, options, log=lambda _: None), errors))
    thread.start()
    _wait_for(lambda: db.jobs.count_documents({"exp_key": "idle"}) == 2, what="the queue filled")
    time.sleep(3.0)
    quiet = [b - a for a, b in zip(rounds[-3:-1], rounds[-2:], strict=True)]
    assert all(0.7 < pause < 1.5 for pause in quiet), quiet  # backed off to --idle-poll, not 0.05 s
    assert len(rounds) < 20, len(rounds)  # 60 rounds at 0.05 s
    connect(mongo).reserve("w", "idle")  # a worker takes a trial: the driver queues another, then polls fast again
    _wait_for(lambda: db.jobs.count_documents({"exp_key": "idle"}) == 3, timeout=5, what="a trial queued again")
    seen = len(rounds)
    time.sleep(0.6)
    assert len(rounds) - seen >= 2, rounds[-6:]  # backed off, the next round would come 0.8 s later
    taken.set()
    thread.join(timeout=10)
    store.close()
    assert len(errors) == 1 and isinstance(errors[0], StoreError), errors


def _catch(run: Callable[[], Any], errors: list[BaseException]) -> None:
    try:
        run()
    except BaseException as exc:  # handed to the test's thread
        errors.append(exc)
