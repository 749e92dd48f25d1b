"""The Fisher and gradient-outlier diagnostics during a run (run.fisher_every; jobs.diagnostics): the records hold
what distkfac.diagnostics computes on the run's own model, they leave the training untouched, two ranks give what one
gives, and bad settings are refused before training. Real Fashion-MNIST (the smoke config), about 30 s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distkfac.diagnostics import gradient_norms, mad_outliers, per_example_gradients, trimmed_top_eigenvalue
from jobs.config import ConfigError, load_config
from jobs.datasets import load_dataset
from jobs.metrics import read_metrics
from jobs.models import build_model
from tests.test_train import SMOKE, _launch, final_model, without_timing

FISHER = ["run.fisher_every=4", "run.fisher_layer='3'", "run.fisher_examples=384", "run.tensorboard=false"]
EIGHT_STEPS = ["run.steps=8", "run.epochs=0"]


def _train(out: Path, *overrides: str, world: int | None = None) -> list[dict[str, Any]]:
    result = _launch(["--config", str(SMOKE), f"run.out_dir='{out}'", *EIGHT_STEPS, *overrides], world)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out)


def test_the_records_are_what_the_diagnostics_give_on_the_runs_model(tmp_path: Path) -> None:
    records = _train(tmp_path / "run", *FISHER)
    fisher = [r for r in records if r["kind"] == "fisher"]
    assert [r["step"] for r in fisher] == [4, 8] and all(r["fisher_examples"] == 384 for r in fisher)
    last = fisher[-1]
    assert last["fisher_trimmed_fixed"] <= last["fisher_trimmed_recomputed"] <= last["fisher_top"]
    # The same numbers from the step-8 model, offline, in one process.
    config = load_config(SMOKE, [*EIGHT_STEPS, *FISHER])
    data = load_dataset(config.data)
    model = build_model(config.model, data.input_shape, data.classes)
    model.load_state_dict(final_model(tmp_path / "run"))
    model.eval()
    x, y = data.prepare(data.train_x[:384], torch.device("cpu")), data.train_y[:384]

    def rows() -> Any:
        return per_example_gradients(model, (x, y), "3")

    trimmed = trimmed_top_eigenvalue(rows, 0.1)
    outliers = mad_outliers(gradient_norms(rows), 10.0)
    assert last["fisher_top"] == pytest.approx(trimmed.full, rel=1e-5)
    assert last["fisher_trimmed_fixed"] == pytest.approx(trimmed.fixed, rel=1e-5)
    assert last["fisher_trimmed_recomputed"] == pytest.approx(trimmed.recomputed, rel=1e-5)
    assert last["grad_norm_mad"] == pytest.approx(outliers.mad, rel=1e-5)
    assert (last["outliers_above"], last["outliers_deviating"]) == (outliers.above, outliers.deviating)


def test_the_diagnostics_leave_the_training_untouched_and_two_ranks_give_what_one_gives(tmp_path: Path) -> None:
    plain = _train(tmp_path / "plain")
    one = _train(tmp_path / "one", *FISHER)
    assert without_timing([r for r in one if r["kind"] != "fisher"]) == without_timing(plain)
    assert torch.equal(final_model(tmp_path / "one")["1.weight"], final_model(tmp_path / "plain")["1.weight"])
    two = _train(tmp_path / "two", *FISHER, "run.backend='gloo'", world=2)
    one_fisher, two_fisher = ([r for r in run if r["kind"] == "fisher"] for run in (one, two))
    assert [r["step"] for r in two_fisher] == [r["step"] for r in one_fisher] == [4, 8]
    for mine, theirs in zip(one_fisher, two_fisher, strict=True):
        for key in ("fisher_top", "fisher_trimmed_fixed", "fisher_trimmed_recomputed", "grad_norm_median"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-3), key
        assert theirs["fisher_examples"] == mine["fisher_examples"] == 384


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.fisher_trim=1.0", "run.fisher_trim must be a fraction in [0, 1)"),
        ("run.outlier_k=0", "run.outlier_k must be > 0"),
        ("run.fisher_every=-1", "run.fisher_every"),
    ],
)
def test_bad_diagnostic_settings_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(SMOKE, [override])


def test_a_layer_that_is_not_in_the_model_is_refused_before_training(tmp_path: Path) -> None:
    result = _launch(
        ["--config", str(SMOKE), f"run.out_dir='{tmp_path}'", "run.fisher_every=4", "run.fisher_layer='2'"]
    )
    assert result.returncode == 2, result.stderr
    assert "run.fisher_layer = '2' is not a layer of the model: choose one of ['1', '3', '5']" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
