"""study end to end: a tiny tuned study through the real embedded MongoDB server and worker processes, a
given-values study with variants on real MNIST that continues where it stopped, and bad study files."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.step_cost import partial_file
from tests.processes import ENV, PYTHON, ROOT
from tests.synthetic_configs import synthetic_mlp_toml

BASE = synthetic_mlp_toml(
    batch_size=32, train_size=512, test_size=256, lr="0.1", run="steps = 40\neval_every = 0\ntensorboard = false"
)

SPACE = """
[fixed]
"optim.schedule" = "constant"
[params."optim.lr"]
dist = "loguniform"
low = 0.05
high = 0.5
"""

TUNED = """
[study]
name = "tiny"
base_config = "base.toml"
optimizers = ["sgd", "kfac"]
batch_sizes = [32, 128]
target_accuracy = 0.6
max_steps = 40
eval_every_steps = 5
noise_every = 5
top_k = 2
overrides = ["run.train_eval_examples=256"]
[tune]
trials = 2
workers = 2
spaces = { sgd = "space.toml", kfac = "space.toml" }
repeats = 2
[fisher]
every_steps = 5
"""

PNG = b"\x89PNG\r\n\x1a\n"


def _study(
    tmp_path: Path, text: str, *args: str, timeout: float = 600, space: str = SPACE
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(space)
    study = tmp_path / "study.toml"
    study.write_text(text)
    command = [PYTHON, "-m", "study", "scaling", "--config", str(study), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_tiny_tuned_study_produces_every_artefact(tmp_path: Path) -> None:
    result = _study(tmp_path, TUNED)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"report: {out / 'report.md'}" in result.stdout
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 2 * 2 * 2 + 2 * 2 * 2  # cells x trials, and each cell's best trial with 2 other seeds
    assert {(r["optimizer"], r["batch_size"]) for r in rows} == {("sgd", "32"), ("sgd", "128"), ("kfac", "32"),
                                                                 ("kfac", "128")}  # fmt: skip
    assert all(r["source"] in ("tuned", "repeat") and r["trial"] != "" for r in rows)
    _check_repeats(out, rows, result.stderr)
    _check_interim(tmp_path, rows)
    noise_measured = _check_rows_match_metrics(rows)
    assert any(r["reached"] == "True" for r in rows), "the target is easy: some run must reach it"
    assert noise_measured >= len(rows) // 2, "noise_every = 5: runs longer than 5 steps measure the noise scale"
    for name in ("steps_to_target.png", "best_lr.png", "final_accuracy.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert name in (out / "report.md").read_text()
    fits = json.loads((out / "fits.json").read_text())
    assert set(fits["fits"]) == {"sgd", "kfac"}
    # The table of every cell's best run on the terminal.
    assert "sgd" in result.stdout.lower() and "k-fac" in result.stdout.lower()
    assert sorted(p.name for p in (out / "configs").glob("*.toml")) == sorted(
        f"{cell}{kind}.toml"
        for cell in ("kfac-b128", "kfac-b32", "sgd-b128", "sgd-b32")
        for kind in ("", ".fisher", ".seed1001", ".seed1002")
    )  # each cell's config, and the configs of its best trial trained again with [fisher] and with 2 seeds
    assert not (out / "hpo_data" / "mongo-url").exists(), "the embedded server was stopped"
    _check_best_runs_diagnosed(out, rows)

    _check_step_costs_and_redraw(tmp_path, out, rows)
    # Other search ranges under the same space name: the study stops and says how to go on, instead of mixing.
    changed = _study(tmp_path, TUNED, space=SPACE.replace("high = 0.5", "high = 0.4"))
    assert changed.returncode == 1, changed.stderr[-4000:]
    assert "another space_definition" in changed.stderr and "settings changed" in changed.stderr, changed.stderr
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 16, "the results already written stay"


def _check_rows_match_metrics(rows: list[dict[str, str]]) -> int:
    """Each row's steps to target and gap agree with its metrics; the number of runs that measured the noise."""
    noise_measured = 0
    for row in rows:
        metrics = [json.loads(line) for line in Path(row["metrics_path"]).read_text().splitlines()]
        evals = [m for m in metrics if m["kind"] == "eval"]
        if row["reached"] == "True":
            first = next(m["step"] for m in evals if m["test_accuracy"] >= 0.6)
            assert int(row["steps_to_target"]) == first and int(row["examples_to_target"]) == first * int(
                row["batch_size"]
            )
        assert float(row["generalization_gap"]) == pytest.approx(
            float(row["train_accuracy"]) - float(row["val_accuracy"])
        )
        noise_measured += any("noise_trace" in m for m in metrics if m["kind"] == "step")
    return noise_measured


def _check_step_costs_and_redraw(tmp_path: Path, out: Path, rows: list[dict[str, str]]) -> None:
    """The step-cost benchmark, the study again (nothing retrained, a Cost section), and the report redrawn."""
    assert "No step costs measured: run `python -m benchmarks.step_cost" in (out / "report.md").read_text()
    # The step costs, measured by the benchmark (real jobs.train runs of each cell's config), then the study again:
    # the experiments are complete, so nothing is trained again, and the report gains its Cost section.
    costs = out / "step_cost.json"
    measure = [PYTHON, "-m", "benchmarks.step_cost", "--config", str(tmp_path / "study.toml"), "--steps", "12",
               "--warmup", "10", "--rounds", "1", "--out", str(costs)]  # fmt: skip
    measured = subprocess.run(measure, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert measured.returncode == 0, measured.stderr[-4000:]
    measured_costs = json.loads(costs.read_text())
    assert set(measured_costs["seconds_per_step"]) == {"sgd", "kfac"} and not partial_file(costs).exists()
    assert set(measured_costs["decomposition_seconds_per_step"]) == {"kfac"}  # measured again without them
    assert set(measured_costs["decomposition_seconds_per_step"]["kfac"]) == {"32", "128"}
    assert measured_costs["decomposition_speedup"]["1"] == 1.0 and set(measured_costs["decomposition_speedup"]) == {
        "1",
        "2",
        "4",
    }  # P up to 128 / 32
    assert set(measured_costs["communication_seconds_per_step"]["kfac"]) == {"1", "2", "4"}
    trained = {row["metrics_path"]: Path(row["metrics_path"]).stat().st_mtime_ns for row in rows}
    again = _study(tmp_path, TUNED)
    assert again.returncode == 0, again.stderr[-4000:]
    cost = (out / "report.md").read_text().split("## Cost")[1]
    assert "| optimizer | batch | steps to target | ms per step | of which decompositions (ms) |" in cost
    assert "fastest (lead over the next) |" in cost and "kfac's decompositions are " in cost
    assert "Communication is modelled, not measured" in cost
    assert (out / "cost_frontier.png").read_bytes()[:8] == PNG
    # The report drawn again from runs.csv and trials/*.json alone (python -m study report) is the same report.
    first = (out / "report.md").read_text()
    redrawn = subprocess.run([PYTHON, "-m", "study", "report", "--config", str(tmp_path / "study.toml"), "--out",
                              str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert redrawn.returncode == 0, redrawn.stderr[-4000:]
    assert (out / "report.md").read_text() == first
    assert [r["metrics_path"] for r in csv.DictReader((out / "runs.csv").open())] == list(trained)
    assert {path: Path(path).stat().st_mtime_ns for path in trained} == trained, "a finished trial ran again"


def _check_repeats(out: Path, rows: list[dict[str, str]], said: str) -> None:
    """tune.repeats: each cell's best trial trained again with seeds 1001 and 1002, every cell's first repeat before
    any cell's second, each in its own process with its own log; reported with intervals."""
    started = [line for line in said.splitlines() if line.endswith(": training") and " with seed " in line]
    assert [line.split(" with seed ")[1] for line in started] == ["1001: training"] * 4 + ["1002: training"] * 4
    logs = sorted(path.name for path in (out / "logs" / "repeats").iterdir())
    assert logs == sorted(f"{cell}.seed{seed}.log" for cell in ("sgd-b32", "sgd-b128", "kfac-b32", "kfac-b128")
                          for seed in (1001, 1002))  # fmt: skip
    for cell in ("sgd/b32", "sgd/b128", "kfac/b32", "kfac/b128"):
        tuned = [r for r in rows if r["cell"] == cell and r["source"] == "tuned"]
        repeats = [r for r in rows if r["cell"] == cell and r["source"] == "repeat"]
        assert len(repeats) == 2 and {r["trial"] for r in repeats} <= {r["trial"] for r in tuned}
        seeds = {
            json.loads(Path(r["metrics_path"]).with_name("config.json").read_text())["run"]["seed"] for r in repeats
        }
        assert seeds == {1001, 1002}, cell
    report = (out / "report.md").read_text()
    assert "## Uncertainty" in report and "best steps [resampled trials, 90%]" in report
    assert report.count("/2 |") == 4, "every cell's row says how many of its 2 repeats reached the target"
    curvature = report.split("## K-FAC: curvature or damping?")[1]  # the repeats' share, each run's last record
    assert "| 32 | – | 2 of 2 | " in curvature and "| 128 | – | 2 of 2 | " in curvature
    assert all(0 < float(r["curvature_share"]) < 1 for r in rows if r["optimizer"] == "kfac")
    assert all(r["curvature_share"] == "" for r in rows if r["optimizer"] == "sgd")


def _check_interim(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    """python -m study report --interim, the study not running: its own server started for the read; the search
    trials only, in out/interim/, under a heading that says so; the study's own report left as it was."""
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    command = [
        PYTHON,
        "-m",
        "study",
        "report",
        "--interim",
        "--config",
        str(tmp_path / "study.toml"),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    interim = list(csv.DictReader((out / "interim" / "runs.csv").open()))
    assert sorted((r["source"], r["metrics_path"]) for r in interim) == sorted(
        (r["source"], r["metrics_path"]) for r in rows
    ), "the search trials, and the repeats of the best settings that have ended: all of them"
    text = (out / "interim" / "report.md").read_text()
    assert text.startswith("# Batch-size scaling study: tiny (interim)\n\n**Interim, not a result.**"), text[:300]
    assert "from the 8 of 8 search trials finished so far" in text and "the 8 of 8 repeats" in text, text[:600]
    assert text.count("/2 |") == 4, "each cell's repeats, in the Uncertainty section"
    assert "Runs that reached the target stopped there" in text
    assert (out / "report.md").read_text() == report and not (out / "hpo_data" / "mongo-url").exists()


def _check_best_runs_diagnosed(out: Path, rows: list[dict[str, str]]) -> None:
    """[fisher] in a tuned study: each cell's best trial trained again with the records, to the same end."""
    report = (out / "fisher" / "fisher.md").read_text()
    assert "Figure 6" in report and "| claim | verdict | numbers |" in report
    for cell in ("sgd-b32", "sgd-b128", "kfac-b32", "kfac-b128"):
        replay = out / "fisher" / "runs" / cell
        records = [json.loads(line) for line in (replay / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((replay / "summary.json").read_text())
        fisher_steps = [r["step"] for r in records if r["kind"] == "fisher"]
        assert fisher_steps == list(range(5, summary["steps"] + 1, 5)), cell
        trials = [r for r in rows if r["cell"] == cell.replace("-", "/")]
        assert any(
            abs(summary["test_accuracy"] - float(r["val_accuracy"])) <= 2 / 256 and summary["steps"] == int(r["steps"])
            for r in trials
        ), f"{cell}: the replay of the best trial ends where a trial of the cell ended"


GIVEN = """
[study]
name = "skip"
base_config = "{base}"
optimizers = ["sgd", "kfac"]
batch_sizes = [64, 256]
max_steps = 12
eval_every_steps = 4
top_k = 1
overrides = [
    "data.train_examples=1024", "data.test_examples=512", "run.train_eval_examples=512", "model.hidden=[32, 32]",
]
[study.variants]
plain = ["model.residual=false"]
residual = ["model.residual=true"]
[given.sgd]
"optim.lr" = 0.05
[given.kfac]
"optim.lr" = 0.05
"optim.momentum" = 0.5
"""


def test_given_study_with_variants_on_real_mnist_continues_where_it_stopped(tmp_path: Path) -> None:
    text = GIVEN.format(base=ROOT / "jobs" / "configs" / "mnist_linear_mlp.toml")
    result = _study(tmp_path, text)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 2 * 2 * 2 and {r["variant"] for r in rows} == {"plain", "residual"}
    assert all(r["source"] == "given" and int(r["steps"]) == 12 for r in rows)
    assert all(r["reached"] == "False" and r["steps_to_target"] == "" for r in rows)  # no target: the budget only
    residual = json.loads((out / "runs" / "residual-kfac-b64" / "config.json").read_text())
    assert residual["model"]["residual"] is True and residual["optim"]["lr"] == 0.05
    report = (out / "report.md").read_text()
    assert "plain" in report and "residual" in report  # the skip-connection study's tables
    curvature = report.split("## K-FAC: curvature or damping?")[1]  # a column for the variant
    assert "| variant | batch |" in curvature and "| plain | 64 | – | 1 of 1 |" in curvature

    # A study stopped half-way: remove two runs' results; only those two are trained again.
    for cell in ("plain-sgd-b64", "residual-kfac-b256"):
        (out / "runs" / cell / "summary.json").unlink()
    again = _study(tmp_path, text)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("done before") == 6 and again.stderr.count(": training") == 2

    # A given value changed: SGD's finished runs are of another configuration now. They are trained again, and the
    # old runs are moved aside, not reused as the new value's result and not deleted.
    changed = _study(tmp_path, text.replace('[given.sgd]\n"optim.lr" = 0.05', '[given.sgd]\n"optim.lr" = 0.04'))
    assert changed.returncode == 0, changed.stderr[-4000:]
    assert changed.stderr.count("done before") == 4 and changed.stderr.count(": training") == 4
    assert changed.stderr.count("held a run of another configuration (optim.lr: checkpoint 0.05, now 0.04)") == 4
    for cell in ("plain-sgd-b64", "residual-sgd-b256"):
        assert json.loads((out / "runs" / cell / "config.json").read_text())["optim"]["lr"] == 0.04
        aside = out / "runs" / f"{cell}.superseded1"
        assert json.loads((aside / "config.json").read_text())["optim"]["lr"] == 0.05
        assert (aside / "summary.json").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('optimizers = ["sgd", "kfac"]', 'optimizers = ["sgd", "lamb"]'), "unknown optimizer 'lamb'"),
        (("batch_sizes = [32, 128]", "batch_sizes = []"), "study.batch_sizes: must be a non-empty list"),
        (("target_accuracy = 0.6", "target_accuracy = 1.5"), "1.5 cannot be reached"),
        (("eval_every_steps = 5", "eval_every_steps = 0"), "a target accuracy needs evaluations every N steps"),
        (('base_config = "base.toml"', 'base_config = "nope.toml"'), "nope.toml does not exist"),
        (("max_steps = 40", "max_stepz = 40"), "[study] max_stepz: unknown key"),
        (("[tune]", '[given.sgd]\n"optim.lr" = 0.1\n[tune]'), "either tunes ([tune]) or takes given values"),
        (('overrides = ["run.train_eval_examples=256"]', 'overrides = ["optim.lrr=1"]'), "unknown key 'optim.lrr'"),
        (("workers = 2\n", 'workers = 2\npruner = { name = "asha", reduction_factor = 1 }\n'),
         "tune.pruner: ASHA's reduction factor must be an integer of at least 2"),
        (("workers = 2\n", 'workers = 2\npruner = { name = "median" }\n'),
         "tune.pruner: the median pruner needs warm-up steps"),
        (("workers = 2\n", 'workers = 2\nobjective = "test_loss"\npruner = { name = "none", behind_best = true }\n'),
         "tune.pruner: the behind-best stop needs the steps_to_target objective"),
        (("workers = 2\n", 'workers = 2\npruner = { behind_best = "yes" }\n'),
         "tune.pruner: behind_best must be true or false, not 'yes'"),
        (("workers = 2\n", "workers = 2\npruner = { threshold_after = 0.2 }\n"),
         "tune.pruner: threshold_after needs a threshold (--prune-threshold): give both, or neither"),
        (("workers = 2\n", 'workers = 2\npending = "often"\n'), "tune.pending: 'often' is not one of worst, mean"),
        (("workers = 2\n", 'workers = 2\nwarm_start = { sgd = "nope.toml" }\n'), "nope.toml does not exist"),
    ],
)  # fmt: skip
def test_bad_study_files_fail_before_any_training(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    assert change[0] in TUNED
    result = _study(tmp_path, TUNED.replace(*change), timeout=60)  # bounded: a hang fails the test
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written or trained"


BUDGET = """
[study]
name = "budget"
base_config = "base.toml"
optimizers = ["kfac"]
batch_sizes = [32]
max_steps = 30
eval_every_steps = 5
seeds = [0, 1]
overrides = ["run.train_eval_examples=256", "kfac.kl_clip=0"]
[tune]
trials = 2
workers = 1
objective = "best_test_error"
spaces = { kfac = "space.toml" }
"""


def test_fixed_budget_study_trains_every_step_and_ranks_by_the_best_evaluation(tmp_path: Path) -> None:
    result = _study(tmp_path, BUDGET)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert sorted((r["seed"], r["cell"]) for r in rows) == [("0", "kfac/b32/s0")] * 2 + [("1", "kfac/b32/s1")] * 2
    for row in rows:
        assert int(row["steps"]) == 30, "no target: every run trains its whole budget"
        evals = [m for m in map(json.loads, Path(row["metrics_path"]).read_text().splitlines()) if m["kind"] == "eval"]
        best = max(evals, key=lambda m: m["test_accuracy"])
        assert [m["step"] for m in evals] == [5, 10, 15, 20, 25, 30]
        assert float(row["best_val_accuracy"]) == best["test_accuracy"]
        assert int(row["best_val_step"]) == min(m["step"] for m in evals if m["test_accuracy"] == best["test_accuracy"])
        trial = json.loads((out / "trials" / f"{row['cell'].replace('/', '-')}.json").read_text())
        losses = {t["tid"]: t["result"]["loss"] for t in trial}
        assert losses[int(row["trial"])] == pytest.approx(1 - float(row["best_val_accuracy"]))
        assert row["kl_clipped_fraction"] == "", "kl_clip = 0: nothing is clipped, nothing reported"
    report = (out / "report.md").read_text()
    top = max(float(r["best_val_accuracy"]) for r in rows)
    assert "## Best validation accuracy within the budget" in report and f"| {top:.4f} |" in report
    assert "Every run trained its whole budget." in report
    assert "| – | 32 | 4 | off | – |" in report  # the KL-clip section: the clip was off in every K-FAC run


SEARCH = """
[study]
name = "search"
base_config = "base.toml"
optimizers = ["sgd"]
batch_sizes = [32, 128]
target_accuracy = 0.6
max_steps = 40
eval_every_steps = 5
[tune]
trials = 3
workers = 1
spaces = { sgd = "space.toml" }
pending = "mean"
pruner = { name = "median", warmup_steps = 10, behind_best = true, threshold = 1.6, threshold_after = 0.5 }
warm_start = { sgd = "points.toml" }
seed_from_neighbour = true
"""


def test_study_search_keys_reach_the_drivers_and_cells_start_from_their_neighbours_best(tmp_path: Path) -> None:
    (tmp_path / "points.toml").write_text('[[points]]\n"optim.lr" = 0.1\n')
    result = _study(tmp_path, SEARCH)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stderr[-4000:]
    for cell in ("sgd-b32", "sgd-b128"):
        log = (out / "logs" / f"driver-{cell}.log").read_text()
        assert "pending trials told 'mean', pruner median" in log, log
        header = log.splitlines()[0]  # the driver's command line
        assert " --prune-behind-best --prune-threshold 1.6 --prune-threshold-after 0.5" in header, log
    small, large = (json.loads((out / "trials" / f"sgd-b{b}.json").read_text()) for b in (32, 128))
    best = min((t for t in small if t["result"].get("status") == "ok"), key=lambda t: t["result"]["loss"])
    # b32 starts from the given point; b128 from it and from b32's best, queued first, after b32 was tuned
    assert small[0]["params"] == {"optim.lr": 0.1}
    assert [t["params"] for t in large[:2]] == [{"optim.lr": 0.1}, best["params"]] or (
        best["params"] == {"optim.lr": 0.1} and large[0]["params"] == best["params"]
    )
    assert min(t["book_time"] for t in large) >= max(t["refresh_time"] for t in small)
    assert "starts from the best point of cell sgd/b32" in result.stderr, result.stderr[-3000:]
    assert (out / "warm_start" / "sgd-b128.toml").read_text().count("[[points]]") in (1, 2)
