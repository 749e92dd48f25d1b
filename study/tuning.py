"""Tuning a study's cells with hpo_worker: one experiment per cell, driven and run by hpo_worker processes.

The study calls hpo_worker's modules for everything it reads or decides: the embedded server
(:class:`hpo_worker.server.EmbeddedServer`), whether a cell's experiment exists with other settings
(:meth:`TrialStore.check_experiment`, before any process starts), progress (:meth:`TrialStore.trial_states`) and the
trials of each cell (:meth:`TrialStore.trial_docs` and :mod:`hpo_worker.report`). Only TPE and the trials run in
their own processes: one ``python -m hpo_worker driver`` per cell, all at once, and ``tune.workers`` local
``worker`` processes that take trials of any cell (``tune.workers = 0``: workers started elsewhere, on the same URL).

The drivers and workers read the URL from ``<out>/mongo-url``, a file only the user can read (``--mongo-file``): a
password on their command lines would show in ``ps`` to every user of the machine. Each process's log gets a header
line when it starts, and the study's messages quote only the current run's part of a log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pymongo.errors

from hpo_worker.driver import DriverOptions, check_experiment
from hpo_worker.liveness import BeatClock
from hpo_worker.report import format_report, summarize, trials_json, write_trials_json
from hpo_worker.server import EmbeddedServer, ServerError, read_url_file, terminate
from hpo_worker.spaces import load_space
from hpo_worker.status import StateReader
from hpo_worker.store import (
    ENV_PATIENCE,
    EXIT_STORE_UNREACHABLE,
    FINISHED_STATES,
    ExperimentMismatch,
    StoreError,
    StoreUnreachable,
    TrialState,
    TrialStore,
    connect,
    mask_url,
    server_address,
    state_counts,
)
from hpo_worker.warm_start import WarmStartError, load_points, point_of, points_toml
from jobs.files import atomic_file, atomic_write_text
from study.config import Cell, StudyConfig, StudyError, TuneSettings
from study.replays import STOP_GRACE_S, log_tail, shared_threads_env, start_logged

__all__ = [
    "connect_store",
    "experiment_name",
    "finished_trials_now",
    "live_url",
    "progress",
    "study_mongo_url",
    "tune_cells",
]

Log = Callable[[str], None]
PROGRESS_EVERY_S = 15.0
PROGRESS_PATIENCE_S = 1.0  # how long a progress line waits for an unreachable database
# One driver per cell: 27 drivers polling every 0.5 s (the driver's default) took a third of a 2-core machine,
# with the database. Workers never wait for a driver (each cell keeps tune.queue_size trials queued), so 2 s costs
# no training time.
DRIVER_POLL_S = 2.0
# ... and a driver whose trials did not change waits longer, up to this (hpo_worker.driver.round_pause): the 27 of
# the CIFAR-10 study then took 1.2% of a core, not 1.8% (the database server's 9% was the progress line's, below).
DRIVER_IDLE_POLL_S = 10.0
SILENT_AFTER_S = 2 * PROGRESS_EVERY_S  # a trial whose heartbeat (every 5 s) has not moved this long is named silent
CHANGED_SETTINGS = (
    "this study's settings changed since its experiments were made: restore them to continue, or start a new study "
    "(another [study] name or --out folder)"
)


def experiment_name(study: StudyConfig, cell: Cell) -> str:
    return f"{study.name}-{cell.slug}"


def _tune(study: StudyConfig) -> TuneSettings:
    if study.tune is None:
        raise StudyError(f"{study.path} has no [tune] table: nothing to tune")
    return study.tune


def tune_cells(study: StudyConfig, cells: Sequence[Cell], out: Path, log: Log) -> dict[str, list[dict[str, Any]]]:
    """Tunes every cell (continuing experiments stored before) and returns the trials of each, by cell slug, as
    ``hpo_worker.report.trials_json`` records; each cell's are also written to ``trials/<cell>.json``."""
    with (
        _database_lost_is_a_study_error(),
        study_mongo_url(study, out, log) as url,
        contextlib.closing(connect_store(url)) as store,
    ):
        options = {cell.slug: _driver_options(study, cell, out) for cell in cells}
        _check_experiments(store, cells, options)
        with _private_url_file(url, out / URL_FILE) as url_file:
            _drive(study, cells, options, url, url_file, out, store, log)
        return {cell.slug: _cell_trials(store, study, cell, out) for cell in cells}


@contextlib.contextmanager
def study_mongo_url(study: StudyConfig, out: Path, log: Log) -> Iterator[str]:
    """tune.mongo, or the URL of an embedded server in ``<out>/hpo_data``: this process's, stopped at exit or when
    this process is killed; one left running by a killed study is stopped first (and ``log`` says so)."""
    if _tune(study).mongo:
        yield _tune(study).mongo
        return
    try:
        server = EmbeddedServer(out / "hpo_data", log=log)
        server.start()
    except ServerError as exc:
        raise StudyError(f"the embedded MongoDB server did not start: {exc}") from exc
    try:
        yield server.url
    finally:
        server.stop()


URL_FILE = "mongo-url"


@contextlib.contextmanager
def _private_url_file(url: str, path: Path) -> Iterator[Path]:
    """``url`` in ``path``, readable and writable by the user only, for the drivers' and workers' ``--mongo-file``;
    removed at exit (a killed study leaves it, still private, and the next run replaces it)."""
    with atomic_file(path, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # before the URL is written: never readable by others, not even briefly
        handle.write(url + "\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def connect_store(url: str) -> TrialStore:
    """The store at ``url``; a StudyError (the password masked) when it cannot be used."""
    try:
        return connect(url)
    except StoreError as exc:
        raise StudyError(mask_url(str(exc))) from exc


def _driver_options(study: StudyConfig, cell: Cell, out: Path) -> DriverOptions:
    """What the cell's driver is started with: also what its stored experiment must agree with."""
    tune = _tune(study)
    try:
        space = load_space(tune.spaces[cell.optimizer])
    except ValueError as exc:
        raise StudyError(f"{study.path}: tune.spaces.{cell.optimizer}: {exc}") from exc
    try:
        points = load_points(tune.warm_start[cell.optimizer], space) if cell.optimizer in tune.warm_start else []
    except WarmStartError as exc:
        raise StudyError(f"{study.path}: tune.warm_start.{cell.optimizer}: {exc}") from exc
    return DriverOptions(
        exp_key=experiment_name(study, cell), space=space, config_path=str(out / "configs" / f"{cell.slug}.toml"),
        max_evals=tune.trials, queue_size=tune.queue_size or max(tune.workers, 2), seed=tune.seed + (cell.seed or 0),
        grace_s=tune.grace, objective=tune.objective, pending=tune.pending, warm_start=tuple(points),
        pruner=tune.pruner, startup_trials=tune.startup_trials, poll_s=DRIVER_POLL_S,
        idle_poll_s=DRIVER_IDLE_POLL_S,
    )  # fmt: skip


def _check_experiments(store: TrialStore, cells: Sequence[Cell], options: Mapping[str, DriverOptions]) -> None:
    """Refuses, before any process starts, to continue experiments stored with other settings (two searches would
    mix in one TPE history); names every such cell."""
    changed = []
    for cell in cells:
        try:
            check_experiment(store, options[cell.slug])
        except ExperimentMismatch as exc:
            changed.append(f"cell {cell.name}: experiment {exc.exp_key!r} already exists with another "
                           f"{', '.join(exc.different)}")  # fmt: skip
    if changed:
        raise StudyError(f"{'; '.join(changed)} -- {CHANGED_SETTINGS}")


def _driver_command(options: DriverOptions, space: str, url_file: Path, warm_start: Path | None) -> list[str]:
    pruner = options.pruner
    pruning = [
        "--pruner", pruner.name, "--prune-warmup-steps", str(pruner.warmup_steps),
        "--prune-min-trials", str(pruner.min_trials), "--asha-min-fraction", str(pruner.min_fraction),
        "--asha-reduction-factor", str(pruner.reduction_factor), "--pruned-history", pruner.pruned_history,
        *(["--prune-behind-best"] if pruner.behind_best else []),
        *(["--prune-threshold", repr(pruner.threshold), "--prune-threshold-after", repr(pruner.threshold_after)]
          if pruner.threshold is not None else []),
    ] if pruner.active else []  # fmt: skip
    return [
        sys.executable, "-m", "hpo_worker", "driver", "--mongo-file", str(url_file), "--exp", options.exp_key,
        "--space", space, "--config", options.config_path,
        "--max-evals", str(options.max_evals), "--objective", options.objective, "--seed", str(options.seed),
        "--queue-size", str(options.queue_size), "--grace", str(options.grace_s), "--pending", options.pending,
        "--poll", str(options.poll_s), "--idle-poll", str(options.idle_poll_s),
        "--startup-trials", str(options.startup_trials), *pruning,
        *(["--warm-start", str(warm_start)] if warm_start else []),
    ]  # fmt: skip


def _waves(cells: Sequence[Cell], by_batch_size: bool) -> list[list[Cell]]:
    """The cells in the order their drivers start: all at once, or (tune.seed_from_neighbour) batch size by batch
    size, smallest first, so that each cell's neighbour is tuned before it."""
    if not by_batch_size:
        return [list(cells)]
    return [[c for c in cells if c.batch_size == size] for size in sorted({c.batch_size for c in cells})]


def _neighbour(cell: Cell, cells: Sequence[Cell]) -> Cell | None:
    """The cell of the next smaller batch size with the same variant, optimizer and study seed."""
    same = (cell.variant, cell.optimizer, cell.seed)
    smaller = [c for c in cells if (c.variant, c.optimizer, c.seed) == same and c.batch_size < cell.batch_size]
    return max(smaller, key=lambda c: c.batch_size, default=None)


def _best_point(store: TrialStore, options: DriverOptions) -> dict[str, Any] | None:
    """The parameters of the experiment's best finished trial, as a warm-start point; None before any."""
    docs = store.trial_docs(options.exp_key, curves=False)
    best = summarize(docs, top_k=1)["best"]
    if best is None:
        return None
    doc = next(d for d in docs if d["tid"] == best["tid"])
    return point_of(options.space, doc["misc"]["vals"])


def _warm_start_file(
    study: StudyConfig, cell: Cell, cells: Sequence[Cell], options: Mapping[str, DriverOptions], store: TrialStore,
    out: Path, log: Log,
) -> Path | None:  # fmt: skip
    """``<out>/warm_start/<cell>.toml``: tune.warm_start's points and, with tune.seed_from_neighbour, the best point
    of the neighbouring cell (tuned already); None when there is no point."""
    points = list(options[cell.slug].warm_start)
    neighbour = _neighbour(cell, cells) if _tune(study).seed_from_neighbour else None
    best = _best_point(store, options[neighbour.slug]) if neighbour is not None else None
    if neighbour is not None and best is not None and best not in points:
        points.append(best)
        log(f"cell {cell.name} starts from the best point of cell {neighbour.name}: {best}")
    if not points:
        return None
    path = out / "warm_start" / f"{cell.slug}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, points_toml(points))
    return path


def _worker_command(tune: TuneSettings, url_file: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "hpo_worker", "worker", "--mongo-file", str(url_file), "--workdir", str(out / "trials"),
        "--idle-timeout", "3600", "--grace", str(tune.grace),
    ]  # fmt: skip


def _drive(
    study: StudyConfig, cells: Sequence[Cell], options: Mapping[str, DriverOptions], url: str, url_file: Path,
    out: Path, store: TrialStore, log: Log,
) -> None:  # fmt: skip
    """One driver per cell and the local workers, until every driver has its max-evals trials."""
    tune = _tune(study)
    logs = out / "logs"
    drivers: dict[str, subprocess.Popen[bytes]] = {}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        env = shared_threads_env(tune.workers)  # one thread each here, so that N of them do not oversubscribe it
        worker = _worker_command(tune, url_file, out)
        workers += [start_logged(worker, logs / f"worker-{index}.log", env) for index in range(tune.workers)]
        where = f"{tune.workers} local worker(s)" if tune.workers else "external workers (tune.workers = 0)"
        log(
            f"tuning {len(cells)} cells x {tune.trials} trials ({tune.objective}) with {where}; MongoDB "
            f"{mask_url(url)}; logs in {logs}"
        )
        experiments = [options[cell.slug].exp_key for cell in cells]
        clock = BeatClock(blind_after_s=3 * PROGRESS_EVERY_S)
        reader = StateReader(store, experiments)
        for wave in _waves(cells, tune.seed_from_neighbour):
            for cell in wave:
                warm = _warm_start_file(study, cell, cells, options, store, out, log)
                command = _driver_command(options[cell.slug], tune.spaces[cell.optimizer], url_file, warm)
                drivers[cell.slug] = start_logged(command, logs / f"driver-{cell.slug}.log")
            _wait_for_drivers(
                {cell.slug: drivers[cell.slug] for cell in wave}, workers, logs, server_address(url),
                lambda: log(progress(store, experiments, tune.trials, clock, reader)),
            )  # fmt: skip
    finally:  # SIGTERM puts a worker's running trial back in the queue: a restarted study runs it again
        for process in [*workers, *drivers.values()]:
            terminate(process, STOP_GRACE_S)


def _wait_for_drivers(
    drivers: Mapping[str, subprocess.Popen[bytes]], workers: Sequence[subprocess.Popen[bytes]], logs: Path,
    address: str, report_progress: Callable[[], None],
) -> None:  # fmt: skip
    last_report = time.monotonic()
    while True:
        for slug, driver in drivers.items():
            code = driver.poll()
            if code not in (None, 0):
                raise _database_lost(f"the driver of cell {slug}", code, address) or StudyError(
                    f"the driver of cell {slug} failed (exit {code}): {log_tail(logs / f'driver-{slug}.log')}"
                )
        if all(driver.poll() == 0 for driver in drivers.values()):
            return
        if workers and all(worker.poll() is not None for worker in workers):
            lost = _database_lost("every local worker", workers[0].returncode, address)
            raise lost or StudyError(f"every local worker exited: {log_tail(logs / 'worker-0.log')}")
        if time.monotonic() - last_report > PROGRESS_EVERY_S:
            last_report = time.monotonic()
            report_progress()
        time.sleep(0.5)


def progress(
    store: TrialStore, experiments: Sequence[str], trials: int, clock: BeatClock | None = None,
    reader: StateReader | None = None,
) -> str:  # fmt: skip
    """``  7/16 trials finished (1 failed, 2 diverged), 2 running``: the study's trials by state, from the store (a
    diverged trial is done, with status fail; pruned and diverged are named when there are any); with a
    ``clock`` (read at every call), also the running trials whose heartbeat stopped and the grace they wait out.
    A ``reader`` of the same experiments, kept from call to call, reads only what may have changed."""
    try:
        # A progress line waits little for the database and never ends the study: the drivers and workers wait out
        # its patience, and their exit status says whether it was lost.
        with store.reconnect.limited(PROGRESS_PATIENCE_S):
            docs = reader.read() if reader is not None else store.trial_states(experiments)
            ours = set(experiments)
            running_docs = [doc for doc in store.running_docs() if doc["exp_key"] in ours] if clock else []
    except (pymongo.errors.PyMongoError, StoreUnreachable) as exc:
        return f"  progress unavailable: MongoDB {type(exc).__name__}"
    counts = state_counts(docs)
    diverged = sum(d["state"] == TrialState.DONE and d["status"] == "fail" for d in docs)
    failed, pruned, running = counts[TrialState.ERROR], counts[TrialState.PRUNED], counts[TrialState.RUNNING]
    finished = counts[TrialState.DONE] + failed + pruned
    also = (f", {pruned} pruned" if pruned else "") + (f", {diverged} diverged" if diverged else "")
    line = f"  {finished}/{trials * len(experiments)} trials finished ({failed} failed{also}), {running} running"
    silent = [s for s in clock.silences(running_docs).values() if s >= SILENT_AFTER_S] if clock else []
    if silent:
        line += (
            f"; {len(silent)} silent for up to {max(silent):.0f} s: the drivers requeue a trial whose worker sends no "
            "heartbeat for tune.grace seconds (at once when the worker ran on this host and its process ended)"
        )
    return line


def _cell_trials(store: TrialStore, study: StudyConfig, cell: Cell, out: Path) -> list[dict[str, Any]]:
    """The cell's trials, written to ``trials/<cell>.json`` and summarised in ``logs/report-<cell>.log``."""
    exp_key = experiment_name(study, cell)
    if store.get_experiment(exp_key) is None:
        raise StudyError(f"cannot read the trials of cell {cell.name}: no experiment {exp_key!r} in the database")
    docs = store.trial_docs(exp_key)
    write_trials_json(docs, out / "trials" / f"{cell.slug}.json")
    (out / "logs" / f"report-{cell.slug}.log").write_text(format_report(summarize(docs, top_k=study.top_k)) + "\n")
    return trials_json(docs)


def live_url(study: StudyConfig, out: Path) -> str | None:
    """``tune.mongo``, or the URL of the embedded server of the study running now (in ``<out>/mongo-url`` while it
    runs); None when the study has neither."""
    if _tune(study).mongo:
        return _tune(study).mongo
    url_file = out / URL_FILE
    return read_url_file(url_file) if url_file.is_file() else None


def finished_trials_now(
    study: StudyConfig, cells: Sequence[Cell], out: Path, log: Log
) -> dict[str, list[dict[str, Any]]]:
    """The trials of each cell that have finished so far, by cell slug, as ``hpo_worker.report.trials_json`` records,
    read from the store as it is now: that of the study running now (its ``mongo-url``), or ``tune.mongo``, or the
    embedded server of a study that is not running, started for this read and stopped after it. Writes nothing."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_database_lost_is_a_study_error())
        url = live_url(study, out) or stack.enter_context(study_mongo_url(study, out, log))
        store = stack.enter_context(contextlib.closing(connect_store(url)))
        trials = {}
        for cell in cells:
            if store.get_experiment(experiment_name(study, cell)) is None:
                raise StudyError(f"cell {cell.name} has no experiment in the database yet: start the study first")
            docs = store.trial_docs(experiment_name(study, cell))
            trials[cell.slug] = trials_json([doc for doc in docs if doc.get("state") in FINISHED_STATES])
        return trials


# -- the database lost for longer than hpo_worker's patience: its cause, not a log tail ---------------------------


def _database_lost(who: str, code: int | None, address: str) -> StudyError | None:
    """A StudyError naming the lost database when ``code`` is hpo_worker's EXIT_STORE_UNREACHABLE, else None."""
    if code != EXIT_STORE_UNREACHABLE:
        return None
    return StudyError(
        f"{who} stopped: MongoDB at {address} was unreachable for longer than --db-patience (${ENV_PATIENCE}, "
        f"exit status {code}): check that the server runs and this host reaches it, then run the same command again "
        "(finished trials keep their result in their folder and are stored, not trained again)"
    )


@contextlib.contextmanager
def _database_lost_is_a_study_error() -> Iterator[None]:
    """The study's own store calls give up as the processes do (:class:`StoreUnreachable`): one line, no traceback."""
    try:
        yield
    except StoreUnreachable as exc:
        raise StudyError(f"the study stopped: {exc}") from exc
