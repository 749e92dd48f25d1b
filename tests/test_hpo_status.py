"""The live view (hpo_worker.status, python -m hpo_worker status, python -m study status) on a real nx-27017 store,
and the HTML report loaded in headless Chromium (Debian's ``chromium``, installed by scripts/setup.sh)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hpo_worker.driver import EXPERIMENT_IDENTITY, DriverOptions, experiment_meta, make_point_docs
from hpo_worker.spaces import load_space
from hpo_worker.status import experiment_status, format_status
from hpo_worker.store import TrialState, TrialStore, connect, utcnow
from tests.processes import ENV, ROOT
from tests.synthetic_configs import synthetic_mlp_toml
from tests.test_hpo import SPACE

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)
# (state, loss, minutes before NOW of the start and of the last heartbeat or end, owner)
TRIALS = [
    (TrialState.DONE, 0.30, 9, 8, "w1"),
    (TrialState.DONE, 0.10, 8, 5, "w2"),
    (TrialState.PRUNED, 0.90, 6, 4, "w1"),
    (TrialState.ERROR, None, 5, 3, "w2"),
    (TrialState.DONE, None, 7, 6, "w1"),  # done without a loss: its run diverged (status fail)
    (TrialState.RUNNING, None, 2, 0.1, "w1"),  # beating: w1 is alive
    (TrialState.RUNNING, None, 3, 2, "w3"),  # silent for 2 minutes
    (TrialState.NEW, None, None, None, None),
]


def _experiment(store: TrialStore, tmp_path: Path, exp: str, now: dt.datetime = NOW) -> None:
    config = tmp_path / "base.toml"
    config.write_text(synthetic_mlp_toml(batch_size=32, train_size=64, test_size=32, lr="0.1", run="steps = 4"))
    (tmp_path / "space.toml").write_text(SPACE)
    space = load_space(str(tmp_path / "space.toml"))
    options = DriverOptions(exp, space, str(config), max_evals=10)
    store.create_or_check_experiment(exp, experiment_meta(options), EXPERIMENT_IDENTITY)
    points = [{"optim.lr": 0.01 * (i + 1), "optim.momentum": 0.5} for i in range(len(TRIALS))]
    docs = make_point_docs(space, exp, list(range(len(TRIALS))), points)
    for doc, (state, loss, started, last, owner) in zip(docs, TRIALS, strict=True):
        doc.update(state=state, owner=owner)
        if started is not None and last is not None:
            doc["book_time"] = now - dt.timedelta(minutes=started)
            doc["refresh_time"] = now - dt.timedelta(minutes=last)
        if state in (TrialState.DONE, TrialState.PRUNED):
            status = "pruned" if state == TrialState.PRUNED else "ok" if loss is not None else "fail"
            doc["result"] = {"status": status, "loss": loss, "steps": 4}
    store.insert_trials(docs)


@pytest.fixture
def store(mongo: str) -> Any:
    store = connect(mongo)
    yield store
    store.close()


def test_status_counts_states_best_workers_rate_and_eta(store: TrialStore, tmp_path: Path) -> None:
    _experiment(store, tmp_path, "live")
    status = experiment_status(store, "live", NOW)
    assert status.counts[TrialState.DONE] == 3 and status.counts[TrialState.PRUNED] == 1 and status.finished == 5
    assert status.diverged == 1
    assert (status.best_tid, status.best_loss) == (1, 0.10)  # the pruned trial's 0.9 is never ranked
    assert (status.workers_alive, status.silent) == (1, 1)
    # 5 trials ended within the 9 minutes since the first start: 5/9 per minute; 5 to go of max_evals 10
    assert status.rate_per_min == pytest.approx(5 / 9) and status.eta_s == pytest.approx(5 / (5 / 9) * 60)
    text = format_status([status], NOW)
    assert text.splitlines()[1].split()[2:4] == ["done", "diverged"], text
    assert re.search(r"live\s+5/10\s+2\s+1\s+1\s+1\s+2\s+1\s+0\.1\s+1\s+1\s+1\s+0\.56\s+9m00s", text), text


def test_a_heartbeat_written_by_the_store_counts_its_worker_alive(store: TrialStore, tmp_path: Path) -> None:
    # nx-27017 hands back a time written by $set as text: the worker that just beat must not show as silent.
    _experiment(store, tmp_path, "beats", now=utcnow() - dt.timedelta(minutes=5))
    silent = next(doc for doc in store.running_docs("beats") if doc["owner"] == "w3")
    assert store.beat(silent, "w3")
    status = experiment_status(store, "beats")
    assert (status.workers_alive, status.silent) == (1, 1), status  # w3 beat now; w1's last beat was 5 min ago
    assert status.rate_per_min is not None and status.rate_per_min > 0


def test_python_m_hpo_worker_status_prints_the_view(mongo: str, store: TrialStore, tmp_path: Path) -> None:
    for exp in ("a", "b"):
        _experiment(store, tmp_path, exp, now=utcnow())
    command = [sys.executable, "-m", "hpo_worker", "status", "--mongo", mongo, "--exp", "a", "--exp", "b"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows[1].split()[:3] == ["experiment", "finished", "done"] and rows[-1].startswith("all"), done.stdout
    assert rows[-1].split()[1] == "10/20" and rows[-1].split()[2:4] == ["2", "2"], done.stdout  # workers, silent
    missing = subprocess.run([*command[:-4], "--exp", "nope"], capture_output=True, text=True, timeout=60, env=ENV)
    assert missing.returncode == 2 and "no experiment 'nope' in this database" in missing.stderr, missing.stderr


def test_html_report_loads_in_headless_chromium_with_its_table_and_plots(
    mongo: str, store: TrialStore, tmp_path: Path
) -> None:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is missing: run `make setup` (scripts/setup.sh installs it)"
    _experiment(store, tmp_path, "page")
    page = tmp_path / "page.html"
    command = [sys.executable, "-m", "hpo_worker", "report", "--mongo", mongo, "--exp", "page", "--html", str(page)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert done.returncode == 0 and f"html: {page}" in done.stdout, done.stderr
    assert 'src="http' not in page.read_text(), "the page must be self-contained"
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    trials = re.search(r'<table id="trials">.*?</table>', dom, re.S)
    assert trials is not None, dom[:2000]
    assert trials.group().count("<tr>") == 1 + len(TRIALS), trials.group()  # the header and every trial
    assert "<td>pruned</td>" in trials.group() and "<td>running</td>" in trials.group()
    pictures = dom.count("<img")
    assert pictures >= 3, dom[:2000]  # loss by trial, and one per numeric parameter (lr, momentum)
    assert f'data-images="{pictures}"' in dom, "every plot must load in the browser"
    assert '<table id="best">' in dom and "<td>optim.lr</td>" in dom


def test_study_status_shows_the_cells_of_a_tuned_study(mongo: str, store: TrialStore, tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    (tmp_path / "base.toml").write_text(
        synthetic_mlp_toml(batch_size=32, train_size=64, test_size=32, lr="0.1", run="steps = 4")
    )
    study.write_text(
        '[study]\nname = "st"\nbase_config = "base.toml"\noptimizers = ["sgd"]\nbatch_sizes = [32, 64]\n'
        f'max_steps = 4\n[tune]\ntrials = 10\nobjective = "test_loss"\nmongo = "{mongo}"\n'
    )
    _experiment(store, tmp_path, "st-sgd-b32", now=utcnow())
    command = [sys.executable, "-m", "jobs.study", "status", "--config", str(study)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "st-sgd-b32" in done.stdout and "st-sgd-b64" not in done.stdout, done.stdout  # only stored cells
    study.write_text(study.read_text().replace(f'mongo = "{mongo}"', 'mongo = ""'))
    away = subprocess.run(command, capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert away.returncode == 2 and "the study's embedded server runs only while the study does" in away.stderr


def test_interim_reads_only_finished_trials_from_the_running_studys_server(
    mongo: str, store: TrialStore, tmp_path: Path
) -> None:
    from study.config import StudyError, load_study
    from study.tuning import URL_FILE, finished_trials_now

    (tmp_path / "base.toml").write_text(
        synthetic_mlp_toml(batch_size=32, train_size=64, test_size=32, lr="0.1", run="steps = 4")
    )
    text = '[study]\nname = "st"\nbase_config = "base.toml"\noptimizers = ["sgd"]\nbatch_sizes = [32]\n'
    text += f'max_steps = 4\nout_dir = "{tmp_path / "out"}"\n[tune]\ntrials = 10\nobjective = "test_loss"\n'
    (tmp_path / "study.toml").write_text(text)
    study = load_study(tmp_path / "study.toml")
    _experiment(store, tmp_path, "st-sgd-b32")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / URL_FILE).write_text(mongo + "\n")  # what a running study leaves for its readers
    trials = finished_trials_now(study, study.cells(), tmp_path / "out", print)
    finished = [tid for tid, (state, *_) in enumerate(TRIALS) if state not in (TrialState.RUNNING, TrialState.NEW)]
    assert [t["tid"] for t in trials["sgd-b32"]] == finished, trials
    (tmp_path / "study.toml").write_text(text.replace("[32]", "[32, 64]"))
    wider = load_study(tmp_path / "study.toml")
    with pytest.raises(StudyError, match="cell sgd/b64 has no experiment in the database yet"):
        finished_trials_now(wider, wider.cells(), tmp_path / "out", print)


def test_watch_redraws_until_every_experiment_has_its_trials(store: TrialStore, tmp_path: Path) -> None:
    import io

    from hpo_worker.status import watch

    _experiment(store, tmp_path, "w")
    views: list[int] = []
    status = experiment_status(store, "w", NOW)

    def read() -> list[Any]:
        views.append(1)
        done = len(views) >= 3  # the third view finds every trial finished
        return [status if not done else type(status)(**{**status.__dict__, "max_evals": status.finished})]

    out = io.StringIO()
    watch(read, 0.01, out=out)
    assert len(views) == 3 and out.getvalue().count("hpo status at") == 3
    command = [sys.executable, "-m", "hpo_worker", "report", "--mongo", "mongodb://127.0.0.1:1/x", "--exp", "w"]
    bad = subprocess.run([*command, "--watch", "5"], capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert bad.returncode == 2 and "--watch rewrites the --html page: give --html FILE" in bad.stderr, bad.stderr


def test_store_reads_benchmark_checks_incremental_reads_against_whole_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks.store_reads on a real server: both incremental reads give what a whole read gives (it raises
    otherwise), and one row per read and store size comes out."""
    from benchmarks.store_reads import main

    assert main(["--cells", "3", "--trials", "4,6", "--points", "5", "--repeats", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1")]
    assert [row.split(" | ")[0:2] for row in rows] == [
        ["| 12", "pruner's (one cell of 4)"], ["| 12", "progress line's (all cells)"],
        ["| 18", "pruner's (one cell of 6)"], ["| 18", "progress line's (all cells)"],
    ]  # fmt: skip
