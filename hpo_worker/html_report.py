"""One self-contained HTML page of an experiment: its status, best trials, every trial, and the plots inline.

``python -m hpo_worker report --exp NAME --html FILE [--watch SECONDS]`` (docs/hpo.md). The plots are
:func:`hpo_worker.report.plot`'s PNGs, embedded as ``data:`` URLs, so the page is one file that can be copied off a
cluster. With ``--watch`` the page is written again every SECONDS until the experiment has its trials, atomically
(a browser never reads half a page), and it reloads itself at that interval.
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpo_worker.report import plot, summarize, trial_params
from hpo_worker.status import ExperimentStatus, format_status
from hpo_worker.store import TrialState
from jobs.files import atomic_write_text

__all__ = ["html_page", "write_html"]

STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th { background: #eee; }
img { max-width: 48%; margin: 0.3em; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; }
"""
# Sets data-images on <body> to the number of pictures that loaded: what the headless-browser test reads.
COUNT_IMAGES = (
    "window.addEventListener('load', () => { document.body.dataset.images = "
    "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });"
)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _trial_rows(trials: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[list[Any]]:
    rows = []
    for trial in trials:
        result = trial.get("result") or {}
        params = trial_params(trial)
        state = trial.get("state")
        name = TrialState(int(state)).name.lower() if state in set(TrialState) else str(state)
        rows.append([trial.get("tid"), name, result.get("loss"), result.get("test_accuracy"), result.get("steps"),
                     *(params.get(label) for label in labels)])  # fmt: skip
    return rows


def _images(trials: Sequence[Mapping[str, Any]]) -> str:
    with tempfile.TemporaryDirectory() as folder:
        pictures = [(p.stem, base64.b64encode(p.read_bytes()).decode()) for p in plot(trials, folder)]
    return "".join(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">' for name, data in pictures)


def html_page(
    exp_key: str, trials: Sequence[Mapping[str, Any]], status: ExperimentStatus, top_k: int, refresh_s: float = 0
) -> str:
    """The page's text."""
    summary = summarize(trials, top_k=top_k)
    labels = sorted({label for trial in trials for label in trial_params(trial)})
    best = summary["best"]
    top = summary["top_k"]
    refresh = f'<meta http-equiv="refresh" content="{refresh_s:g}">' if refresh_s > 0 else ""
    best_rows = [[label, value] for label, value in sorted((best or {}).get("params", {}).items())]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>{refresh}<title>{html.escape(exp_key)}</title>",
        f"<style>{STYLE}</style><script>{COUNT_IMAGES}</script></head><body>",
        f"<h1>Experiment {html.escape(exp_key)}</h1><pre>{html.escape(format_status([status]))}</pre>",
        f"<h2>Best trial: {_cell(best['tid']) if best else 'none yet'}</h2>",
        _table(["parameter", "value"], best_rows, "best"),
        f"<p>Top {top['k']} of {summary['n_ranked']} ranked trials: loss {_cell(top['loss_mean'])} ± "
        f"{_cell(top['loss_std'])} (mean ± std), test accuracy {_cell(top['test_accuracy_mean'])}.</p>",
        "<h2>Trials</h2>",
        _table(["tid", "state", "loss", "test accuracy", "steps", *labels], _trial_rows(trials, labels), "trials"),
        f"<h2>Plots</h2><div id='plots'>{_images(trials)}</div></body></html>",
    ]
    return "\n".join(parts)


def write_html(
    path: str | Path, exp_key: str, trials: Sequence[Mapping[str, Any]], status: ExperimentStatus, top_k: int,
    refresh_s: float = 0,
) -> Path:  # fmt: skip
    path = Path(path)
    atomic_write_text(path, html_page(exp_key, trials, status, top_k, refresh_s))
    return path
