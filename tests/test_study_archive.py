"""study save / restore: a tuned study killed mid-way (real embedded server, real workers), saved as text, restored
into another folder, finishes there without training its finished trials again; and the refusals."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hpo_worker.result_file import trial_dir
from hpo_worker.server import read_url_file
from hpo_worker.store import TrialState, connect
from jobs.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    CheckpointRef,
    atomic_torch_save,
    checkpoint_name,
    choose_checkpoint,
    mark_latest,
    rank_file,
    shared_file,
    verify_checkpoint,
    write_manifest,
)
from study.archive import (
    METRICS_OF_BEST,
    OUT_TOKEN,
    _as_queued,
    _copy_newest_checkpoint,
    _finished_run_folders,
    _path_pattern,
)
from study.tuning import URL_FILE
from tests.processes import ENV, PYTHON, ROOT
from tests.synthetic_configs import synthetic_mlp_toml
from tests.test_study import SPACE

RUN = "steps = 300\neval_every = 0\ntensorboard = false\ncheckpoint_every = 20"
BASE = synthetic_mlp_toml(batch_size=32, train_size=512, test_size=256, lr="0.1", run=RUN)
STUDY = """
[study]
name = "carried"
base_config = "base.toml"
optimizers = ["sgd", "kfac"]
batch_sizes = [32]
target_accuracy = 0.99
max_steps = 300
eval_every_steps = 20
top_k = 2
[tune]
trials = 4
workers = 2
spaces = { sgd = "space.toml", kfac = "space.toml" }
"""


def _files(tmp_path: Path, name: str = "carried") -> Path:
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "study.toml").write_text(STUDY.replace('"carried"', f'"{name}"'))
    return tmp_path / "study.toml"


def _study(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [PYTHON, "-m", "study", *args[:1], "--config", str(config), *args[1:]]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _ready_to_kill(out: Path, finished: int) -> bool:
    """Whether the database holds ``finished`` done trials, a running one whose run has a complete checkpoint, and
    no running one with a summary yet (a summary is written before the worker records the trial done: such a trial
    is running in the database, and would be saved whole, summary and all, so that the test could not tell it from
    a finished one; with 2 workers, the other running trial may be in that moment)."""
    if not (out / URL_FILE).is_file():
        return False
    with contextlib.closing(connect(read_url_file(out / URL_FILE))) as store:
        done = store.trials.count_documents({"state": int(TrialState.DONE)})
        running = [
            trial_dir(out / "trials", doc) / "run" for doc in store.trials.find({"state": int(TrialState.RUNNING)})
        ]
    return (
        done >= finished
        and not any((run / "summary.json").exists() for run in running)
        and any(choose_checkpoint(run).ref is not None for run in running)
    )


def _signal_when(config: Path, out: Path, ready: Callable[[], bool], how: int, what: str) -> int:
    """Starts the study and sends ``how`` to its whole process group (the driver, its workers, its runs) once
    ``ready()``, the study frozen (SIGSTOP) while looked at so that it cannot move on meanwhile (its server runs in a
    session of its own); returns the study's exit status. ``what``: what ``ready`` waits for, for the message."""
    command = [PYTHON, "-m", "study", "scaling", "--config", str(config), "--out", str(out)]
    study = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        assert study.poll() is None, study.stderr.read().decode()[-3000:] if study.stderr else ""
        assert time.monotonic() < deadline, f"no {what} in 300 s"
        os.killpg(study.pid, signal.SIGSTOP)
        if ready():
            break
        os.killpg(study.pid, signal.SIGCONT)
        time.sleep(0.2)
    os.killpg(study.pid, how)  # SIGKILL: no SIGTERM handler runs, the running trials stay running in the database
    os.killpg(study.pid, signal.SIGCONT)  # a stopped process takes SIGTERM once it runs again
    return study.wait(timeout=120)


def _kill_after_finished_trials(config: Path, out: Path, finished: int, how: int = signal.SIGKILL) -> None:
    """The study stopped with ``how`` once the database holds ``finished`` done trials and a running one has a
    checkpoint (the target is out of reach: every trial runs its 300 steps, checkpointing every 20). SIGKILL leaves
    the running trials running in the database; after SIGTERM the workers have put them back in the queue, as a
    study stopped by its user."""
    _signal_when(config, out, lambda: _ready_to_kill(out, finished), how, f"{finished} finished trials")


def _rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(row["cell"], row["trial"]): row for row in csv.DictReader((out / "runs.csv").open())}


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_killed_study_saved_and_restored_elsewhere_finishes_without_training_finished_trials(
    tmp_path: Path, how: int
) -> None:
    """Killed, the running trials are running in the database at the save; stopped (SIGTERM), the workers have
    released them to the queue, and the save still carries the checkpoint each would continue from."""
    config, first, second, saved = _files(tmp_path), tmp_path / "first", tmp_path / "second", tmp_path / "saved"
    _kill_after_finished_trials(config, first, finished=2, how=how)
    save = _study(config, "save", "--out", str(first), "--to", str(saved))
    assert save.returncode == 0, save.stderr[-3000:]
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["study"] == "carried" and manifest["experiments"] == 2
    done = manifest["trials"]["done"]
    assert done >= 2 and manifest["trials"]["running"] == 0  # the running ones were saved as queued
    assert (manifest["requeued"] > 0) == (how == signal.SIGKILL), manifest  # after SIGTERM, none was running
    saved_checkpoints = (
        f"{manifest['requeued']} running saved as queued; the newest complete checkpoint of "
        f"{len(manifest['checkpoints'])} begun trial(s)"
    )
    assert saved_checkpoints in save.stdout, save.stdout
    assert manifest["checkpoints"] and all(step % 20 == 0 for step in manifest["checkpoints"].values()), manifest
    database, files = (saved / "database.jsonl").read_text(), (saved / "files.jsonl").read_text()
    assert str(first) not in database and str(first) not in files and OUT_TOKEN in database and OUT_TOKEN in files
    paths = {json.loads(line)["path"] for line in files.splitlines()}

    def trial_folder(path: str) -> str:  # trials/<experiment>/trial<tid>.<version>
        return "/".join(path.split("/")[:3])

    begun = set(manifest["checkpoints"])  # a stopped run writes its summary too: how it ended
    folders = {trial_folder(path) for path in paths if path.endswith("/run/summary.json")} - begun
    assert len(folders) == done and not any("/checkpoints/" in path for path in paths)
    finished = {path for path in paths if trial_folder(path) in folders}
    assert not any("/ranks/" in path or path.endswith("metrics.csv") for path in finished)
    for attempt in manifest["checkpoints"]:  # a running trial's files, whole: its run appends to them
        assert {f"{attempt}/run/metrics.jsonl", f"{attempt}/run/metrics.csv", f"{attempt}/attempt.json"} <= paths

    restore = _study(config, "restore", "--out", str(second), "--from", str(saved))
    assert restore.returncode == 0, restore.stderr[-3000:]
    restored = {path: (second / path).read_text() for path in finished}
    again = _study(config, "restore", "--out", str(second), "--from", str(saved))
    assert again.returncode == 2 and "already holds 2 of the saved experiments" in again.stderr, again.stderr

    finish = _study(config, "scaling", "--out", str(second))
    assert finish.returncode == 0, finish.stderr[-3000:]
    rows = _rows(second)
    trials = [
        t for cell in ("sgd-b32", "kfac-b32") for t in json.loads((second / "trials" / f"{cell}.json").read_text())
    ]
    assert len(trials) == 2 * 4 and len(rows) == sum(t["result"].get("status") == "ok" for t in trials)
    for path, text in restored.items():  # finished before the kill: read, not trained again (no second attempt)
        assert (second / path).read_text() == text, path
        trial_dir = second / trial_folder(path)
        assert [p.name for p in trial_dir.parent.glob(trial_dir.name.split(".")[0] + ".*")] == [trial_dir.name]
    # A trial running at the save continued from its saved checkpoint, in a new attempt folder.
    cells = [second / "trials" / f"{cell}.json" for cell in ("sgd-b32", "kfac-b32")]
    by_tid = {(f"carried-{path.stem}", t["tid"]): t for path in cells for t in json.loads(path.read_text())}
    for attempt, step in manifest["checkpoints"].items():
        _, exp_key, folder = attempt.split("/")
        resumed = by_tid[exp_key, int(folder.removeprefix("trial").split(".")[0])]
        assert resumed["result"].get("resumed_from") == step and resumed["result"]["steps"] == 300, resumed
    assert all(str(second) in row["metrics_path"] for row in rows.values() if row["metrics_path"])


def _stop_during_a_repeat(config: Path, out: Path) -> None:
    """The study stopped (SIGTERM) once a repeat of a best trial has a checkpoint and no summary."""

    def repeat_begun() -> bool:
        runs = out.glob("repeats/*/seed1001")
        return any(choose_checkpoint(run).ref and not (run / "summary.json").exists() for run in runs)

    assert _signal_when(config, out, repeat_begun, signal.SIGTERM, "repeat with a checkpoint") == 130


def test_a_repeat_stopped_with_the_study_is_saved_with_its_checkpoint_and_continues_after_a_restore(
    tmp_path: Path,
) -> None:
    """The repeats phase: a repeat of a best trial that had begun is saved whole with its newest checkpoint, and the
    restored study continues it from there; the repeats that had ended are read back, not trained again."""
    config, first, second, saved = _files(tmp_path, "repeated"), tmp_path / "first", tmp_path / "second", tmp_path / "s"
    config.write_text(config.read_text().replace("trials = 4", "trials = 2\nrepeats = 1"))
    _stop_during_a_repeat(config, first)
    save = _study(config, "save", "--out", str(first), "--to", str(saved))
    assert save.returncode == 0, save.stderr[-3000:]
    manifest = json.loads((saved / "manifest.json").read_text())
    begun = manifest["run_checkpoints"]
    assert begun and all(key.startswith("repeats/") and step % 20 == 0 for key, step in begun.items()), manifest
    assert f"and of {len(begun)} unfinished run(s) outside the search" in save.stdout, save.stdout
    paths = {json.loads(line)["path"] for line in (saved / "files.jsonl").read_text().splitlines()}
    for key in begun:
        assert {f"{key}/config.json", f"{key}/metrics.jsonl"} <= paths and f"{key}/summary.json" not in paths
    ended = {p.rsplit("/", 1)[0] for p in paths if p.startswith("repeats/") and p.endswith("/summary.json")}
    restore = _study(config, "restore", "--out", str(second), "--from", str(saved))
    assert restore.returncode == 0 and f"and {len(begun)} unfinished runs" in restore.stderr, restore.stderr
    finish = _study(config, "scaling", "--out", str(second))
    assert finish.returncode == 0, finish.stderr[-3000:]
    for key, step in begun.items():
        summary = json.loads((second / key / "summary.json").read_text())
        assert summary["resumed_from"] == step and summary["steps"] == 300, summary
    for key in ended:
        assert f"{second / key / 'summary.json'}" in finish.stderr, "an ended repeat is read back"
    rows = list(csv.DictReader((second / "runs.csv").open()))
    assert sorted(row["cell"] for row in rows if row["source"] == "repeat") == ["kfac/b32", "sgd/b32"]


def test_restore_refuses_another_studys_save_a_damaged_one_and_changed_files(tmp_path: Path) -> None:
    config = _files(tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    missing = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert missing.returncode == 2 and "is not a complete save of a study" in missing.stderr
    (saved / "manifest.json").write_text(json.dumps({"format": 1, "study": "other", "saved": "then"}))
    (saved / "database.jsonl").write_text("")
    (saved / "files.jsonl").write_text(json.dumps({"path": "trials/x/trial0.1/run/summary.json", "text": "{}"}) + "\n")
    other = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert other.returncode == 2 and "holds study 'other', not 'carried'" in other.stderr
    (saved / "manifest.json").write_text(json.dumps({"format": 1, "study": "carried", "saved": "then"}))
    clash = tmp_path / "out" / "trials" / "x" / "trial0.1" / "run" / "summary.json"
    clash.parent.mkdir(parents=True)
    clash.write_text('{"mine": 1}')
    refused = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert refused.returncode == 2 and "exist with other contents" in refused.stderr, refused.stderr
    assert clash.read_text() == '{"mine": 1}'
    (saved / "files.jsonl").write_text("{not json\n")
    damaged = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert damaged.returncode == 2 and "line 1 of files.jsonl is damaged" in damaged.stderr, damaged.stderr
    (saved / "files.jsonl").write_text("")
    (saved / "checkpoints.tar").write_bytes(b"not a tar")
    damaged = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert damaged.returncode == 2 and "checkpoints.tar is damaged" in damaged.stderr, damaged.stderr
    (saved / "checkpoints.tar").unlink()
    (saved / "database.jsonl").write_text('{"collection": "elsewhere", "doc": {}}\n')
    damaged = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert damaged.returncode == 2 and "line 1 of database.jsonl is damaged" in damaged.stderr, damaged.stderr
    (saved / "database.jsonl").write_text("")
    (saved / "files.jsonl").write_text(json.dumps({"path": "../escape.json", "text": "{}"}) + "\n")
    escape = _study(config, "restore", "--out", str(tmp_path / "out"), "--from", str(saved))
    assert escape.returncode == 2 and "leaves the output folder" in escape.stderr
    assert not (tmp_path / "escape.json").exists()


def test_saved_paths_and_running_trials() -> None:
    pattern = _path_pattern("/a/out")
    assert pattern.sub(OUT_TOKEN, '"/a/out/trials/x", /a/out-v1/y, /a/outer, /a/out') == (
        f'"{OUT_TOKEN}/trials/x", /a/out-v1/y, /a/outer, {OUT_TOKEN}'
    )
    queued = _as_queued({"state": 1, "owner": "host:12", "version": 3, "attempts": 2, "book_time": 1, "tid": 7})
    assert queued == {"state": 0, "owner": None, "version": 4, "attempts": 1, "book_time": None, "refresh_time": None,
                      "tid": 7}  # fmt: skip


@pytest.mark.parametrize("command", ["save", "restore"])
def test_save_and_restore_need_a_tuned_study(tmp_path: Path, command: str) -> None:
    config = tmp_path / "given.toml"
    given = '[given.sgd]\n"optim.lr" = 0.1\n[given.kfac]\n"optim.lr" = 0.1\n'
    config.write_text(STUDY.split("[tune]")[0] + given)
    (tmp_path / "base.toml").write_text(BASE)
    result = _study(config, command, "--to" if command == "save" else "--from", str(tmp_path / "saved"))
    assert result.returncode == 2 and "only a tuned study has a database to save" in result.stderr, result.stderr


def test_metrics_are_saved_for_each_experiments_best_trials_and_the_repeats_only(tmp_path: Path) -> None:
    def doc(exp: str, tid: int, loss: float | None, accuracy: float, status: str = "ok") -> dict[str, object]:
        folder = tmp_path / "trials" / exp / f"trial{tid}.1"
        folder.mkdir(parents=True)
        return {"exp_key": exp, "tid": tid, "state": 2, "result": {"status": status, "loss": loss,
                "test_accuracy": accuracy, "out_dir": str(folder)}}  # fmt: skip

    losses = [0.5, 0.1, 0.9, 0.3, 0.5, 0.4, 0.2, 0.8]  # tids 0 and 4 tie for 5th place: 4 has the higher accuracy
    trials = [doc("a", tid, loss, 0.5 + tid / 100) for tid, loss in enumerate(losses)]
    trials += [doc("a", 8, None, 0.1, status="fail"), doc("b", 0, 0.99, 0.2)]
    (tmp_path / "repeats" / "a-b32" / "seed1001").mkdir(parents=True)
    (tmp_path / "repeats" / "a-b32" / "seed1001" / "summary.json").write_text("{}")
    kept = {
        path.relative_to(tmp_path).as_posix(): metrics
        for path, metrics in _finished_run_folders(trials, tmp_path).items()
    }
    with_metrics = sorted(path for path, metrics in kept.items() if metrics)
    assert METRICS_OF_BEST == 5 and with_metrics == sorted(
        ["trials/a/trial1.1", "trials/a/trial6.1", "trials/a/trial3.1", "trials/a/trial5.1", "trials/a/trial4.1",
         "trials/b/trial0.1", "repeats/a-b32/seed1001"]
    )  # fmt: skip
    assert len(kept) == 11 and kept["trials/a/trial8.1"] is False  # the diverged run: its small files only


def test_the_saved_checkpoint_is_the_newest_valid_one_not_one_whose_writing_was_interrupted(tmp_path: Path) -> None:
    folder = tmp_path / "run" / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    for step in (20, 40):
        name = checkpoint_name(step)
        digests = {f.name: atomic_torch_save({"step": step}, f) for f in (shared_file(folder, name),
                   rank_file(folder, name, 0))}  # fmt: skip
        write_manifest(folder, name, digests)
        mark_latest(folder, name)
    atomic_torch_save({"step": 60}, shared_file(folder, checkpoint_name(60)))  # killed before its manifest
    shared_file(folder, checkpoint_name(40)).write_bytes(b"damaged")  # and the one before it is corrupt
    assert _copy_newest_checkpoint(tmp_path / "run", tmp_path / "staging") == 20
    copied = tmp_path / "staging" / CHECKPOINT_DIR
    assert sorted(p.name for p in copied.iterdir()) == [
        "ckpt-step00000020.manifest.json", "ckpt-step00000020.pt", "ckpt-step00000020.rank0.pt", LATEST
    ]  # fmt: skip
    assert verify_checkpoint(CheckpointRef(copied, checkpoint_name(20))) is None
    shared_file(folder, checkpoint_name(20)).unlink()  # none valid left: nothing is saved, not a broken copy
    assert _copy_newest_checkpoint(tmp_path / "run", tmp_path / "staging2") is None
    assert not (tmp_path / "staging2" / CHECKPOINT_DIR).exists()
