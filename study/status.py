"""``python -m study status --config STUDY.toml [--watch SECONDS]``: the live view of a tuned study's cells.

One row per cell's experiment and the totals (:mod:`hpo_worker.status`): trials per state, best so far, workers
alive, rate and ETA. The store is ``tune.mongo`` (or ``--mongo``/``--mongo-file``), else the embedded server of a
study that is running now: its URL is in ``<out>/mongo-url`` while it runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from hpo_worker.status import ExperimentStatus, experiment_status, format_status, watch
from study.config import StudyConfig, StudyError
from study.tuning import URL_FILE, connect_store, experiment_name, live_url

__all__ = ["show_status"]


def _url(study: StudyConfig, out: Path) -> str:
    url = live_url(study, out)
    if url is None:
        raise StudyError(
            f"no {out / URL_FILE}: the study's embedded server runs only while the study does; start the study, or "
            "give the URL of its MongoDB (--mongo-file FILE or tune.mongo)"
        )
    return url


def show_status(study: StudyConfig, watch_s: float = 0) -> None:
    """Prints the view of the study's cells once, or every ``watch_s`` seconds until they have all their trials."""
    if study.tune is None:
        raise StudyError(f"{study.path} has no [tune] table: there is nothing to follow")
    with contextlib.closing(connect_store(_url(study, study.out_dir.resolve()))) as store:
        names = [experiment_name(study, cell) for cell in study.cells()]
        stored = [name for name in names if store.get_experiment(name) is not None]
        if not stored:
            raise StudyError(f"none of the study's {len(names)} experiments is in the store yet ({names[0]}, ...)")

        def read() -> list[ExperimentStatus]:
            return [experiment_status(store, name) for name in stored]

        if watch_s:
            watch(read, watch_s)
        else:
            print(format_status(read()))
