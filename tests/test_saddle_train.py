"""Seed 004 through jobs.train and python -m study saddle: full-batch gradient descent on the rank-3 teacher shows
three plateaus and drops (rank k after the k-th) with aligned units, plateaus grow as log(1/scale) at Theorem 1's
rate, plateau skipping gains more as the scale shrinks, layer-wise gradient descent moves one layer per step in its
order, a skipping run resumes to the same losses, the study runs, resumes and reports, and bad input is refused."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from distkfac.saddle_optim import LAYER_ORDERS, LayerwiseGD
from jobs import optimizers
from jobs.config import ConfigError, load_config
from jobs.loop import run_training
from jobs.metrics import read_metrics
from jobs.parallel import SingleContext
from study.config import StudyError
from study.saddle import load_saddle_study, run_saddle_study
from study.saddle_report import slope_fit
from tests.processes import ENV, PYTHON, ROOT

TEACHER = ROOT / "jobs" / "configs" / "saddle_teacher.toml"


def _train(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    config = load_config(TEACHER, [f"run.out_dir='{tmp_path / name}'", *overrides])
    run_training(config, SingleContext(), log=lambda message: None)
    return read_metrics(tmp_path / name)


def _readings(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "dynamics"]


def _phases(records: list[dict]) -> list[dict]:
    return next(r["phases"] for r in records if r["kind"] == "phases")


def _steps_to(records: list[dict], fraction: float) -> int:
    readings = _readings(records)
    return next(r["step"] for r in readings if r["loss"] <= fraction * readings[0]["loss"])


def _rank_before(records: list[dict], step: int) -> int:
    return max((r for r in _readings(records) if r["step"] < step), key=lambda r: r["step"])["product_rank"]


def test_gradient_descent_from_1e4_learns_the_teacher_in_three_plateaus_and_drops(tmp_path: Path) -> None:
    records = _train(tmp_path, "gd", "run.steps=250")
    phases = _phases(records)
    pairs = [(a, b) for a, b in itertools.pairwise(phases) if (a["kind"], b["kind"]) == ("plateau", "drop")]
    assert len(pairs) == 3  # a converged tail may follow as a last plateau: it has no drop after it
    assert [_rank_before(records, drop["stop"]) for _, drop in pairs] == [1, 2, 3]
    first_plateau = [r for r in _readings(records) if r["step"] < pairs[0][0]["stop"]]
    assert first_plateau[0]["alignment_median"] > 1  # random units at the start
    assert min(r["alignment_median"] for r in first_plateau) < 0.1  # turned towards Lemma 1's top direction
    summary = json.loads((tmp_path / "gd" / "summary.json").read_text())
    assert summary["test_accuracy"] is None and summary["test_loss"] < 1e-3  # a regression: no accuracy


def test_the_first_plateau_grows_linearly_in_log_inverse_scale_at_theorem_1s_rate(tmp_path: Path) -> None:
    scales = (1e-2, 1e-4, 1e-6)
    lengths = [
        _phases(_train(tmp_path, f"s{s:g}", f"model.init_scale={s}", "run.steps=120"))[0]["stop"] for s in scales
    ]
    slope, _, r2 = slope_fit(scales, lengths)
    predicted = 1 / math.log1p(0.05 * 4.0)  # |w| grows by 1 + eta s_1 per step; s_1 = 4 on the whitened teacher
    assert r2 > 0.98 and abs(slope - predicted) < 0.1 * predicted, (lengths, slope, predicted)


def test_plateau_skipping_gains_more_as_the_scale_shrinks(tmp_path: Path) -> None:
    """Measured here: to 1e-3 of the initial loss, strength 1 is 1.9, 2.8 and 5.9 times faster than gradient descent
    at 1e-2, 1e-4 and 1e-6 (seed 0; the study has five seeds). The issue's 3 times at 1e-4 is not reached."""
    ratios = []
    for scale in (1e-2, 1e-4, 1e-6):
        plain = _steps_to(_train(tmp_path, f"gd{scale:g}", f"model.init_scale={scale}"), 1e-3)
        skip = _train(
            tmp_path, f"sk{scale:g}", f"model.init_scale={scale}", "optim.name=skip_gd", "optim.skip_strength=1"
        )
        assert next(r["step"] for r in skip if r["kind"] == "step" and r.get("skipped")) == 1  # the first step skips
        ratios.append(plain / _steps_to(skip, 1e-3))
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] > 3, ratios


def test_a_stopped_skipping_run_resumes_to_the_same_losses(tmp_path: Path) -> None:
    common = ("optim.name=skip_gd", "run.steps=60", "model.init_scale=1e-6")
    whole = _readings(_train(tmp_path, "whole", *common))
    _train(tmp_path, "parts", *common, "run.checkpoint_every=20", "run.stop_after_steps=20")
    parts = _readings(_train(tmp_path, "parts", *common, "run.checkpoint_every=20", "run.resume=true"))
    assert [r["loss"] for r in parts] == [r["loss"] for r in whole]  # the skips' counters are in the checkpoint


def test_layerwise_gradient_descent_moves_one_layer_per_step_in_its_order() -> None:
    assert LAYER_ORDERS == optimizers.LAYER_ORDERS
    for order, expected in (("forward", [0, 1, 2, 0]), ("backward", [2, 1, 0, 2])):
        layers = [nn.Linear(3, 3, bias=False) for _ in range(3)]
        optimizer = LayerwiseGD([list(layer.parameters()) for layer in layers], lr=0.1, order=order)
        moved = []
        for _ in range(4):
            for layer in layers:
                layer.weight.grad = torch.ones_like(layer.weight)
            before = [layer.weight.clone() for layer in layers]
            optimizer.step()
            moved.append([i for i, layer in enumerate(layers) if not torch.equal(layer.weight, before[i])])
        assert moved == [[i] for i in expected]
    with pytest.raises(ValueError, match="unknown order 'sideways'"):
        LayerwiseGD([list(layers[0].parameters())], lr=0.1, order="sideways")


def test_layerwise_gradient_descent_on_a_deeper_network_shows_the_plateaus(tmp_path: Path) -> None:
    records = _train(tmp_path, "deep", "model.hidden=[10, 10]", "optim.name=layerwise_gd", "model.init_scale=0.03",
                     "optim.lr=0.1", "run.steps=500", "run.dynamics_every=5")  # fmt: skip
    phases = _phases(records)
    drops = [b for a, b in itertools.pairwise(phases) if (a["kind"], b["kind"]) == ("plateau", "drop")]
    assert [_rank_before(records, drop["stop"]) for drop in drops] == [1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.name=layerwise_gd", "optim.layer_order=sideways"], "optim.layer_order = 'sideways' is not known"),
        (["model.init_scale=-1e-4"], "model.init_scale = -0.0001: give a positive standard deviation"),
        (["optim.name=skip_gd", "model.bias=true"], "skip_gd' trains W2 sigma"),
        (["optim.name=skip_gd", "model.hidden=[4, 4]"], "skip_gd' trains W2 sigma"),
        (["run.loss=cross_entropy"], "teacher' is a regression"),
        (["run.loss=l1"], "run.loss = 'l1' is not known"),
        (["data.teacher_singular_values=[3, 2, 1, 1, 1, 1, 1]"], "has rank at most 6"),
        (["data.synthetic_train_size=4"], "needs at least as many training examples"),
        (["run.rank_threshold=1.5"], "run.rank_threshold in \\(0, 1\\)"),
    ],
)
def test_bad_saddle_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TEACHER, overrides)


STUDY = """
[study]
name = "tiny"
scales = [1e-2, 1e-4]
seeds = [0, 1]
[cases.teacher]
config = "{teacher}"
overrides = ["run.steps=150"]
target_fraction = 1e-3
[methods.gd]
overrides = ["optim.name=gd"]
[methods.skip]
overrides = ["optim.name=skip_gd", "optim.skip_strength=1"]
"""


def test_the_study_runs_resumes_and_reports(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY.format(teacher=TEACHER))
    study = load_saddle_study(tmp_path / "study.toml", out_dir=tmp_path / "out")
    report = run_saddle_study(study)
    text = report.read_text()
    assert "| 0.0001 |" in text and "gd / skip" in text and "Theorem 1's" in text
    rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and all(",," not in row.split(",", 5)[4] for row in rows[1:])  # steps to target
    summary = tmp_path / "out" / "teacher" / "gd" / "scale0.0001" / "seed1" / "summary.json"
    before = summary.stat().st_mtime_ns
    run_saddle_study(study)
    assert summary.stat().st_mtime_ns == before  # finished runs are not run again


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("scales = [1e-2, 1e-4]", "scales = [1e-2, 0]"), "study.scales: a non-empty list of positive initial scales"),
        (('"optim.name=gd"', '"optim.name=gdx"'), "method gd: optim.name = 'gdx' is not known"),
        (("target_fraction = 1e-3", "target_fraction = 2"), "target_fraction: a fraction of the initial loss"),
        (("target_fraction = 1e-3", 'target_fraction = 1e-3\nmethods = ["sgd"]'), "cases.teacher.methods: some of"),
    ],
)
def test_bad_study_files_are_refused(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    (tmp_path / "study.toml").write_text(STUDY.format(teacher=TEACHER).replace(*change))
    with pytest.raises(StudyError, match=message):
        load_saddle_study(tmp_path / "study.toml")


def test_the_command_checks_the_shipped_study_and_refuses_unknown_cases() -> None:
    study = ROOT / "jobs" / "configs" / "studies" / "saddle.toml"
    ok = subprocess.run([PYTHON, "-m", "study", "saddle", "--config", str(study), "--check"], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0 and "270 runs, all configs valid" in ok.stdout, ok.stderr
    bad = subprocess.run([PYTHON, "-m", "study", "saddle", "--config", str(study), "--cases", "cifar", "--check"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--cases: ['cifar'] not in" in bad.stderr
