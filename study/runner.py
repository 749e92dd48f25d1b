"""Runs a study: every cell tuned through ``python -m hpo_worker`` or trained with given values; then the report.

Layout of ``study.out_dir``::

    configs/<cell>.toml       the config of the cell's runs (base config + the study's overrides)
    runs/<cell>/              given values: the cell's training run (summary.json, metrics.jsonl, checkpoints)
    trials/<exp>/trial<tid>.<attempt>/run/   tuning: each trial's training run (written by the local workers)
    trials/<cell>.json        tuning: every trial of the cell, as ``hpo_worker report --json`` wrote it
    hpo_data/                 tuning without tune.mongo: the embedded nx-27017 server's database
    logs/                     the server's, drivers' and workers' output
    runs.csv, fits.json, *.png, report.md     the report (jobs.study.report)

Tuning talks to hpo_worker through its command line, never its modules (``hpo_worker`` depends on ``jobs``, not the
other way round): one ``driver`` per cell, all at once, and ``tune.workers`` local ``worker`` processes that take
trials of any cell. With ``tune.workers = 0`` the study only drives: start workers elsewhere (a job array with
``--mongo`` the same URL). A study that is stopped and started again continues: the drivers resume their experiments
from MongoDB, and given runs with a ``summary.json`` are not run again (half-done ones resume from their checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.study.config import Cell, StudyConfig, StudyError, cell_toml, check_cells

__all__ = ["run_study"]

Log = Callable[[str], None]
SERVER_START_S = 30.0
PROGRESS_EVERY_S = 15.0
_FINISHED = re.compile(r"(\d+)/(\d+) finished")


def _mask(url: str) -> str:
    return re.sub(r"(mongodb(?:\+srv)?://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:].strip() if path.exists() else "(no output)"


def _peak_lr(run_dir: Path, fallback: float | None) -> float | None:
    """The lr the schedule peaks at (after the linear scaling rule), from the run's config.json."""
    try:
        return float(json.loads((run_dir / "config.json").read_text())["derived"]["peak_lr"])
    except (OSError, KeyError, ValueError, TypeError):
        return fallback


def _row(
    cell: Cell, source: str, trial: int | None, summary: Mapping[str, Any], run_dir: Path, hparams: Mapping[str, Any]
) -> dict[str, Any]:
    train, val = summary.get("train_accuracy"), summary.get("test_accuracy")
    lr = hparams.get("optim.lr")
    return {
        "cell": cell.name,
        "variant": cell.variant,
        "seed": cell.seed,
        "optimizer": cell.optimizer,
        "batch_size": cell.batch_size,
        "source": source,
        "trial": trial,
        "lr": _peak_lr(run_dir, float(lr) if isinstance(lr, int | float) else None),
        "hparams": json.dumps(dict(hparams), sort_keys=True),
        "target_accuracy": summary.get("target_accuracy"),
        "reached": bool(summary.get("reached_target")),
        "steps_to_target": summary.get("steps_to_target"),
        "examples_to_target": summary.get("examples_to_target"),
        "steps": summary.get("steps"),
        "wall_seconds": summary.get("seconds"),
        "train_accuracy": train,
        "val_accuracy": val,
        "train_loss": summary.get("train_loss"),
        "val_loss": summary.get("test_loss"),
        "generalization_gap": train - val if train is not None and val is not None else None,
        "noise_scale": summary.get("noise_scale"),
        "best_val_accuracy": summary.get("best_test_accuracy"),
        "best_val_step": summary.get("best_test_step"),
        "kl_clipped_fraction": summary.get("kl_clipped_fraction"),
        "metrics_path": str(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else "",
    }


# ------------------------------------------------------------------------------------------------------- given values


def _run_given(study: StudyConfig, cells: list[Cell], out: Path, log: Log) -> list[dict[str, Any]]:
    from jobs.config import load_config
    from jobs.loop import TrainingDiverged, run_training
    from jobs.parallel import SingleContext

    rows = []
    for index, cell in enumerate(cells, 1):
        run_dir = out / "runs" / cell.slug
        summary_path = run_dir / "summary.json"
        given = dict(parse_pairs(study.given.get(cell.optimizer, ())))
        if summary_path.exists():
            log(f"[{index}/{len(cells)}] {cell.name}: done before, reusing {summary_path}")
            summary: dict[str, Any] = json.loads(summary_path.read_text())
        else:
            log(f"[{index}/{len(cells)}] {cell.name}: training")
            config = load_config(out / "configs" / f"{cell.slug}.toml", [f"run.out_dir={json.dumps(str(run_dir))}"])
            config.run.resume = True  # a run killed before is continued from its newest checkpoint
            try:
                summary = asdict(run_training(config, SingleContext(), log=lambda message: None))
            except TrainingDiverged as exc:
                log(f"  {cell.name}: diverged: {exc}")
                summary = {"target_accuracy": study.target_accuracy or None, "reached_target": False}
        rows.append(_row(cell, "given", None, summary, run_dir, given))
        log(f"  {_describe(rows[-1])}")
    return rows


def parse_pairs(overrides: tuple[str, ...]) -> list[tuple[str, Any]]:
    from jobs.config import parse_override

    return [parse_override(text) for text in overrides]


def _describe(row: Mapping[str, Any]) -> str:
    reached = f"target at step {row['steps_to_target']}" if row["reached"] else "target not reached"
    val = row.get("val_accuracy")
    return f"{row['cell']}: {reached}, val accuracy {val:.4f}" if val is not None else f"{row['cell']}: {reached}"


# ------------------------------------------------------------------------------------------------------------ tuning


def _hpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpo_worker", *args]


def _start(command: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ))


def _stop(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _embedded_server(out: Path, logs: Path) -> tuple[str, subprocess.Popen[bytes]]:
    data = out / "hpo_data"
    url_file = data / "mongo-url"
    url_file.unlink(missing_ok=True)  # a stale one from a killed study
    server = _start(_hpo("server", "--data-dir", str(data)), logs / "server.log")
    deadline = time.monotonic() + SERVER_START_S
    while not url_file.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            raise StudyError(f"the embedded MongoDB server did not start: {_tail(logs / 'server.log')}")
        time.sleep(0.1)
    return url_file.read_text().strip(), server


def _experiment(study: StudyConfig, cell: Cell) -> str:
    return f"{study.name}-{cell.slug}"


def _run_tuned(study: StudyConfig, cells: list[Cell], out: Path, log: Log) -> list[dict[str, Any]]:
    tune = study.tune
    assert tune is not None
    logs = out / "logs"
    server: subprocess.Popen[bytes] | None = None
    if tune.mongo:
        url = tune.mongo
    else:
        url, server = _embedded_server(out, logs)
    try:
        _tune_cells(study, cells, url, out, log)
        return [row for cell in cells for row in _cell_rows(study, cell, url, out, logs)]
    finally:
        if server is not None:
            _stop(server)


def _tune_cells(study: StudyConfig, cells: list[Cell], url: str, out: Path, log: Log) -> None:
    """One driver per cell and the local workers, until every driver has its max-evals trials."""
    tune = study.tune
    assert tune is not None
    logs = out / "logs"
    queue = tune.queue_size or max(tune.workers, 2)
    drivers: dict[str, subprocess.Popen[bytes]] = {}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for cell in cells:
            drivers[cell.slug] = _start(
                _hpo("driver", "--mongo", url, "--exp", _experiment(study, cell), "--space",
                     tune.spaces[cell.optimizer], "--config", str(out / "configs" / f"{cell.slug}.toml"),
                     "--max-evals", str(tune.trials), "--objective", tune.objective,
                     "--seed", str(tune.seed + (cell.seed or 0)),
                     "--queue-size", str(queue), "--grace", str(tune.grace)),
                logs / f"driver-{cell.slug}.log",
            )  # fmt: skip
        # The workers share the machine's cores: one thread each, so that N of them do not oversubscribe it.
        threads = max(1, (os.cpu_count() or 1) // max(tune.workers, 1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        worker = _hpo("worker", "--mongo", url, "--workdir", str(out / "trials"), "--idle-timeout", "3600")
        worker += ["--grace", str(tune.grace)]
        workers += [_start(worker, logs / f"worker-{index}.log", env) for index in range(tune.workers)]
        where = f"{tune.workers} local worker(s)" if tune.workers else "external workers (tune.workers = 0)"
        log(
            f"tuning {len(cells)} cells x {tune.trials} trials ({tune.objective}) with {where}; MongoDB "
            f"{_mask(url)}; logs in {logs}"
        )
        _wait_for_drivers(drivers, workers, logs, log)
    finally:  # SIGTERM puts a worker's running trial back in the queue: a restarted study runs it again
        for process in [*workers, *drivers.values()]:
            _stop(process)


def _wait_for_drivers(
    drivers: Mapping[str, subprocess.Popen[bytes]], workers: list[subprocess.Popen[bytes]], logs: Path, log: Log
) -> None:
    last_report = time.monotonic()
    while True:
        for slug, driver in drivers.items():
            code = driver.poll()
            if code not in (None, 0):
                output = _tail(logs / f"driver-{slug}.log")
                if "already exists with another" in output:  # the driver's advice (--exp) is not a study option
                    output += (
                        " -- this study's settings changed since its experiments were made: restore them to continue,"
                        " or start a new study (another [study] name or --out folder)"
                    )
                raise StudyError(f"the driver of cell {slug} failed (exit {code}): {output}")
        if all(driver.poll() == 0 for driver in drivers.values()):
            return
        if workers and all(worker.poll() is not None for worker in workers):
            raise StudyError(f"every local worker exited: {_tail(logs / 'worker-0.log')}")
        if time.monotonic() - last_report > PROGRESS_EVERY_S:
            last_report = time.monotonic()
            done = total = 0
            for slug in drivers:
                counts = _FINISHED.findall(_tail(logs / f"driver-{slug}.log", 4000))
                if counts:
                    done, total = done + int(counts[-1][0]), total + int(counts[-1][1])
            log(f"  {done}/{total or '?'} trials finished")
        time.sleep(0.5)


def _cell_rows(study: StudyConfig, cell: Cell, url: str, out: Path, logs: Path) -> list[dict[str, Any]]:
    target = out / "trials" / f"{cell.slug}.json"
    result = subprocess.run(
        _hpo("report", "--mongo", url, "--exp", _experiment(study, cell), "--top-k", str(study.top_k), "--json",
             str(target)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (logs / f"report-{cell.slug}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise StudyError(f"cannot read the trials of cell {cell.name}: {result.stderr.strip()}")
    rows = []
    for trial in json.loads(target.read_text()):
        outcome = trial["result"]
        if outcome.get("status") != "ok":
            continue  # failed or diverged trials have no final accuracy; the trial JSON keeps them
        run_dir = Path(outcome["out_dir"]) / "run"
        rows.append(_row(cell, "tuned", trial["tid"], outcome, run_dir, trial["params"]))
    return rows


# -------------------------------------------------------------------------------------------------------------- main


def run_study(study: StudyConfig, log: Log | None = None) -> Path:
    """Runs every cell of ``study`` and writes the report; returns the path of report.md."""
    from jobs.study.report import format_table, write_report

    say = log or (lambda message: print(f"jobs.study: {message}", file=sys.stderr, flush=True))
    check_cells(study)
    out = study.out_dir.resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    cells = study.cells()
    for cell in cells:
        (out / "configs" / f"{cell.slug}.toml").write_text(cell_toml(study, cell))
    say(
        f"study {study.name}: {len(study.optimizers)} optimizer(s) x {len(study.batch_sizes)} batch size(s)"
        + (f" x {len(study.variants)} variants" if len(study.variants) > 1 else "")
        + f" = {len(cells)} cells, {'tuned' if study.tune else 'given values'}; output in {out}"
    )
    started = time.monotonic()
    rows = _run_tuned(study, cells, out, say) if study.tune else _run_given(study, cells, out, say)
    report = write_report(out, rows, title=f"Batch-size scaling study: {study.name}", top_k=study.top_k)
    say(f"{len(rows)} runs in {time.monotonic() - started:.0f} s")
    print(format_table(rows), flush=True)
    print(f"report: {report}", flush=True)
    return report
