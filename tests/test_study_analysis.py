"""study analysis: the critical-batch fit, the gradient noise scale and the study report, on synthetic data."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jobs.noise_scale import NoiseScaleEstimator, b_simple_from_norms, noise_estimates, squared_grad_norm
from study.fit import ScalingFit, fit_steps_to_target
from study.report import (
    PLOTS,
    RUN_COLUMNS,
    best_runs,
    compute_fits,
    format_table,
    top_k_means,
    write_csv,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BATCHES = [64, 128, 256, 512, 1024, 2048, 4096, 8192]


# ------------------------------------------------------------------------------------------------------------ fit


def _steps(s_min: float, b_crit: float, batches: list[int]) -> list[float]:
    return [s_min * (1 + b_crit / b) for b in batches]


def test_fit_recovers_exact_points() -> None:
    fit = fit_steps_to_target(BATCHES, _steps(200.0, 1000.0, BATCHES))
    assert fit.s_min == pytest.approx(200.0, rel=1e-6)
    assert fit.b_crit == pytest.approx(1000.0, rel=1e-6)
    assert fit.points == len(BATCHES)
    assert fit.rms_log_residual < 1e-8
    assert fit.predict(1000) == pytest.approx(400.0, rel=1e-6)
    assert np.allclose(fit.predict(np.array([64.0, 8192.0])), _steps(200.0, 1000.0, [64, 8192]), rtol=1e-6)


def test_fit_recovers_noisy_points_within_ten_percent() -> None:
    rng = np.random.default_rng(0)
    batches = BATCHES * 2  # two runs per batch size: repeated batch sizes are allowed
    steps = np.array(_steps(200.0, 1000.0, batches)) * np.exp(rng.normal(0.0, 0.05, len(batches)))
    fit = fit_steps_to_target(batches, list(steps))
    assert fit.s_min == pytest.approx(200.0, rel=0.10)
    assert fit.b_crit == pytest.approx(1000.0, rel=0.10)
    assert 0.02 < fit.rms_log_residual < 0.08  # ~ the 5% noise that was put in


def test_fit_is_not_dominated_by_the_small_batches() -> None:
    """A 2x outlier at the smallest batch must not drag S_min (the large-batch plateau) with it, as a linear fit of S
    against 1/B would."""
    steps = _steps(200.0, 1000.0, BATCHES)
    steps[0] *= 2.0
    fit = fit_steps_to_target(BATCHES, steps)
    assert fit.s_min == pytest.approx(200.0, rel=0.25)


def test_fit_errors() -> None:
    with pytest.raises(ValueError, match=r"2 distinct batch sizes.*run more batch sizes"):
        fit_steps_to_target([256, 256, 256], [100.0, 110.0, 90.0])
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        fit_steps_to_target([64, 128, 256], [400.0, None, float("nan")])
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        fit_steps_to_target([], [])
    with pytest.raises(ValueError, match="one per run"):
        fit_steps_to_target([64, 128], [1.0])


def test_fit_with_no_knee_stays_finite() -> None:
    """Perfect scaling throughout (B_crit far above the data): a finite, large B_crit, not an overflow."""
    fit = fit_steps_to_target([64, 128, 256], [1024.0, 512.0, 256.0])
    assert math.isfinite(fit.b_crit) and fit.b_crit > 256 * 100
    assert fit.predict(512) == pytest.approx(128.0, rel=0.01)
    assert isinstance(fit, ScalingFit)


# ---------------------------------------------------------------------------------------------------------- noise


def test_b_simple_from_expected_norms_is_exact() -> None:
    grad_sq, trace = 2.0, 300.0
    small, big = grad_sq + trace / 16, grad_sq + trace / 512
    assert noise_estimates(small, 16, big, 512) == pytest.approx((grad_sq, trace))
    assert b_simple_from_norms(small, 16, big, 512) == pytest.approx(150.0)
    # 16 * 100 > 512 * 1: the |G|^2 estimate is negative, so the ratio means nothing.
    assert math.isnan(b_simple_from_norms(100.0, 16, 1.0, 512))
    with pytest.raises(ValueError, match="b_small < b_big"):
        b_simple_from_norms(small, 512, big, 16)


def test_squared_grad_norm_matches_direct_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    frozen = torch.nn.Parameter(torch.ones(4))  # no grad: must be skipped
    model(torch.randn(8, 5)).square().mean().backward()
    params = [*model.parameters(), frozen]
    value = squared_grad_norm(params)
    assert value.dim() == 0
    expected = sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]) ** 2) == (
        pytest.approx(float(value), rel=1e-5)
    )
    assert float(squared_grad_norm([frozen])) == 0.0


def test_noise_estimator_recovers_b_simple_on_linear_regression() -> None:
    """Least squares on a fixed random data set: the exact full-data gradient G and per-example gradient covariance
    Sigma are known in closed form; mini-batch gradients come from autograd on batches drawn with replacement (so the
    estimator is unbiased without a finite-population correction)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 4096, 8
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    w0 = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3  # away from the optimum, so |G| is not tiny

    # loss_i = 0.5 (x_i . w - y_i)^2  =>  g_i = x_i (x_i . w - y_i)
    per_example = x * (x @ w0 - y)[:, None]
    g_full = per_example.mean(0)
    sigma = torch.cov(per_example.T, correction=0)
    true_b_simple = float(torch.trace(sigma) / g_full.square().sum())
    assert 5 < true_b_simple < 500  # the regime where both batch sizes below are informative

    w = torch.nn.Parameter(w0.clone())
    b_small, b_big = 4, 64

    def sq_norm(batch: int) -> float:
        idx = torch.randint(0, n, (batch,), generator=gen)
        w.grad = None
        (0.5 * (x[idx] @ w - y[idx]).square()).mean().backward()
        return float(squared_grad_norm([w]))

    # The per-example gradients are heavy-tailed (products of Gaussians): averaging ~20k pairs (a nearly flat EMA)
    # keeps the estimate within ~2% over seeds; the EMA of a training run (0.95) would be far noisier.
    estimator = NoiseScaleEstimator(ema=0.99995)
    assert estimator.b_simple is None and estimator.trace_sigma is None
    for _ in range(20000):
        estimator.update(sq_norm(b_small), b_small, sq_norm(b_big), b_big)
    assert estimator.updates == 20000
    assert estimator.b_simple == pytest.approx(true_b_simple, rel=0.10)
    assert estimator.trace_sigma == pytest.approx(float(torch.trace(sigma)), rel=0.10)
    assert estimator.grad_sq_norm == pytest.approx(float(g_full.square().sum()), rel=0.10)


def test_noise_estimator_bias_correction_state_and_nan() -> None:
    est = NoiseScaleEstimator(ema=0.9)
    grad_sq, trace = 4.0, 400.0
    est.update(grad_sq + trace / 10, 10, grad_sq + trace / 100, 100)
    # One update: bias correction gives the update itself back, not 10% of it.
    assert est.grad_sq_norm == pytest.approx(grad_sq)
    assert est.b_simple == pytest.approx(100.0)
    est.update(float("inf"), 10, 1.0, 100)  # diverged step: ignored
    assert est.updates == 1
    clone = NoiseScaleEstimator()
    clone.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert clone.ema == 0.9 and clone.b_simple == est.b_simple
    bad = NoiseScaleEstimator()
    bad.update(100.0, 10, 1.0, 100)  # the norm fell more than 1/B allows: |G|^2 estimate negative
    assert bad.grad_sq_norm is not None and bad.grad_sq_norm < 0
    assert bad.b_simple is not None and math.isnan(bad.b_simple)
    with pytest.raises(ValueError, match="ema"):
        NoiseScaleEstimator(ema=1.0)


# --------------------------------------------------------------------------------------------------------- report

TRUE_FITS = {"sgd": (300.0, 512.0), "adam": (250.0, 256.0), "kfac": (150.0, 1024.0)}
STUDY_BATCHES = [128, 512, 2048]


def _run(
    tmp_path: Path,
    variant: str,
    optimizer: str,
    batch: int,
    trial: int,
    steps_to_target: float | None,
    val: float | None,
    train: float | None = 0.95,
    noise: float | None = None,
) -> dict[str, Any]:
    cell = "/".join(p for p in (variant, optimizer, f"b{batch}") if p)
    metrics = tmp_path / "runs" / cell / str(trial) / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    total = int(steps_to_target or 500) + 50
    lines = []
    for step in range(10, total + 1, 10):
        record: dict[str, Any] = {"kind": "step", "step": step, "loss": 1.0 / step, "accuracy": 0.9}
        if noise is not None:
            record["noise_scale"] = noise * (1 + step / total) if step > 10 else -5.0  # early estimate negative
        lines.append(json.dumps(record))
        if step % 50 == 0:
            acc = (val or 0.5) * min(1.0, step / total + 0.2)
            lines.append(json.dumps({"kind": "eval", "step": step, "test_accuracy": acc, "test_loss": 1 - acc}))
    lines.append('{"kind": "eval", "st')  # killed mid-write
    metrics.write_text("\n".join(lines) + "\n")
    reached = steps_to_target is not None
    return {
        "cell": cell,
        "variant": variant,
        "optimizer": optimizer,
        "batch_size": batch,
        "source": "tuned",
        "trial": trial,
        "lr": 0.01 * batch / 128 * (1 + trial / 10),
        "hparams": json.dumps({"lr": 0.01, "momentum": 0.9}),
        "target_accuracy": 0.9,
        "reached": reached,
        "steps_to_target": None if steps_to_target is None else round(steps_to_target),
        "examples_to_target": None if steps_to_target is None else round(steps_to_target) * batch,
        "steps": total,
        "wall_seconds": 12.5,
        "train_accuracy": train,
        "val_accuracy": val,
        "train_loss": 0.1,
        "val_loss": 0.2,
        "generalization_gap": None if train is None or val is None else train - val,
        "noise_scale": noise,
        "metrics_path": str(metrics),
    }


def _study(tmp_path: Path, variants: tuple[str, ...] = ("",)) -> list[dict[str, Any]]:
    runs = []
    for v, variant in enumerate(variants):
        for optimizer, (s_min, b_crit) in TRUE_FITS.items():
            for batch in STUDY_BATCHES:
                best = s_min * (1 + b_crit / batch)
                # Trial 0 is the best (exact curve), trial 1 slower, trial 2 never reached the target.
                runs.append(_run(tmp_path, variant, optimizer, batch, 0, best, 0.93, noise=100.0 * (batch / 128)))
                # The second variant's trial 1 is 1 point better in val accuracy (for the difference row).
                runs.append(_run(tmp_path, variant, optimizer, batch, 1, best * 1.5, 0.94 + 0.01 * v, train=0.97))
                runs.append(_run(tmp_path, variant, optimizer, batch, 2, None, 0.80, train=0.99))
    return runs


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_best_runs_picks_fewest_steps_then_val_accuracy(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "", "kfac", 256, 0, 300, 0.91),
        _run(tmp_path, "", "kfac", 256, 1, 200, 0.90),
        _run(tmp_path, "", "kfac", 256, 2, 200, 0.92),  # tie on steps: higher val wins
        _run(tmp_path, "", "kfac", 256, 3, None, 0.99),  # higher val but never reached: not chosen
        _run(tmp_path, "", "sgd", 256, 0, None, 0.85),
        _run(tmp_path, "", "sgd", 256, 1, None, 0.88),  # none reached: the highest val
        _run(tmp_path, "", "sgd", 256, 2, None, None),  # no val accuracy at all: ranks last
    ]
    best = best_runs(runs)
    assert list(best) == [("", "sgd", 256), ("", "kfac", 256)]  # canonical optimizer order
    assert best[("", "kfac", 256)]["trial"] == 2
    assert best[("", "sgd", 256)]["trial"] == 1


def test_top_k_means_arithmetic(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "residual", "sgd", 256, i, None, val, train=train)
        for i, (train, val) in enumerate([(0.90, 0.80), (0.95, 0.70), (0.99, 0.60), (0.50, 0.99), (None, 0.98)])
    ]
    by_train = top_k_means(runs, 2)[("residual", "sgd", 256)]  # the paper ranks by training accuracy
    assert by_train["n"] == 2 and by_train["by"] == "train_accuracy"
    assert by_train["train_accuracy_mean"] == pytest.approx(0.97)
    assert by_train["train_accuracy_std"] == pytest.approx(math.sqrt(2 * 0.02**2))
    assert by_train["val_accuracy_mean"] == pytest.approx(0.65)
    by_val = top_k_means(runs, 3, by="val_accuracy")[("residual", "sgd", 256)]
    assert by_val["n"] == 3
    assert by_val["val_accuracy_mean"] == pytest.approx((0.99 + 0.98 + 0.80) / 3)
    assert by_val["train_accuracy_mean"] == pytest.approx((0.50 + 0.90) / 2)  # the run without one is skipped
    everything = top_k_means(runs, 100)[("residual", "sgd", 256)]
    assert everything["n"] == 4 and everything["k"] == 100  # fewer runs than k; the None train run not ranked
    one = top_k_means(runs[:1], 5)[("residual", "sgd", 256)]
    assert one["n"] == 1 and one["train_accuracy_std"] is None
    with pytest.raises(ValueError, match="k must be"):
        top_k_means(runs, 0)


def test_write_report_single_variant(tmp_path: Path) -> None:
    runs = _study(tmp_path)
    out = tmp_path / "report"
    report = write_report(out, runs, "Batch-size scaling on synthetic data", top_k=2)
    assert report == out / "report.md"

    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) == 27
    assert tuple(rows[0])[: len(RUN_COLUMNS)] == RUN_COLUMNS
    assert rows[2]["steps_to_target"] == "" and rows[2]["reached"] == "False"

    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert set(fits) == {"sgd", "adam", "kfac"}
    for optimizer, (s_min, b_crit) in TRUE_FITS.items():
        assert fits[optimizer]["reason"] is None
        assert fits[optimizer]["points"] == 3
        assert fits[optimizer]["b_crit"] == pytest.approx(b_crit, rel=0.05)  # steps rounded to integers
        assert fits[optimizer]["s_min"] == pytest.approx(s_min, rel=0.05)

    text = report.read_text()
    assert text.startswith("# Batch-size scaling on synthetic data")
    for name in PLOTS:
        assert f"({name})" in text
        _assert_png(out / name)
    assert "Top-2 means" not in text  # one variant: no 2x2 tables
    assert "| K-FAC | 2048 | yes |" in text
    assert "| 1600 | 3 |" in text  # noise scales print as whole numbers, not 1.6e+03
    assert str(round(150 * (1 + 1024 / 2048))) in text


def test_write_report_two_variants_has_paper_tables(tmp_path: Path) -> None:
    runs = _study(tmp_path, variants=("plain", "residual"))
    text = write_report(tmp_path / "report", runs, "Skip connections", top_k=2).read_text()
    assert len(json.loads((tmp_path / "report" / "fits.json").read_text())["fits"]) == 6
    assert "## Top-2 means" in text
    for batch in STUDY_BATCHES:
        assert f"**Average Training Accuracy (BS={batch})**" in text
        assert f"**Average Validation Accuracy (BS={batch})**" in text
    # Top 2 by training accuracy are trials 2 (0.99, val 0.80) and 1 (0.97, val 0.94).
    assert "| plain | 98.00% ± 1.41 (n=2) | 98.00% ± 1.41 (n=2) | 98.00% ± 1.41 (n=2) |" in text
    assert "| plain | 87.00% ± 9.90 (n=2) |" in text
    assert "| residual | 87.50% ± 10.61 (n=2) |" in text
    assert "| residual − plain (pt) | +0.00 | +0.00 | +0.00 |" in text  # training accuracy: the same
    assert "| residual − plain (pt) | +0.50 | +0.50 | +0.50 |" in text  # validation accuracy
    assert "| variant | optimizer | batch |" in text


def test_report_survives_missing_values(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "", "kfac", 256, 0, None, None, train=None),
        _run(tmp_path, "", "sgd", 512, 0, 100, 0.9),
        {"cell": "adam/b1024", "variant": "", "optimizer": "adam", "batch_size": 1024, "reached": True,
         "steps_to_target": None, "lr": float("nan"), "metrics_path": str(tmp_path / "missing.jsonl")},
    ]  # fmt: skip
    runs[0]["metrics_path"] = ""
    out = tmp_path / "report"
    text = write_report(out, runs, "Sparse").read_text()
    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert all(entry["b_crit"] is None and "at least 2" in entry["reason"] for entry in fits.values())
    assert "`noise_scale.png` not drawn: no run measured the gradient noise scale" in text
    assert "`learning_curves.png` not drawn" not in text  # the sgd run has a metrics file
    _assert_png(out / "steps_to_target.png")
    table = format_table(runs)
    assert table.splitlines()[0].split()[:2] == ["optimizer", "batch"]
    assert "–" in table and len(table.splitlines()) == 5
    assert format_table([]) == "(no runs)"

    nothing = write_report(tmp_path / "empty", [], "Nothing ran").read_text()
    assert "`steps_to_target.png` not drawn: no runs" in nothing
    assert compute_fits([]) == {}
    assert "pruned" not in nothing
    stopped = [
        {"variant": "", "optimizer": "sgd", "batch_size": 512, "trial": t, "status": status, "steps": 20}
        for t, status in ((1, "pruned"), (2, "pruned"), (3, "failed"))
    ]
    behind = "behind the best: not at the target by step 20, where an earlier trial had reached it"
    stopped.append({"variant": "", "optimizer": "adam", "batch_size": 64, "trial": 0, "status": "pruned", "steps": 20,
                    "reason": behind})  # fmt: skip
    stopped[1]["reason"] = "threshold: best value 1.45 by step 20 (20% of the budget) is still at or above 1.44"
    for run in runs:
        run["source"] = "tuned"
    cut = write_report(tmp_path / "cut", runs, "Pruned", stopped=stopped).read_text()
    assert f"- runs: {len(runs)} in " in cut
    assert (
        "; 4 more trial(s) stopped: 3 pruned (tune.pruner; 1 of them behind an earlier trial's best; 1 of them still "
        "at the threshold), 1" in cut
    )
    # The search counts them as trials that missed: sgd/b512's 4 trials, of which only trial 0 reached (100 steps).
    assert "| sgd | 512 | 4: 1 / 2 / 1 | 100 [100, ∞] | 100 |" in cut
    assert "| adam | 64 | 1: 0 / 1 / 0 | ∞ [∞, ∞] | – |" in cut  # a cell where every trial was stopped


def test_fit_notes_a_critical_batch_outside_the_measured_range(tmp_path: Path) -> None:
    flat = [_run(tmp_path, "", "sgd", batch, 0, 70, 0.9) for batch in (512, 2048)]  # no speed-up at all
    perfect = [_run(tmp_path, "", "kfac", batch, 0, 51200 / batch, 0.9) for batch in (128, 512, 2048)]  # all 1/B
    knee = [_run(tmp_path, "", "adam", b, 0, 20 * (1 + 500 / b), 0.9) for b in (128, 512, 2048)]
    fits = compute_fits(flat + perfect + knee)
    assert fits["sgd"]["b_crit"] < 256 and "below the smallest batch measured (512)" in fits["sgd"]["note"]
    assert fits["kfac"]["b_crit"] > 4096 and "above the largest batch measured (2048)" in fits["kfac"]["note"]
    assert fits["adam"]["b_crit"] == pytest.approx(500, rel=0.05) and fits["adam"]["note"] is None
    text = write_report(tmp_path / "report", flat + perfect + knee, "Range").read_text()
    assert "larger batches hardly cut the steps" in text and "still near perfect scaling" in text


def test_write_csv_keeps_extra_columns(tmp_path: Path) -> None:
    run = _run(tmp_path, "", "sgd", 128, 0, 10, 0.9)
    run["hparams"] = {"lr": 0.1}
    run["seed"] = 7
    with write_csv([run], tmp_path / "x" / "runs.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["seed"] == "7" and json.loads(row["hparams"]) == {"lr": 0.1}


def _row(optimizer: str, batch: int, source: str, trial: int, steps: float | None, noise: float = 300.0) -> dict:
    return {
        "cell": f"{optimizer}/b{batch}", "variant": "", "optimizer": optimizer, "batch_size": batch, "source": source,
        "trial": trial, "reached": steps is not None, "steps_to_target": steps, "val_accuracy": 0.9,
        "noise_scale": noise, "target_accuracy": 0.8,
    }  # fmt: skip


def test_report_states_the_uncertainty_of_search_seed_and_fit(tmp_path: Path) -> None:
    """Trials in search order, and repeats of the best with other seeds that follow S(B) = 100 (1 + 500 / B): the
    report's uncertainty section gives each cell's best with its resampled range, the first half's best, the repeats'
    geometric mean with an interval, and the fit's intervals, which hold the true B_crit here; a lucky repeat never
    replaces the search's best."""
    rng = np.random.default_rng(5)
    runs = []
    for batch in (64, 256, 1024, 4096):
        truth = 100 * (1 + 500 / batch)
        runs += [_row("sgd", batch, "tuned", t, s) for t, s in enumerate([3 * truth, None, 1.2 * truth, 1.1 * truth])]
        runs += [_row("sgd", batch, "repeat", 3, float(truth * math.exp(rng.normal(0, 0.05)))) for _ in range(5)]
    runs.append(_row("sgd", 64, "repeat", 3, 1.0))  # a freak seed: counted among the repeats, never the best
    best = best_runs(runs)
    assert best[("", "sgd", 64)]["source"] == "tuned" and best[("", "sgd", 64)]["steps_to_target"] > 100
    report = write_report(tmp_path, runs, title="t").read_text()
    section = report[report.index("## Uncertainty") :]
    truth = 100 * (1 + 500 / 256)
    assert f"| sgd | 256 | 4: 4 / 0 / 0 | {1.1 * truth:.0f} [" in section  # the best of the 4 trials and its range
    assert f"| {3 * truth:.0f} |" in section  # the first half (trials 0, 1) found only 3x the truth
    assert "| 6/6 |" in section and "| 5/5 |" in section
    fit_line = next(line for line in section.splitlines() if line.startswith("| sgd |") and "–" in line)
    low, high = (float(x) for x in fit_line.split("|")[2].split("[")[1].rstrip("] ").split(","))
    assert low <= 500 <= high


def test_report_refits_with_the_repeats_that_missed_counted_as_misses(tmp_path: Path) -> None:
    """A setting that fails on some seeds: the repeats' geometric mean is over those that reached the target, so the
    report also fits S(B) to each cell's median over all repeats (a miss as never), for every series alike; a cell
    where most repeats missed is left out of that fit and named. Without misses there is no such paragraph."""
    from study.fit import fit_steps_to_target

    runs, medians = [], {}
    for batch in (64, 256, 1024, 4096):
        truth = 100 * (1 + 500 / batch)
        steps = [truth * f for f in (0.9, 1.0, 1.1, 1.2, 1.3)]
        runs += [_row("sgd", batch, "tuned", 0, truth), _row("kfac", batch, "tuned", 0, truth)]
        runs += [_row("sgd", batch, "repeat", 1, s) for s in steps]
        misses = {256: 2, 4096: 3}.get(batch, 0)  # kfac at 256: 2 of 5 missed; at 4096 most did
        runs += [_row("kfac", batch, "repeat", 1, None if i < misses else s) for i, s in enumerate(steps)]
        medians[batch] = sorted(steps[misses:] + [math.inf] * misses)[2]
    section = write_report(tmp_path, runs, title="t").read_text().split("## Uncertainty")[1]
    assert "Repeats that missed the target within the budget: kfac at 256 (2 of 5); kfac at 4096 (3 of 5)." in section
    assert "| kfac | 256 |" in section and "| 3/5 |" in section and "| 2/5 |" in section
    kept = [64, 256, 1024]  # 4096's median is a miss
    fit = fit_steps_to_target(kept, [medians[b] for b in kept])
    assert medians[256] == pytest.approx(1.3 * 100 * (1 + 500 / 256))  # the misses push the median up
    expected = f"- kfac: B_crit {fit.b_crit:.0f}, S_min {fit.s_min:.0f} (left out, most repeats missed: batch 4096)."
    assert expected in section and "- sgd: B_crit " in section
    clean = [r for r in runs if r["optimizer"] == "sgd"]
    assert "Repeats that missed" not in write_report(tmp_path / "clean", clean, title="t").read_text()


def test_report_names_the_cells_whose_best_trial_lies_at_an_edge_of_its_search_space(tmp_path: Path) -> None:
    """With the search spaces given, the Answers say which cells' best trials lie in the outer 5% of a range (here
    batch 4096's, whose learning rate is 1.2e-3 in [1e-3, 10]); a trial at the edge that is not its cell's best,
    and a repeat, are not counted. Without the spaces the answer is left out."""
    from hpo_worker.spaces import ParamSpec, SearchSpace

    space = SearchSpace("sgd-test", (ParamSpec("optim.lr", "loguniform", "optim.lr", low=1e-3, high=10.0),))
    runs = []
    for batch in (64, 256, 1024, 4096):
        truth = 100 * (1 + 500 / batch)
        best_lr = 1.2e-3 if batch == 4096 else 0.1
        for trial, (steps, lr) in enumerate([(2 * truth, 9.9), (truth, best_lr)]):  # trial 0 at the high end
            runs.append({**_row("sgd", batch, "tuned", trial, steps), "hparams": json.dumps({"optim.lr": lr})})
        runs += [
            {**_row("sgd", batch, "repeat", 1, truth * (1 + 0.01 * s)), "hparams": json.dumps({"optim.lr": 9.9})}
            for s in range(3)
        ]
    answers = write_report(tmp_path, runs, title="t", spaces={"sgd": space}).read_text().split("## Answers")[1]
    line = next(line for line in answers.splitlines() if "search spaces hold" in line)
    assert "Mostly. In 1 of 4 cells" in line and "SGD/4096: optim.lr 0.0012 at the low end (0.001 – 10)" in line
    assert "9.9" not in line
    without = write_report(tmp_path / "plain", runs, title="t").read_text()
    assert "## Answers" in without and "search spaces hold" not in without


# ------------------------------------------------------------------------------------ K-FAC: curvature or damping?


def test_a_runs_curvature_share_is_read_from_its_record_or_else_from_its_checkpoint(tmp_path: Path) -> None:
    """A run made before runs recorded the share (its eval records stripped of it) gives the same value from its
    latest checkpoint; a run without either gives None, and so does a run that is not K-FAC."""
    from jobs.train import main
    from study.curvature import curvature_lines, run_curvature

    out = tmp_path / "run"
    smoke = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.toml"
    assert main(["--config", str(smoke), f"run.out_dir='{out}'", "optim.name=kfac", "optim.momentum=0.5"]) == 0
    row = {"metrics_path": str(out / "metrics.jsonl"), "optimizer": "kfac", "batch_size": 64, "source": "tuned",
           "hparams": {"kfac.damping": 1e-3}, "reached": True, "steps_to_target": 16}  # fmt: skip
    recorded = run_curvature(row)
    assert recorded is not None and 0 < recorded.share < 1 and list(recorded.layers) == ["1", "3", "5"]
    metrics = out / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    stripped = [{k: v for k, v in r.items() if not k.startswith("curvature")} for r in lines]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in stripped))
    from_checkpoint = run_curvature(row)
    assert from_checkpoint is not None and from_checkpoint.share == pytest.approx(recorded.share, rel=1e-9)
    assert from_checkpoint.energy == pytest.approx(recorded.energy, rel=1e-9)
    assert list(from_checkpoint.layers) == list(recorded.layers)
    for name, values in recorded.layers.items():
        assert from_checkpoint.layers[name] == pytest.approx(values, rel=1e-9)
    gone = {**row, "batch_size": 128, "metrics_path": str(tmp_path / "gone" / "metrics.jsonl")}  # no record, no file
    section = "\n".join(curvature_lines([row, gone]))
    cells = f"| 64 | 0.001 | 1 of 1 | {recorded.share:.3f} | {recorded.energy:.3f} |"
    assert "## K-FAC: curvature or damping?" in section and cells in section and "| 128 |" not in section
    assert "Not measured at batch 128: " in section  # a K-FAC cell without a measurement is named, not dropped
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "optim": {**config["optim"], "name": "sgd"}}))
    assert run_curvature(row) is None and curvature_lines([row]) == []  # no section without a measured cell
    assert run_curvature({**row, "metrics_path": str(tmp_path / "none" / "metrics.jsonl")}) is None
    (out / "config.json").write_text(json.dumps(config))
    (out / "checkpoints" / "ckpt-step00000016.rank0.pt").write_bytes(b"cut short")  # damaged: skipped, not raised
    assert run_curvature(row) is None


def test_a_series_whose_cells_have_one_repeat_each_gets_no_fit_and_no_verdict(tmp_path: Path) -> None:
    """A cell enters the S(B) fit only with two or more repeats that reached the target: with one each (an interim
    report early in the repeats), K-FAC's fit is left out rather than given a zero-width interval, and the Answers
    say its claims cannot be answered yet."""
    rng = np.random.default_rng(3)
    runs = []
    for batch in (64, 256, 1024, 4096):
        truth = 100 * (1 + 500 / batch)
        runs += [_row(o, batch, "tuned", 0, truth) for o in ("sgd", "kfac")]
        runs += [_row("sgd", batch, "repeat", 0, float(truth * math.exp(rng.normal(0, 0.05)))) for _ in range(3)]
        runs.append(_row("kfac", batch, "repeat", 0, truth))
    report = write_report(tmp_path, runs, title="t").read_text()
    fits = report.split("| series | B_crit [90%] |")[1].split("\n\n")[0].splitlines()
    assert "| kfac | – | – | 300 – 300 |" in fits  # no interval, where one repeat a cell would give a zero-width one
    assert "Which optimizer has the largest critical batch?** Inconclusive. No fit for K-FAC: too few" in report
    assert "K-FAC's critical batch is no larger than SGD's (Ma et al. 2020)?** Inconclusive. No fit" in report
    sgd_fit = next(line for line in fits if line.startswith("| sgd |"))
    low, high = (float(x) for x in sgd_fit.split("|")[2].split("[")[1].rstrip("] ").split(","))
    assert low < high  # SGD, with three repeats a cell, keeps its fit and a real interval


@pytest.mark.parametrize(("repeats", "missed", "left_out"), [(3, 2, True), (4, 2, True), (4, 1, False)])
def test_the_cost_section_leaves_out_a_cell_whose_repeats_mostly_missed(
    tmp_path: Path, repeats: int, missed: int, left_out: bool
) -> None:
    """A best setting that reached the target once in the search but on few of its seeds (CIFAR-10's SGD at 4096)
    gives the cost frontier no time to target there: the cell is left out and named, not costed at the search's
    steps. Exactly half missed counts as mostly, in the cost section and the fit to the medians alike. Step costs
    are the CIFAR-10 study's measured ones."""
    shutil.copyfile(REPO / "docs/results/critical-cifar10-cnn-state/step_cost.json", tmp_path / "step_cost.json")
    runs = []
    for batch in (256, 1024, 2048, 4096):
        truth = 100 * (1 + 500 / batch)
        runs.append(_row("sgd", batch, "tuned", 0, truth))
        misses = missed if batch == 4096 else 0
        runs += [_row("sgd", batch, "repeat", 0, None if i < misses else truth * (1 + i / 50)) for i in range(repeats)]
    report = write_report(tmp_path, runs, title="t").read_text()
    cost = report.split("## Cost")[1]
    assert "| sgd | 1024 | " in cost and ("| sgd | 4096 | " not in cost) == left_out
    assert ("Left out, because most of their repeats missed the target: sgd at 4096." in cost) == left_out
    assert ("(left out, most repeats missed: batch 4096)" in report) == left_out
