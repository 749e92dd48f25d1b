"""A study's search spaces are checked with its cells, before anything trains: a space that does not load, or whose
extreme samples give an invalid config, fails ``--check`` and the study itself at once (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpo_worker.spaces import ParamSpec, SearchSpace
from tests.test_study import SPACE, TUNED, _study

BAD_SPACES = [
    (SPACE.replace("low = 0.05", "low = 0.7"), "low must be below high"),  # low > high
    (SPACE + '[params."kfac.factor_decay"]\ndist = "uniform"\nlow = 0.5\nhigh = 1.5\n', "kfac.factor_decay"),
    (SPACE.replace('"optim.schedule" = "constant"', '"optim.schedule" = "cosine"'), "optim.schedule"),
    (SPACE + '[params."optim.momentum"]\ndist = "choice"\noptions = [0.9, -1.0]\n', "optim.momentum"),
]


@pytest.mark.parametrize(("space", "message"), BAD_SPACES)
@pytest.mark.parametrize("check_only", [True, False])
def test_a_bad_space_fails_before_anything_trains(tmp_path: Path, space: str, message: str, check_only: bool) -> None:
    result = _study(tmp_path, TUNED, *(["--check"] if check_only else []), timeout=60, space=space)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "tune.spaces.sgd" in result.stderr or "space 'space' at" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out" / "trials").exists(), "no trial may be trained"


def test_a_good_space_passes_the_check(tmp_path: Path) -> None:
    result = _study(tmp_path, TUNED, "--check", timeout=60)
    assert result.returncode == 0, result.stderr


def test_extreme_samples_are_the_ends_of_every_range_and_every_option() -> None:
    space = SearchSpace(
        "s",
        (
            ParamSpec("optim.lr", "loguniform", "optim.lr", low=1e-3, high=0.5),
            ParamSpec("kfac.inv_update_steps", "quniform", "kfac.inv_update_steps", low=1.2, high=9.7, q=2),
            ParamSpec("optim.nesterov", "choice", "optim.nesterov", options=(False, True)),
        ),
    )
    assert space.extreme_samples() == [
        {"optim.lr": 1e-3, "kfac.inv_update_steps": 2, "optim.nesterov": False},
        {"optim.lr": 0.5, "kfac.inv_update_steps": 10, "optim.nesterov": True},
        {"optim.lr": 1e-3, "kfac.inv_update_steps": 2, "optim.nesterov": True},
    ]


def test_evaluations_every_n_examples_give_each_batch_size_its_own_cadence(tmp_path: Path) -> None:
    """study.eval_every_examples = 2048: batch 32 evaluates every 64 steps, 512 every 4, 8192 every step; the cell's
    config resolves to that, whatever eval_every_steps the study or base config says."""
    from jobs.config import load_config
    from study.config import cell_toml, load_study
    from tests.test_study import BASE

    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(SPACE)
    text = TUNED.replace("batch_sizes = [32, 128]", "batch_sizes = [32, 512, 8192]")
    (tmp_path / "study.toml").write_text(text.replace("eval_every_steps = 5", "eval_every_examples = 2048"))
    study = load_study(tmp_path / "study.toml", tmp_path / "out")
    cadence = {}
    for cell in study.cells():
        (tmp_path / "cell.toml").write_text(cell_toml(study, cell))
        cadence[cell.batch_size] = load_config(tmp_path / "cell.toml").run.eval_every_steps
    assert cadence == {32: 64, 512: 4, 8192: 1}
    (tmp_path / "study.toml").write_text(text.replace("eval_every_steps = 5", ""))
    with pytest.raises(ValueError, match=r"or study\.eval_every_examples"):
        load_study(tmp_path / "study.toml")


def test_a_budget_of_epochs_capped_in_steps_ends_each_run_at_the_smaller(tmp_path: Path) -> None:
    """study.max_epochs = 3 with max_steps = 20 on 512 examples: batch 32 (16 steps an epoch, 48 in all) stops at
    step 20, batch 128 (4 an epoch) after its 12; a real run of the capped cell ends at step 20."""
    from jobs.config import load_config
    from jobs.train import main as train
    from study.config import cell_toml, load_study
    from tests.test_study import BASE

    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "study.toml").write_text(TUNED.replace("max_steps = 40", "max_epochs = 3\nmax_steps = 20"))
    study = load_study(tmp_path / "study.toml", tmp_path / "out")
    cell = next(c for c in study.cells() if c.batch_size == 32 and c.optimizer == "sgd")
    (tmp_path / "cell.toml").write_text(cell_toml(study, cell))
    run = load_config(tmp_path / "cell.toml").run
    assert (run.epochs, run.steps, run.step_cap) == (3, 0, 20)
    assert train(["--config", str(tmp_path / "cell.toml"), "run.target_accuracy=0", f"run.out_dir={tmp_path}/run"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 20, summary
    (tmp_path / "study.toml").write_text(TUNED.replace("max_steps = 40", ""))
    with pytest.raises(ValueError, match=r"give a budget: max_steps or max_epochs"):
        load_study(tmp_path / "study.toml")


def test_report_of_a_study_that_has_not_run_says_to_run_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from study.__main__ import main
    from tests.test_study import BASE

    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(SPACE)
    (tmp_path / "study.toml").write_text(TUNED)
    assert main(["report", "--config", str(tmp_path / "study.toml"), "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none" / "report.md").exists()
    assert "runs.csv does not exist: run the study first (python -m study scaling)" in capsys.readouterr().err
