"""The papers' protocol options in jobs: the KL clip on and off, the fixed-budget objective, step decay every e
epochs, Chainer's momentum form, study seeds with standard errors, and the two paper configs (loaded, not trained)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from distkfac.momentum import ChainerMomentumSGD
from jobs.config import ConfigError, OptimConfig, load_config
from jobs.loop import run_training
from jobs.metrics import read_metrics
from jobs.optim import make_lr_schedule
from jobs.parallel import SingleContext
from study.config import StudyError, check_cells, load_study
from study.report import top_k_seed_means, write_report
from tests.processes import ENV, PYTHON, ROOT

BASE = """
[model]
name = "mlp"
hidden = [12]
[data]
name = "synthetic"
batch_size = 32
synthetic_shape = [6]
synthetic_classes = 3
synthetic_train_size = 256
synthetic_test_size = 128
[optim]
name = "kfac"
lr = 0.05
momentum = 0.9
[kfac]
inv_update_steps = 2
[run]
steps = 12
eval_every = 0
eval_every_steps = 3
tensorboard = false
progress = false
train_eval_examples = 128
"""


def _train(tmp_path: Path, name: str, *overrides: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    (tmp_path / "base.toml").write_text(BASE)
    config = load_config(tmp_path / "base.toml", [f"run.out_dir='{tmp_path / name}'", *overrides])
    summary = run_training(config, SingleContext(), log=lambda message: None)
    checkpoint = torch.load(tmp_path / name / "checkpoints" / "ckpt-step00000012.pt", weights_only=True)
    return checkpoint["model"], summary.__dict__


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_without_the_clip_the_learning_rate_matters_and_nothing_is_reported_clipped(tmp_path: Path) -> None:
    slow, summary = _train(tmp_path, "slow", "kfac.kl_clip=0", "optim.lr=0.01")
    fast, _ = _train(tmp_path, "fast", "kfac.kl_clip=0", "optim.lr=0.04")
    assert _max_difference(slow, fast) > 1e-3
    assert summary["kl_clipped_fraction"] is None
    assert not any("kl_scale" in r for r in read_metrics(tmp_path / "slow"))


def test_under_a_tiny_clip_the_learning_rate_has_no_effect_and_every_step_says_clipped(tmp_path: Path) -> None:
    slow, summary = _train(tmp_path, "slow", "kfac.kl_clip=1e-9", "optim.lr=0.01")
    fast, _ = _train(tmp_path, "fast", "kfac.kl_clip=1e-9", "optim.lr=0.04")
    # The clipped update is sqrt(kl_clip / <V, grad>) V whatever the lr: the same trajectory up to rounding.
    assert _max_difference(slow, fast) < 1e-5
    steps = [r for r in read_metrics(tmp_path / "slow") if r["kind"] == "step"]
    assert len(steps) == 12 and all(r["kl_clipped"] and 0 < r["kl_scale"] < 1 for r in steps)
    assert summary["kl_clipped_fraction"] == 1.0
    # A generous clip is never active: nu = 1 on every step.
    _, loose = _train(tmp_path, "loose", "kfac.kl_clip=1e6")
    assert loose["kl_clipped_fraction"] == 0.0
    assert all(r["kl_scale"] == 1.0 for r in read_metrics(tmp_path / "loose") if r["kind"] == "step")


def test_a_run_reports_its_best_evaluation_and_where_it_was(tmp_path: Path) -> None:
    _, summary = _train(tmp_path, "run", "kfac.kl_clip=0")
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 9, 12] and summary["steps"] == 12
    best = max(evals, key=lambda r: r["test_accuracy"])
    assert summary["best_test_accuracy"] == best["test_accuracy"]
    assert summary["best_test_step"] == min(r["step"] for r in evals if r["test_accuracy"] == best["test_accuracy"])


def test_step_decay_every_e_epochs_as_chainer_exponential_shift() -> None:
    config = OptimConfig(lr=0.1, schedule="step", decay_every=3, gamma=0.5)
    schedule = make_lr_schedule(config, steps_per_epoch=10, total_steps=100, global_batch=128)
    assert [schedule(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.0125])
    with pytest.raises(ConfigError, match="not both"):
        load_config(ROOT / "jobs/configs/cifar10_lenet.toml", ["optim.decay_every=10"])  # it has milestones = [50]


def test_chainer_momentum_keeps_the_step_and_differs_from_torch_only_when_the_lr_changes() -> None:
    torch.manual_seed(0)
    start = torch.randn(5)
    grads = [torch.randn(5) for _ in range(6)]
    rates = [0.1, 0.1, 0.1, 0.02, 0.02, 0.02]

    def run(kind: str, lrs: list[float]) -> torch.Tensor:
        w = torch.nn.Parameter(start.clone())
        opt: torch.optim.Optimizer = (
            ChainerMomentumSGD([w], lr=lrs[0], momentum=0.9, weight_decay=0.01)
            if kind == "chainer" else torch.optim.SGD([w], lr=lrs[0], momentum=0.9, weight_decay=0.01)
        )  # fmt: skip
        for g, lr in zip(grads, lrs, strict=True):
            opt.param_groups[0]["lr"] = lr
            w.grad = g.clone()
            opt.step()
        return w.detach()

    # By hand: v = 0.9 v - lr (g + 0.01 w); w = w + v.
    w, v = start.clone(), torch.zeros(5)
    for g, lr in zip(grads, rates, strict=True):
        v = 0.9 * v - lr * (g + 0.01 * w)
        w = w + v
    torch.testing.assert_close(run("chainer", rates), w)
    torch.testing.assert_close(run("chainer", [0.1] * 6), run("torch", [0.1] * 6))
    assert float((run("chainer", rates) - run("torch", rates)).abs().max()) > 1e-3


def test_study_seeds_give_standard_errors_and_paired_differences(tmp_path: Path) -> None:
    runs: list[dict[str, object]] = []
    for seed, (plain_accuracy, residual_accuracy) in enumerate([(0.90, 0.92), (0.91, 0.92), (0.89, 0.93)]):
        for variant, accuracy in (("plain", plain_accuracy), ("residual", residual_accuracy)):
            for extra in (0.0, -0.05):  # the second run of each seed is outside the top 1
                runs.append({"variant": variant, "optimizer": "kfac", "batch_size": 256, "seed": seed,
                             "train_accuracy": accuracy + extra, "val_accuracy": accuracy + extra})  # fmt: skip
    means = top_k_seed_means(runs, k=1)
    plain = means[("plain", "kfac", 256)]
    assert plain["val_accuracy_mean"] == pytest.approx(0.90)
    assert plain["val_accuracy_se"] == pytest.approx(0.01 / math.sqrt(3))
    report = write_report(tmp_path, runs, "seeds", top_k=1).read_text()
    # Differences paired by seed: 0.02, 0.01, 0.04 -> +2.33 ± 0.88 points.
    assert "+2.33 ± 0.88" in report and "90.00% ± 0.58 (3 seeds, n=1)" in report


def test_the_report_gives_the_clipped_fraction_and_the_best_in_budget_table(tmp_path: Path) -> None:
    common = {"variant": "", "batch_size": 128, "train_accuracy": 0.5, "val_accuracy": 0.5}
    runs = [
        {**common, "optimizer": "kfac", "kl_clipped_fraction": 0.9, "best_val_accuracy": 0.61, "best_val_step": 40,
         "hparams": json.dumps({"optim.lr": 0.01})},
        {**common, "optimizer": "kfac", "kl_clipped_fraction": 0.1, "best_val_accuracy": 0.64, "best_val_step": 70,
         "hparams": json.dumps({"optim.lr": 0.002})},
        {**common, "optimizer": "sgd", "best_val_accuracy": 0.7, "best_val_step": 90, "hparams": "{}"},
    ]  # fmt: skip
    report = write_report(tmp_path, runs, "budget").read_text()
    assert "| 128 | 2 | 50.00% | 1 of 2 |" in report
    assert "| K-FAC | 128 | 0.6400 | 70 | 2 | lr=0.002 |" in report


@pytest.mark.parametrize(
    "name", ["skip_mnist_paper.toml", "skip_mnist_repro.toml", "lenet_cifar10_paper.toml", "lenet_cifar10_repro.toml"]
)
def test_paper_configs_load_and_every_cell_validates(name: str) -> None:
    path = ROOT / "jobs/configs/studies" / name
    study = load_study(path)
    result = subprocess.run(
        [PYTHON, "-m", "study", "scaling", "--config", str(path), "--check"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{len(study.cells())} cells, all configs valid" in result.stdout
    for cell in study.cells():
        assert f"run.seed={cell.seed}" in cell.overrides if cell.seed is not None else True
        if cell.optimizer == "kfac":
            config = load_config(study.base_config, cell.overrides)
            assert config.kfac.kl_clip == 0, "neither paper clips K-FAC's update"


def test_paper_adam_space_searches_beta1_and_keeps_beta2_and_eps_fixed() -> None:
    from hpo_worker.spaces import load_space

    space = load_space(ROOT / "jobs/configs/studies/spaces/paper002_adam.toml")
    assert space.labels == ["optim.lr", "optim.gamma", "optim.decay_every", "optim.betas"]
    overrides = space.to_overrides(
        {"optim.lr": 1e-3, "optim.gamma": 0.5, "optim.decay_every": 3.0, "optim.betas": 0.87}
    )
    assert "optim.betas=[0.87, 0.999]" in overrides and "optim.eps=1e-08" in overrides
    assert "optim.weight_decay=0.0" in overrides and "optim.decay_every=3" in overrides
    config = load_config(ROOT / "jobs/configs/cifar10_lenet.toml", overrides)
    assert config.optim.betas == [0.87, 0.999] and config.optim.milestones == []


def test_fixed_budget_objective_needs_evaluations_and_no_target(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(BASE)
    text = (
        '[study]\nbase_config = "base.toml"\noptimizers = ["sgd"]\nbatch_sizes = [32]\nmax_steps = 10\n'
        '{extra}[tune]\ntrials = 2\nobjective = "best_test_error"\n'
    )
    (tmp_path / "s.toml").write_text(text.format(extra="target_accuracy = 0.5\neval_every_steps = 5\n"))
    with pytest.raises(StudyError, match=r"best_test_error .* remove study\.target_accuracy"):
        load_study(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(text.format(extra=""))  # the base config evaluates only at the end
    with pytest.raises(StudyError, match="best_test_error needs evaluations during the run"):
        check_cells(load_study(tmp_path / "s.toml"))
    (tmp_path / "s.toml").write_text(text.format(extra="eval_every_steps = 5\nseeds = [0, 0]\n"))
    with pytest.raises(StudyError, match=r"study\.seeds"):
        load_study(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(text.format(extra="eval_every_steps = 5\nseeds = [3, 4]\n"))
    cells = load_study(tmp_path / "s.toml").cells()
    assert [c.name for c in cells] == ["sgd/b32/s3", "sgd/b32/s4"] and "run.seed=4" in cells[1].overrides
