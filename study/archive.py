"""A tuned study's progress as a folder of text files, to carry it past a purge of scratch space, to another machine,
or into version control: ``python -m study save --config C --to DIR``, then ``python -m study restore --config C
--from DIR`` into an empty output folder, then ``python -m study scaling --config C`` continues.

DIR holds:

- ``manifest.json``: the study, when it was saved, the output folder it came from, and counts;
- ``database.jsonl``: the study's MongoDB documents (its experiments, their tid counters, their trials), one per
  line as MongoDB extended JSON, sorted;
- ``files.jsonl``: the text files of every finished run (config.json, summary.json, attempt.json, the kept result,
  ...), one per line, sorted by path. Not saved: checkpoints; ``ranks/`` (each rank's first batch); metrics.csv,
  which repeats metrics.jsonl; and metrics.jsonl itself except for each cell's 5 best trials and the runs outside
  the search (repeats, given values). It holds a record per step, megabytes for a long run, and the report reads
  only the best runs' (each trial's evaluations are also in its database document, as its learning curve). Also
  every text file of the trials that were running, and of the attempt that each queued trial which had begun
  would continue from (a trial released when its worker stopped: a study stopped before its save), and of the runs
  outside the search that had begun and not ended (a repeat stopped with the study);
- ``checkpoints.tar``: the newest checkpoint of each of those trials and runs (binary: about a megabyte each), listed
  in the manifest by attempt folder (``checkpoints``) and by run folder (``run_checkpoints``).

A trial that was running is saved as queued, as :meth:`TrialStore.release` leaves a trial whose worker was stopped.
Restored, it continues from its saved checkpoint (:mod:`hpo_worker.attempts` finds its earlier attempt's folder),
or from step 0 when it had none. Paths inside the output folder are written as ``${out}/...`` and restored under
the new output folder. The text is sorted so that version control stores a later save of the same study as a small
delta of the earlier one. Saving reads the database of the running study, or starts the study's embedded server
when the study is stopped; restoring refuses to overwrite anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bson import json_util

from hpo_worker.attempts import RUN_DIR, interrupted_attempt
from hpo_worker.result_file import trial_dir
from hpo_worker.server import read_url_file
from hpo_worker.store import COUNTERS, EXPERIMENTS, TRIALS, TrialState, TrialStore
from jobs.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    CheckpointRef,
    choose_checkpoint,
    manifest_file,
    verify_checkpoint,
)
from jobs.files import atomic_write_bytes, atomic_write_text
from study.config import StudyConfig, StudyError
from study.runner import stderr_log
from study.tuning import URL_FILE, connect_store, experiment_name, study_mongo_url

__all__ = ["restore_study", "save_study"]

Log = Callable[[str], None]

FORMAT = 1
OUT_TOKEN = "${out}"
MANIFEST, DATABASE, FILES, CHECKPOINTS = "manifest.json", "database.jsonl", "files.jsonl", "checkpoints.tar"
TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".toml", ".txt", ".sh", ".log", ".csv"})
SKIPPED_FOLDERS = frozenset({"checkpoints", "ranks"})
METRICS_OF_BEST = 5  # per experiment: the trials whose metrics.jsonl is saved (_finished_run_folders)
RUN_FOLDERS = ("repeats", "runs")  # the given values' and the best trials' repeats' runs, beside trials/


def _replace_paths(value: Any, pattern: re.Pattern[str], new: str) -> Any:
    """``value`` with every match of ``pattern`` in its strings (keys included) replaced by ``new``."""
    if isinstance(value, str):
        return pattern.sub(lambda _: new, value)
    if isinstance(value, Mapping):
        return {_replace_paths(k, pattern, new): _replace_paths(v, pattern, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(item, pattern, new) for item in value]
    return value


def _path_pattern(prefix: str) -> re.Pattern[str]:
    """``prefix`` as a whole path or the start of one: not ``/a/out-v1`` for ``/a/out``."""
    return re.compile(re.escape(prefix) + r"(?=[/\"']|$)")


# ---------------------------------------------------------------------------------------------------------- saving


def _as_queued(doc: dict[str, Any]) -> dict[str, Any]:
    """A running trial as :meth:`TrialStore.release` leaves it: queued, and its attempt not counted."""
    return {**doc, "state": int(TrialState.NEW), "owner": None, "book_time": None, "refresh_time": None,
            "version": int(doc.get("version", 0)) + 1, "attempts": max(0, int(doc.get("attempts", 1)) - 1)}  # fmt: skip


def _database_lines(
    store: TrialStore, exp_keys: Sequence[str]
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """The lines of database.jsonl, the trial documents as saved, and those that were running (saved as queued) as
    they were."""
    documents = store.experiment_documents(exp_keys)
    for doc in documents[EXPERIMENTS]:
        doc.update(lease_holder=None, lease_expires=None)  # the driver that held it is not carried over
    running = [doc for doc in documents[TRIALS] if doc["state"] == TrialState.RUNNING]
    documents[TRIALS] = [_as_queued(doc) if doc["state"] == TrialState.RUNNING else doc for doc in documents[TRIALS]]
    lines = [
        json_util.dumps({"collection": name, "doc": doc}, sort_keys=True, json_options=json_util.RELAXED_JSON_OPTIONS)
        for name, docs in documents.items()
        for doc in docs
    ]
    return lines, documents[TRIALS], running


def _ranked(docs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Trials that finished with a result, best first: the search's loss, ties broken by the higher test accuracy
    (as :func:`study.report.best_runs` ranks a cell's runs)."""
    ok = [doc for doc in docs if doc["state"] == TrialState.DONE and doc["result"].get("status") == "ok"]

    def rank(doc: Mapping[str, Any]) -> tuple[float, float]:
        loss, accuracy = doc["result"].get("loss"), doc["result"].get("test_accuracy")
        return (math.inf if loss is None else float(loss), -float(accuracy or 0.0))

    return sorted(ok, key=rank)


def _finished_run_folders(trials: Sequence[Mapping[str, Any]], out: Path) -> dict[Path, bool]:
    """The folders of the trials that finished, and of the study's given and repeated runs; for each, whether its
    metrics.jsonl is saved: for runs outside the search, and for each experiment's METRICS_OF_BEST best trials
    (the report reads the metrics of each cell's best run only; a step record per step makes a long run's file
    megabytes)."""
    folders: dict[Path, bool] = {}
    for exp_key in sorted({doc["exp_key"] for doc in trials}):
        mine = [doc for doc in trials if doc["exp_key"] == exp_key]
        best = {id(doc) for doc in _ranked(mine)[:METRICS_OF_BEST]}
        for doc in mine:
            if doc["state"] == TrialState.DONE and doc["result"].get("out_dir"):
                folders[Path(doc["result"]["out_dir"])] = id(doc) in best
    for name in RUN_FOLDERS:
        folders.update({summary.parent: True for summary in (out / name).glob("**/summary.json")})
    for folder in _unfinished_runs(out):  # saved whole, with their checkpoints (save_study)
        folders.pop(folder, None)
    return {folder: metrics for folder, metrics in sorted(folders.items()) if folder.is_dir()}


def _unfinished_runs(out: Path) -> list[Path]:
    """The run folders outside the search (:data:`RUN_FOLDERS`: repeats, given values) that have begun and not ended
    (neither finished nor diverged): stopped with the study, they continue from their newest checkpoint."""
    from jobs.outcome import RunEnd, read_summary

    begun = {config.parent for name in RUN_FOLDERS for config in (out / name).glob("**/config.json")}
    ended = (RunEnd.FINISHED, RunEnd.DIVERGED)
    return sorted(folder for folder in begun if (read_summary(folder) or {}).get("end") not in ended)


def _text_files(folder: Path, metrics: bool, whole: bool = False) -> Iterator[Path]:
    """The text files in ``folder`` and below it: not the checkpoints (binary, and their manifests without them),
    nor ``ranks/`` (each rank's first batch, to check sharding: tens of kilobytes at large batches), nor metrics.csv
    (metrics.jsonl's records again, for spreadsheets), nor metrics.jsonl unless ``metrics``; ``whole``: all but the
    checkpoints (a run that will resume appends to its files)."""
    skipped = set() if whole else {"metrics.csv"} if metrics else {"metrics.csv", "metrics.jsonl"}
    skipped_folders = {CHECKPOINT_DIR} if whole else SKIPPED_FOLDERS
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if (
            path.is_file()
            and path.suffix in TEXT_SUFFIXES
            and not skipped_folders & set(parts)
            and path.name not in skipped
        ):
            yield path


def _interrupted_attempts(
    trials: Sequence[Mapping[str, Any]], running: Sequence[Mapping[str, Any]], out: Path
) -> list[Path]:
    """The attempt folders that the queued trials which had begun (released when their worker stopped, as in a
    stopped study) would continue from: saved as a running trial's, so that a restore loses none of their steps."""
    was_running = {(doc["exp_key"], doc["tid"]) for doc in running}
    queued = [d for d in trials if d["state"] == TrialState.NEW and (d["exp_key"], d["tid"]) not in was_running]
    found = (interrupted_attempt(out / "trials" / str(doc["exp_key"]), doc) for doc in queued)
    return [folder for folder in found if folder is not None]


def _file_lines(folders: Mapping[Path, bool], running: Sequence[Path], out: Path) -> list[str]:
    """The lines of files.jsonl: the finished runs' files (and their metrics where ``folders`` says so), and all
    the text files of the attempts of the trials that were ``running``."""
    pattern, lines = _path_pattern(str(out)), []
    found = [path for folder, metrics in folders.items() for path in _text_files(folder, metrics)]
    found += [path for folder in running for path in _text_files(folder, True, whole=True)]
    for path in found:
        with contextlib.suppress(FileNotFoundError):  # a running trial's file may go meanwhile
            text = pattern.sub(lambda _: OUT_TOKEN, path.read_text())
            lines.append(json.dumps({"path": path.relative_to(out).as_posix(), "text": text}, sort_keys=True))
    return sorted(lines)


def _copy_newest_checkpoint(run_dir: Path, staging: Path) -> int | None:
    """Copies the checkpoint that a resume of ``run_dir`` would choose (the newest valid one: not one whose writing
    was interrupted by a kill, nor one being written now) into ``staging/checkpoints`` and returns its step, or None
    when there is none. The copy is verified against the checkpoint's manifest: the run may write a newer one and
    prune this one meanwhile, and then the newer one is copied instead."""
    target = staging / CHECKPOINT_DIR
    for _ in range(3):
        shutil.rmtree(target, ignore_errors=True)
        choice = choose_checkpoint(run_dir)
        if choice.ref is None or not choice.verified:  # none, or one from before manifests: nothing to verify
            return None
        ref = choice.ref
        target.mkdir(parents=True)
        try:
            listed = json.loads(manifest_file(ref.folder, ref.name).read_text())["files"]
            for name in [manifest_file(ref.folder, ref.name).name, *(Path(file).name for file in listed)]:
                shutil.copy2(ref.folder / name, target / name)
        except (OSError, ValueError, KeyError):
            continue
        (target / LATEST).write_text(ref.name + "\n")
        if verify_checkpoint(CheckpointRef(target, ref.name)) is None:
            return ref.step
    shutil.rmtree(target, ignore_errors=True)
    return None


def _write_checkpoints(run_dirs: Mapping[str, Path], out: Path, dest: Path) -> dict[str, int]:
    """``dest/checkpoints.tar``: the newest checkpoint of each run folder in ``run_dirs``, by its path relative to
    ``out``; returns the step of each, by its key in ``run_dirs``."""
    steps = {}
    with tempfile.TemporaryDirectory() as staging, tarfile.open(dest / f"{CHECKPOINTS}.tmp", "w") as tar:
        for key, run_dir in run_dirs.items():
            relative = run_dir.relative_to(out)
            step = _copy_newest_checkpoint(run_dir, Path(staging) / relative)
            if step is not None:
                tar.add(Path(staging) / relative / CHECKPOINT_DIR, arcname=(relative / CHECKPOINT_DIR).as_posix())
                steps[key] = step
    (dest / f"{CHECKPOINTS}.tmp").replace(dest / CHECKPOINTS)
    return steps


@contextlib.contextmanager
def _study_store(study: StudyConfig, out: Path, log: Log, *, running_ok: bool) -> Iterator[TrialStore]:
    """The study's store: tune.mongo, or its embedded server started now; with ``running_ok``, that of the study
    running now when it holds the embedded server (it writes the URL to ``<out>/mongo-url`` while it runs)."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(study_mongo_url(study, out, log))
        except StudyError:
            if not (running_ok and (out / URL_FILE).is_file()):
                raise
            url = read_url_file(out / URL_FILE)
        yield stack.enter_context(contextlib.closing(connect_store(url)))


def save_study(study: StudyConfig, dest: Path, log: Log = stderr_log) -> dict[str, Any]:
    """Writes the study's database, finished runs, and the newest checkpoints of its running trials and of the runs
    outside the search that have begun and not ended, to ``dest`` (see the module); returns the manifest."""
    out = study.out_dir.resolve()
    exp_keys = [experiment_name(study, cell) for cell in study.cells()]
    with _study_store(study, out, log, running_ok=True) as store:
        stored, trials, running = _database_lines(store, exp_keys)
    attempts = [trial_dir(out / "trials", doc) for doc in running]  # the layout of the study's workers (--workdir)
    attempts += _interrupted_attempts(trials, running, out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)  # an earlier save's: until the new one is written, the save is incomplete
    unfinished = _unfinished_runs(out)
    keys = {attempt.relative_to(out).as_posix(): attempt / RUN_DIR for attempt in attempts}
    steps = _write_checkpoints(keys | {run.relative_to(out).as_posix(): run for run in unfinished}, out, dest)
    pattern = _path_pattern(str(out))
    database = [pattern.sub(lambda _: OUT_TOKEN, line) for line in stored]
    whole = [a for a in attempts if a.is_dir()] + unfinished  # a run that will continue appends to its files
    files = _file_lines(_finished_run_folders(trials, out), whole, out)
    states = {state.name.lower(): sum(doc["state"] == state for doc in trials) for state in TrialState}
    manifest = {
        "format": FORMAT, "study": study.name, "saved": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "out_dir": str(out), "experiments": len(exp_keys), "trials": states, "requeued": len(running),
        "checkpoints": {key: step for key, step in steps.items() if key in keys},
        "run_checkpoints": {key: step for key, step in steps.items() if key not in keys}, "files": len(files),
    }  # fmt: skip
    atomic_write_text(dest / DATABASE, "".join(line + "\n" for line in sorted(database)))
    atomic_write_text(dest / FILES, "".join(line + "\n" for line in files))
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: a complete save has one
    return manifest


# ------------------------------------------------------------------------------------------------------- restoring


def _read_saved(src: Path, study: StudyConfig) -> tuple[dict[str, Any], list[str], list[str]]:
    """The manifest and the lines of a save of ``study``; a StudyError naming what is wrong."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
        database = (src / DATABASE).read_text().splitlines()
        files = (src / FILES).read_text().splitlines()
    except (OSError, ValueError) as exc:
        raise StudyError(f"{src} is not a complete save of a study (python -m study save): {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise StudyError(f"{src / MANIFEST}: format {manifest.get('format')!r}, this version reads {FORMAT}")
    if manifest.get("study") != study.name:
        raise StudyError(
            f"{src} holds study {manifest.get('study')!r}, not {study.name!r}: restore it with its own study file"
        )
    return manifest, database, files


def _restored_files(lines: Sequence[str], out: Path) -> dict[Path, str]:
    """The files to write, by path; a StudyError when one exists with other contents (nothing is overwritten)."""
    files, clashes = {}, []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            path, text = out / record["path"], record["text"].replace(OUT_TOKEN, str(out))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StudyError(f"line {number} of {FILES} is damaged ({type(exc).__name__}: {exc})") from exc
        if ".." in Path(record["path"]).parts or Path(record["path"]).is_absolute():
            raise StudyError(f"a saved file's path {record['path']!r} leaves the output folder: the save is damaged")
        if path.exists() and path.read_text() != text:
            clashes.append(str(path))
        files[path] = text
    if clashes:
        raise StudyError(
            f"{len(clashes)} file(s) of the save exist with other contents, e.g. {clashes[0]}: restore into an empty "
            "output folder (--out DIR)"
        )
    return files


def _saved_checkpoints(src: Path, out: Path) -> dict[Path, bytes]:
    """The files of ``src/checkpoints.tar`` by their path under ``out`` (none for a save without one); a StudyError
    for a member outside the output folder, or one that exists with other contents."""
    if not (src / CHECKPOINTS).is_file():
        return {}
    try:
        with tarfile.open(src / CHECKPOINTS) as tar:
            return _checkpoint_members(tar, src, out)
    except tarfile.TarError as exc:
        raise StudyError(f"{src / CHECKPOINTS} is damaged: {exc}") from exc


def _checkpoint_members(tar: tarfile.TarFile, src: Path, out: Path) -> dict[Path, bytes]:
    files = {}
    for member in tar.getmembers():
        if member.isdir():
            continue
        name = Path(member.name)
        handle = tar.extractfile(member) if member.isfile() else None
        if handle is None or name.is_absolute() or ".." in name.parts:
            raise StudyError(f"{src / CHECKPOINTS}: {member.name!r} is not a file inside the output folder")
        files[out / name] = handle.read()
        if (out / name).exists() and (out / name).read_bytes() != files[out / name]:
            raise StudyError(f"{out / name} exists with other contents: restore into an empty output folder")
    return files


def _saved_documents(store: TrialStore, lines: Sequence[str], out: Path) -> dict[str, list[dict[str, Any]]]:
    """The saved documents by collection, their paths under ``out``; a StudyError when the store holds any of the
    experiments already."""
    pattern = re.compile(re.escape(OUT_TOKEN))
    by_collection: dict[str, list[dict[str, Any]]] = {name: [] for name in (EXPERIMENTS, COUNTERS, TRIALS)}
    for number, line in enumerate(lines, 1):
        try:
            record = json_util.loads(line)
            by_collection[record["collection"]].append(_replace_paths(record["doc"], pattern, str(out)))
        except (ValueError, KeyError, TypeError) as exc:
            raise StudyError(f"line {number} of {DATABASE} is damaged ({type(exc).__name__}: {exc})") from exc
    present = [doc["_id"] for doc in by_collection[EXPERIMENTS] if store.get_experiment(doc["_id"])]
    if present:
        raise StudyError(
            f"the database already holds {len(present)} of the saved experiments ({present[0]}, ...): restore into "
            "a new output folder (--out DIR) or a database without them"
        )
    return by_collection


def restore_study(study: StudyConfig, src: Path, log: Log = stderr_log) -> dict[str, int]:
    """Restores a save of ``study`` (:func:`save_study`) into its output folder and database; returns the counts
    of documents restored per collection. The study must not be running (its embedded server would be in use).
    Nothing is written unless all of it can be: the files first, then the documents (a trial in the database always
    has its folder)."""
    out = study.out_dir.resolve()
    manifest, database, lines = _read_saved(src, study)
    files = _restored_files(lines, out)
    checkpoints = _saved_checkpoints(src, out)
    with _study_store(study, out, log, running_ok=False) as store:
        documents = _saved_documents(store, database, out)
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        for path, payload in checkpoints.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, payload)
        store.insert_documents(documents)
    log(f"restored {sum(map(len, documents.values()))} documents, {len(files)} files and the checkpoints of "
        f"{len(manifest.get('checkpoints', {}))} running trials and {len(manifest.get('run_checkpoints', {}))} "
        f"unfinished runs outside the search saved {manifest['saved']} into {out}")  # fmt: skip
    return {name: len(docs) for name, docs in documents.items()}
