"""A study's search spaces are checked with its cells, before anything trains: a space that does not load, or whose
extreme samples give an invalid config, fails ``--check`` and the study itself at once (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hyperopt")

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
