"""``python -m study fisher`` end to end on real MNIST: every run records the Fisher spectrum at each epoch's end
with every example's projection saved, the report puts the paper's Figure 6 beside ours with a verdict per claim,
a second run trains nothing, and bad study files fail before any training. About 30 s."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch

from jobs.diagnostics import load_fisher_values
from tests.processes import ENV, PYTHON, ROOT

BASE = """
[model]
name = "mlp"
hidden = [32, 16]
[data]
name = "mnist"
batch_size = 16
train_examples = 512
test_examples = 512
[optim]
name = "sgd"
lr = 0.05
[run]
eval_every = 1
checkpoint_every = 0
tensorboard = false
"""

STUDY = """
[study]
name = "fisher-tiny"
base_config = "base.toml"
optimizers = ["sgd"]
batch_sizes = [16, 256]
max_epochs = 3
seeds = [0, 1]
[given.sgd]
"optim.lr" = 0.05
[fisher]
every_epochs = 1
layer = "5"
"""
PNG = b"\x89PNG\r\n\x1a\n"


def _fisher_study(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "study.toml").write_text(text)
    command = [
        PYTHON,
        "-m",
        "study",
        "fisher",
        "--config",
        str(tmp_path / "study.toml"),
        "--out",
        str(tmp_path / "out"),
    ]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_fisher_study_records_every_epoch_reports_the_figures_and_resumes(tmp_path: Path) -> None:
    result = _fisher_study(tmp_path, STUDY)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader((out / "fisher.csv").open()))
    assert len(rows) == 2 * 2 * 3  # batch sizes x seeds x epochs
    for row in rows:  # a record at the end of each epoch: 512 / batch steps per epoch
        assert int(row["step"]) == int(row["epoch"]) * 512 // int(row["batch_size"])
        assert float(row["fisher_trimmed_fixed"]) <= float(row["fisher_top"])
    for run in (out / "runs").iterdir():
        values = load_fisher_values(run)
        assert [v["epoch"] for v in values] == [1, 2, 3] and all(len(v["projection"]) == 512 for v in values)
        mine = [r for r in rows if r["batch_size"] == run.name.split("-")[1][1:] and r["seed"] == run.name[-1]]
        for saved, row in zip(values, sorted(mine, key=lambda r: int(r["epoch"])), strict=True):
            # lambda_1 = mean(a_i^2): the saved projections are those of the recorded top eigenvector.
            assert float((saved["projection"].double() ** 2).mean()) == pytest.approx(
                float(row["fisher_top"]), rel=1e-3
            )
            assert torch.all(saved["norm"] >= saved["projection"].abs() - 1e-5)  # |v . g| <= |g| for a unit v
    report = (out / "fisher.md").read_text()
    assert "| MNIST | 16 | best |" in report and "0.3659" in report and "2.063" in report  # the paper's values
    assert report.count("| 4. outliers") == 4 and "| 3a. " in report
    for name in ("fisher_hist_b16.png", "fisher_hist_best.png", "fisher_outliers.png", "fisher_eigenvalue.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert name in report

    written = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.jsonl")}
    again = _fisher_study(tmp_path, STUDY)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("done before (finished)") == 4
    assert {p: p.stat().st_mtime_ns for p in written} == written, "a finished run was trained again"
    assert list(csv.DictReader((out / "fisher.csv").open())) == rows


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('[fisher]\nevery_epochs = 1\nlayer = "5"\n', ""), "needs a study with given values ([given]) and a [fisher]"),
        (('layer = "5"', 'layer = "4"'), "fisher.layer = '4' is not a layer of cell sgd/b16/s0's model: choose one of"),
        (("every_epochs = 1", "every_epochs = 0"), "a [fisher] table needs every_epochs or every_steps >= 1"),
        (("every_epochs = 1", "every_epoch = 1"), "[fisher] every_epoch: unknown key"),
        (("every_epochs = 1", "every_epochs = 1\ntrim = 1.5"), "run.fisher_trim must be a fraction in [0, 1)"),
    ],
)
def test_bad_fisher_studies_fail_before_any_training(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    result = _fisher_study(tmp_path, STUDY.replace(*change))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "runs").exists()
