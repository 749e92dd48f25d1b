"""Runs a study: every cell tuned with hpo_worker (:mod:`study.tuning`) or trained with given values; then the report.

Layout of ``study.out_dir``::

    configs/<cell>.toml       the config of the cell's runs (base config + the study's overrides)
    runs/<cell>/              given values: the cell's training run (summary.json, metrics.jsonl, checkpoints)
    trials/<exp>/trial<tid>.<attempt>/run/   tuning: each trial's training run (written by the local workers)
    trials/<cell>.json        tuning: every trial of the cell (``hpo_worker.report.trials_json``, as ``report --json``)
    hpo_data/                 tuning without tune.mongo: the embedded nx-27017 server's database and log
    logs/                     the drivers' and workers' output, and each cell's trial summary (report-<cell>.log)
    runs.csv, fits.json, *.png, report.md     the report (study.report)

The study sits above hpo_worker and jobs and calls them directly. Tuning: one ``driver`` process per cell, all at once,
and ``tune.workers`` local ``worker`` processes that take trials of any cell; with ``tune.workers = 0`` the study
only drives: start workers elsewhere (a job array with ``--mongo-file`` naming the same URL). A study that is stopped
and started again continues: the drivers resume their experiments from MongoDB, and given runs with a ``summary.json``
are not run again (half-done ones resume from their checkpoint).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.config import Cell, StudyConfig, StudyError, cell_toml, check_cells
from study.replays import Replay, ended_summary, given_summary, replay_toml, run_in_processes

if TYPE_CHECKING:
    from hpo_worker.spaces import SearchSpace

__all__ = ["rewrite_report", "run_study", "stderr_log", "write_interim_report"]

Log = Callable[[str], None]


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
        "curvature_share": summary.get("curvature_share"),
        "curvature_energy": summary.get("curvature_energy"),
        "metrics_path": str(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else "",
    }


# ------------------------------------------------------------------------------------------------------- given values


def _run_given(study: StudyConfig, cells: list[Cell], out: Path, log: Log) -> list[dict[str, Any]]:
    rows = []
    for index, cell in enumerate(cells, 1):
        run_dir = out / "runs" / cell.slug
        given = dict(parse_pairs(study.given.get(cell.optimizer, ())))
        config_path = out / "configs" / f"{cell.slug}.toml"
        name = f"[{index}/{len(cells)}] {cell.name}"
        summary = given_summary(config_path, run_dir, study.target_accuracy, log, name)
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


# --------------------------------------------------------------------------------------- diagnostics of the best runs


def _best_trials(cells: list[Cell], rows: list[dict[str, Any]], log: Log) -> list[tuple[int, Cell, Mapping[str, Any]]]:
    """Each tuned cell's best trial that left a run folder (numbered from 1), in cell order."""
    from study.report import best_runs

    found = []
    for index, cell in enumerate(cells, 1):
        mine = [row for row in rows if row["cell"] == cell.name and row["source"] == "tuned" and row["metrics_path"]]
        if not mine:
            log(f"{cell.name}: no finished trial to train again")
            continue
        found.append((index, cell, next(iter(best_runs(mine).values()))))
    return found


@dataclass(frozen=True)
class _Repeat:
    """A tuned cell's best trial (its row), to be trained again with another seed: ``replay``, of ``config_text``."""

    cell: Cell
    best: Mapping[str, Any]
    seed: int
    config_text: str
    replay: Replay

    def row(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        hparams = json.loads(self.best["hparams"])
        return _row(self.cell, "repeat", self.best["trial"], summary, self.replay.run_dir, hparams)


def _planned_repeats(
    study: StudyConfig, cells: list[Cell], rows: list[dict[str, Any]], out: Path, log: Log
) -> list[_Repeat]:
    """Each tuned cell's best trial with ``tune.repeats`` other seeds (1001, 1002, ...), seed by seed: every cell's
    first repeat before any cell's second, so that a study stopped in this phase has repeats of every cell."""
    assert study.tune is not None
    best = _best_trials(cells, rows, log)
    planned = []
    for seed in range(1001, 1001 + study.tune.repeats):
        for index, cell, trial in best:
            text = replay_toml(Path(trial["metrics_path"]).parent, [f"run.seed={seed}"], f"with seed {seed}")
            replay = Replay(
                name=f"[{index}/{len(cells)}] {cell.name}, trial {trial['trial']} with seed {seed}",
                config_path=out / "configs" / f"{cell.slug}.seed{seed}.toml",
                run_dir=out / "repeats" / cell.slug / f"seed{seed}",
                log_path=out / "logs" / "repeats" / f"{cell.slug}.seed{seed}.log",
            )
            planned.append(_Repeat(cell, trial, seed, text, replay))
    return planned


def _repeat_best(
    study: StudyConfig, cells: list[Cell], rows: list[dict[str, Any]], out: Path, log: Log
) -> list[dict[str, Any]]:
    """The rows of the repeats (:func:`_planned_repeats`), in ``repeats/<cell>/seed<s>``, ``tune.workers`` at a
    time (:func:`study.replays.run_in_processes`): the spread of the best's steps to target over seeds
    (study.uncertainty). Resumable. The rows in cell order, as the search's."""
    assert study.tune is not None
    planned = _planned_repeats(study, cells, rows, out, log)
    for repeat in planned:
        repeat.replay.config_path.write_text(repeat.config_text)
    summaries = run_in_processes([r.replay for r in planned], study.tune.workers, study.target_accuracy, log)
    done = sorted(zip(planned, summaries, strict=True), key=lambda pair: (cells.index(pair[0].cell), pair[0].seed))
    return [repeat.row(summary) for repeat, summary in done]


def _ended_repeats(
    study: StudyConfig, cells: list[Cell], rows: list[dict[str, Any]], out: Path
) -> tuple[list[dict[str, Any]], int]:
    """The rows of the repeats of each cell's best trial now that have ended (finished or diverged), in cell order,
    and how many repeats there are to run; a repeat of an earlier best, which the study will set aside, is left out."""
    from jobs.config import build_config, trajectory_differences

    planned = _planned_repeats(study, cells, rows, out, log=lambda message: None)
    ended = []
    for repeat in sorted(planned, key=lambda r: (cells.index(r.cell), r.seed)):
        summary = ended_summary(repeat.replay.run_dir, study.target_accuracy)
        saved = repeat.replay.run_dir / "config.json"
        if summary is None or not saved.is_file():
            continue
        if trajectory_differences(json.loads(saved.read_text()), build_config(tomllib.loads(repeat.config_text))):
            continue
        ended.append(repeat.row(summary))
    return ended, len(planned)


def _diagnose_best(
    study: StudyConfig, cells: list[Cell], rows: list[dict[str, Any]], out: Path, log: Log
) -> list[dict[str, Any]]:
    """Each tuned cell's best trial trained again with the [fisher] records (the same run: the diagnostics only read
    the model), in ``fisher/runs/<cell>``; their rows."""
    assert study.fisher is not None
    replays = []
    for index, cell, best in _best_trials(cells, rows, log):
        config_path = out / "configs" / f"{cell.slug}.fisher.toml"
        why = "with the study's [fisher] diagnostics"
        config_path.write_text(replay_toml(Path(best["metrics_path"]).parent, study.fisher.overrides(), why))
        run_dir = out / "fisher" / "runs" / cell.slug
        name = f"[{index}/{len(cells)}] {cell.name}, trial {best['trial']} with [fisher]"
        summary = given_summary(config_path, run_dir, study.target_accuracy, log, name)
        replays.append(_row(cell, "replay", best["trial"], summary, run_dir, json.loads(best["hparams"])))
    return replays


# ------------------------------------------------------------------------------------------------------------ tuning


def _stopped(cell: Cell, trial: Mapping[str, Any]) -> dict[str, Any]:
    """A trial that left no finished run: pruned by tune.pruner, or failed (diverged, or an error)."""
    outcome = trial["result"]
    return {
        "variant": cell.variant, "optimizer": cell.optimizer, "batch_size": cell.batch_size, "trial": trial["tid"],
        "status": "pruned" if outcome.get("status") == "pruned" else "failed", "steps": outcome.get("steps"),
        "reason": outcome.get("pruned") or outcome.get("failure") or trial.get("error") or "",
    }  # fmt: skip


def _run_tuned(
    study: StudyConfig, cells: list[Cell], out: Path, log: Log
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of the trials that finished, and the trials that did not (:func:`_stopped`)."""
    from study.tuning import tune_cells  # hyperopt and pymongo: only for a study that tunes

    return _tuned_rows(cells, tune_cells(study, cells, out, log))


def _tuned_rows(
    cells: Sequence[Cell], trials: Mapping[str, Sequence[Mapping[str, Any]]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of the trials (by cell slug) that finished a run, and the others (:func:`_stopped`)."""
    rows, stopped = [], []
    for cell in cells:
        for trial in trials[cell.slug]:
            outcome = trial["result"]
            if outcome.get("status") != "ok":
                stopped.append(_stopped(cell, trial))  # no final accuracy; the trial JSON keeps the whole record
                continue
            run_dir = Path(outcome["out_dir"]) / "run"
            rows.append(_row(cell, "tuned", trial["tid"], outcome, run_dir, trial["params"]))
    return rows, stopped


# -------------------------------------------------------------------------------------------------------------- main


def _prepare(study: StudyConfig, say: Log) -> tuple[Path, list[Cell]]:
    """The output folder with every cell's config file written; the cells."""
    check_cells(study)
    out = study.out_dir.resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    cells = study.cells()
    for cell in cells:
        (out / "configs" / f"{cell.slug}.toml").write_text(cell_toml(study, cell))
    say(
        f"study {study.name}: {len(study.optimizers)} optimizer(s) x {len(study.batch_sizes)} batch size(s)"
        + (f" x {len(study.variants)} variants" if len(study.variants) > 1 else "")
        + (f" x {len(study.seeds)} seeds" if study.seeds else "")
        + f" = {len(cells)} cells, {'tuned' if study.tune else 'given values'}; output in {out}"
    )
    return out, cells


def stderr_log(message: str) -> None:
    print(f"study: {message}", file=sys.stderr, flush=True)


def _spaces(study: StudyConfig) -> dict[str, SearchSpace] | None:
    """Each optimizer's search space for the report, or None for a study of given values."""
    if study.tune is None:
        return None
    from hpo_worker.spaces import load_space

    return {optimizer: load_space(space) for optimizer, space in study.tune.spaces.items()}


def run_study(study: StudyConfig, log: Log | None = None) -> Path:
    """Runs every cell of ``study`` and writes the report; returns the path of report.md."""
    from study.report import format_table, write_report

    say = log or stderr_log
    out, cells = _prepare(study, say)
    started = time.monotonic()
    rows, stopped = _run_tuned(study, cells, out, say) if study.tune else (_run_given(study, cells, out, say), [])
    if study.tune is not None and study.tune.repeats:
        rows += _repeat_best(study, cells, rows, out, say)
    title = f"Batch-size scaling study: {study.name}"
    report = write_report(out, rows, title=title, top_k=study.top_k, stopped=stopped, spaces=_spaces(study))
    say(f"{len(rows)} runs in {time.monotonic() - started:.0f} s")
    if study.fisher is not None:
        from study.fisher_report import write_fisher_report

        diagnosed = _diagnose_best(study, cells, rows, out, say) if study.tune else rows
        (out / "fisher").mkdir(exist_ok=True)
        fisher = write_fisher_report(out / "fisher", diagnosed, title=f"Fisher diagnostics of {study.name}")
        say(f"Fisher diagnostics of {'the best runs' if study.tune else 'the runs'}: {fisher}")
    print(format_table(rows), flush=True)
    print(f"report: {report}", flush=True)
    return report


def rewrite_report(study: StudyConfig, log: Log | None = None) -> Path:
    """The report of a study that has run, drawn again from its runs.csv and trials/<cell>.json (no training, no
    database): after a change to the report's code, or to add the Cost section once step_cost.json exists."""
    from study.report import read_csv, write_report

    say = log or stderr_log
    out = study.out_dir.resolve()
    if not (out / "runs.csv").is_file():
        raise StudyError(f"{out / 'runs.csv'} does not exist: run the study first (python -m study scaling)")
    rows = read_csv(out / "runs.csv")
    stopped = []
    for cell in study.cells():
        trials = out / "trials" / f"{cell.slug}.json"
        if trials.is_file():
            stopped += [_stopped(cell, t) for t in json.loads(trials.read_text()) if t["result"].get("status") != "ok"]
    report = write_report(out, rows, title=f"Batch-size scaling study: {study.name}", top_k=study.top_k,
                          stopped=stopped, spaces=_spaces(study))  # fmt: skip
    say(f"{len(rows)} runs and {len(stopped)} stopped trials from {out}")
    print(f"report: {report}", flush=True)
    return report


def write_interim_report(study: StudyConfig, log: Log | None = None) -> Path:
    """The report of a tuned study that is still running (or stopped before its end), drawn into ``<out>/interim/``
    from the search trials finished so far and the repeats of the best settings that have ended, under a heading
    that says how far each has got. The study's own files are left as they are; ``step_cost.json`` is copied for the
    Cost section."""
    from study.report import write_report
    from study.tuning import finished_trials_now

    say = log or stderr_log
    if study.tune is None:
        raise StudyError(f"{study.path} has no [tune] table: a study of given values has no interim report")
    out = study.out_dir.resolve()
    cells = study.cells()
    rows, stopped = _tuned_rows(cells, finished_trials_now(study, cells, out, say))
    repeats, planned = _ended_repeats(study, cells, rows, out)
    interim = out / "interim"
    interim.mkdir(parents=True, exist_ok=True)
    if (out / "step_cost.json").is_file():
        shutil.copyfile(out / "step_cost.json", interim / "step_cost.json")
    finished, budget = len(rows) + len(stopped), len(cells) * study.tune.trials
    report = write_report(interim, rows + repeats, title=f"Batch-size scaling study: {study.name} (interim)",
                          top_k=study.top_k, stopped=stopped, spaces=_spaces(study),
                          preface=_interim_preface(study, finished, budget, len(repeats), planned))  # fmt: skip
    say(f"interim: {len(rows)} finished runs and {len(stopped)} stopped trials of {budget}; {len(repeats)} repeats")
    print(f"report: {report}", flush=True)
    return report


def _interim_preface(study: StudyConfig, finished: int, budget: int, repeats: int, planned: int) -> list[str]:
    """The heading of an interim report: how many search trials and repeats it is drawn from, and what may change."""
    assert study.tune is not None
    drawn = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"**Interim, not a result.** Drawn at {drawn} from the {finished} of {budget} search trials finished so far "
        "(`python -m study report --interim`)"
    )
    if finished < budget:
        text += (
            f". Cells short of their {study.tune.trials} trials may still change their best, and the halves of their "
            f"budget; the best settings are repeated over seeds ({study.tune.repeats} repeats each) at the end."
        )
    else:
        text += (
            f", and the {repeats} of {planned} repeats of the best settings over seeds ({study.tune.repeats} per cell) "
            "that have ended: a cell's repeats, their intervals and the fits on them will change until all have."
        )
    return [text, ""]


def run_fisher_study(study: StudyConfig, log: Log | None = None) -> Path:
    """Runs every cell of a study with given values and a [fisher] table, then the Fisher report
    (:mod:`study.fisher_report`); returns the path of its fisher.md."""
    say = log or stderr_log
    out, cells = _prepare(study, say)
    started = time.monotonic()
    rows = _run_given(study, cells, out, say)
    from study.fisher_report import write_fisher_report  # matplotlib: only once the runs are done

    report = write_fisher_report(out, rows, title=f"Fisher spectrum and gradient outliers: {study.name}")
    say(f"{len(rows)} runs in {time.monotonic() - started:.0f} s")
    print(f"report: {report}", flush=True)
    return report
