"""hpo_worker.spaces: built-in spaces sample within their ranges and become overrides that jobs.config accepts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hyperopt import Trials, fmin, tpe
from hyperopt.pyll.stochastic import sample

from hpo_worker.spaces import SearchSpace, load_space, space_names, toml_value
from jobs.config import Config, load_config

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.toml"
DRAWS = 50

# label -> (low, high, must be an integer) as the docs state them; written out here, not read from the module.
EXPECTED_RANGES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "sgd": {
        "lr": (1e-4, 1.0, False),
        "decay_factor": (0.1, 1.0, False),
        "decay_epoch": (10, 100, True),
        "momentum": (0.5, 0.99, False),
        "weight_decay": (1e-6, 1e-2, False),
    },
    "adam": {
        "alpha": (1e-5, 1e-1, False),
        "decay_factor": (0.1, 1.0, False),
        "decay_epoch": (10, 100, True),
        "beta1": (0.8, 0.99, False),
        "beta2": (0.99, 0.9999, False),
        "eps": (1e-10, 1e-6, False),
        "weight_decay": (1e-6, 1e-2, False),
    },
    "kfac": {
        "lr": (1e-4, 1.0, False),
        "decay_factor": (0.1, 1.0, False),
        "decay_epoch": (10, 100, True),
        "momentum": (0.5, 0.99, False),
        "weight_decay": (1e-6, 1e-2, False),
        "factor_decay": (0.8, 0.999, False),
        "damping": (1e-5, 1e-1, False),
        "inv_update_interval": (1, 100, True),
    },
}


def _config_for(space: SearchSpace, values: dict[str, Any]) -> Config:
    return load_config(SMOKE_CONFIG, space.to_overrides(values))


def test_space_names() -> None:
    assert space_names() == ["sgd", "adam", "kfac"]


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac"])
def test_builtin_space_samples_within_ranges(name: str) -> None:
    space = load_space(name)
    assert space.name == name
    assert set(space.hyperopt_space) == set(EXPECTED_RANGES[name])
    rng = np.random.default_rng(0)
    seen: dict[str, list[float]] = {label: [] for label in EXPECTED_RANGES[name]}
    for _ in range(DRAWS):
        values = sample(space.hyperopt_space, rng=rng)
        for label, (low, high, integral) in EXPECTED_RANGES[name].items():
            value = float(values[label])
            assert low <= value <= high, (label, value)
            if integral:
                assert value == round(value), (label, value)
            seen[label].append(value)
    for label, values_seen in seen.items():  # the draws really vary (no constant expression by mistake)
        assert len(set(values_seen)) > 1, label


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac"])
def test_builtin_overrides_land_in_config(name: str) -> None:
    space = load_space(name)
    rng = np.random.default_rng(1)
    for _ in range(10):
        values = sample(space.hyperopt_space, rng=rng)
        config = _config_for(space, values)
        optim = config.optim
        assert optim.name == name
        assert optim.schedule == "step"
        assert optim.gamma == pytest.approx(float(values["decay_factor"]))
        assert optim.milestones == [round(float(values["decay_epoch"]))]
        assert optim.weight_decay == pytest.approx(float(values["weight_decay"]))
        if name == "adam":
            assert optim.lr == pytest.approx(float(values["alpha"]))
            assert optim.betas == pytest.approx([float(values["beta1"]), float(values["beta2"])])
            assert optim.eps == pytest.approx(float(values["eps"]))
        else:
            assert optim.lr == pytest.approx(float(values["lr"]))
            assert optim.momentum == pytest.approx(float(values["momentum"]))
        if name == "kfac":
            assert config.kfac.factor_decay == pytest.approx(float(values["factor_decay"]))
            assert config.kfac.damping == pytest.approx(float(values["damping"]))
            assert isinstance(config.kfac.inv_update_steps, int)
            assert config.kfac.inv_update_steps == round(float(values["inv_update_interval"]))


def test_overrides_are_exact_toml_values() -> None:
    space = load_space("kfac")
    values = {
        "lr": np.float64(0.1),
        "decay_factor": 0.5,
        "decay_epoch": 30.0,  # hyperopt's quniform gives floats
        "momentum": 0.9,
        "weight_decay": 5e-5,
        "factor_decay": 0.95,
        "damping": 1e-3,
        "inv_update_interval": np.float64(10.0),
    }
    overrides = space.to_overrides(values)
    assert overrides[:2] == ['optim.name="kfac"', 'optim.schedule="step"']
    assert "optim.milestones=[30]" in overrides
    assert "kfac.inv_update_steps=10" in overrides
    assert "optim.lr=0.1" in overrides
    assert "optim.weight_decay=5e-05" in overrides


def test_overrides_reject_missing_and_unknown_labels() -> None:
    space = load_space("sgd")
    values = sample(space.hyperopt_space, rng=np.random.default_rng(2))
    with pytest.raises(ValueError, match="no value for momentum"):
        space.to_overrides({k: v for k, v in values.items() if k != "momentum"})
    with pytest.raises(ValueError, match="unknown parameters damping"):
        space.to_overrides({**values, "damping": 1e-3})


def test_evaluate_reads_misc_vals() -> None:
    space = load_space("sgd")
    vals = {"lr": [0.01], "decay_factor": [0.5], "decay_epoch": [40.0], "momentum": [0.9], "weight_decay": [1e-4]}
    config = _config_for(space, space.evaluate(vals))
    assert config.optim.milestones == [40]
    assert config.optim.lr == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["sgd", "adam", "kfac"])
def test_tpe_runs_on_builtin_space(name: str) -> None:
    """hyperopt's TPE (past its random start-up trials) proposes values that build valid configs."""
    space = load_space(name)
    trials = Trials()

    def objective(values: dict[str, Any]) -> float:
        config = _config_for(space, values)
        return abs(math.log10(config.optim.lr) + 2)  # any deterministic function of the config

    fmin(
        objective,
        space.hyperopt_space,
        algo=tpe.suggest,
        max_evals=25,
        trials=trials,
        rstate=np.random.default_rng(4),
        show_progressbar=False,
    )
    assert len(trials.trials) == 25
    for trial in trials.trials:  # misc.vals -> evaluate -> overrides: the path a worker takes
        _config_for(space, space.evaluate(trial["misc"]["vals"]))


def test_toml_value() -> None:
    assert toml_value("a b") == '"a b"'
    assert toml_value(True) == "true"
    assert toml_value([1, 2.5, "x"]) == '[1, 2.5, "x"]'
    assert toml_value(np.int64(3)) == "3"
    assert toml_value(math.inf) == "inf"


CUSTOM_SPACE = """
name = "custom-sgd"

[fixed]
"optim.name" = "sgd"
"optim.schedule" = "step"

[params."optim.lr"]
dist = "loguniform"
low = 1e-3
high = 1.0

[params."optim.milestones"]
dist = "choice"
options = [[1], [1, 2]]

[params.kfac.inv_update_steps]   # unquoted dotted key: a nested table, accepted too
dist = "qloguniform"
low = 1
high = 50
q = 1

[params."optim.momentum"]
dist = "quniform"
low = 0.5
high = 0.9
q = 0.1
"""


def test_custom_space_file(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(CUSTOM_SPACE)
    space = load_space(path)
    assert space.name == "custom-sgd"
    assert set(space.hyperopt_space) == {"optim.lr", "optim.milestones", "kfac.inv_update_steps", "optim.momentum"}
    assert space.log_scale_labels == {"optim.lr", "kfac.inv_update_steps"}
    rng = np.random.default_rng(3)
    for _ in range(DRAWS):
        values = sample(space.hyperopt_space, rng=rng)
        config = _config_for(space, values)
        assert config.optim.name == "sgd"
        assert 1e-3 <= config.optim.lr <= 1.0
        assert config.optim.milestones in ([1], [1, 2])
        assert 1 <= config.kfac.inv_update_steps <= 50
        assert 0.5 <= config.optim.momentum <= 0.9
    # choice comes back from a trial's misc.vals as an index: evaluate() turns it into the option
    evaluated = space.evaluate(
        {"optim.lr": [0.01], "optim.milestones": [1], "kfac.inv_update_steps": [7.0], "optim.momentum": [0.6]}
    )
    assert _config_for(space, evaluated).optim.milestones == [1, 2]


def test_edges_name_the_values_in_the_outer_part_of_their_range_on_the_sampling_scale(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(CUSTOM_SPACE)
    space = load_space(path)
    lr, steps, momentum = (next(p for p in space.params if p.label == label) for label in
                           ("optim.lr", "kfac.inv_update_steps", "optim.momentum"))  # fmt: skip
    assert lr.position(1e-3) == pytest.approx(0.0) and lr.position(1.0) == pytest.approx(1.0)
    assert lr.position(math.sqrt(1e-3)) == pytest.approx(0.5)  # log scale: the geometric middle
    assert momentum.position(0.7) == pytest.approx(0.5)  # linear scale: the arithmetic middle
    assert steps.position(50**0.5) == pytest.approx(0.5)
    assert next(p for p in space.params if p.dist == "choice").position(1) is None
    inside = {"optim.lr": 0.03, "optim.milestones": [1], "kfac.inv_update_steps": 7, "optim.momentum": 0.7}
    assert space.edges(inside, 0.05) == []
    # 1.3e-3 is 3.8% of the three decades above 1e-3; 0.885 is 96% of the way from 0.5 to 0.9
    edge = {**inside, "optim.lr": 1.3e-3, "optim.momentum": 0.885}
    assert space.edges(edge, 0.05) == [
        "optim.lr 0.0013 at the low end (0.001 – 1)", "optim.momentum 0.885 at the high end (0.5 – 0.9)",
    ]  # fmt: skip
    assert space.edges(edge, 0.03) == []  # within 3% of neither end
    assert space.edges({"optim.lr": 1.3e-3}, 0.05) == ["optim.lr 0.0013 at the low end (0.001 – 1)"]  # others absent


def test_custom_space_name_defaults_to_stem(tmp_path: Path) -> None:
    path = tmp_path / "wide_lr.toml"
    path.write_text('[params."optim.lr"]\ndist = "uniform"\nlow = 0.01\nhigh = 0.2\n')
    space = load_space(str(path))
    assert space.name == "wide_lr"
    assert space.to_overrides({"optim.lr": 0.05}) == ["optim.lr=0.05"]


def test_unknown_space_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown search space 'rmsprop'.*sgd, adam, kfac"):
        load_space("rmsprop")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params = [", "not valid TOML"),
        ("", "nothing to search"),
        ('[params."optim.lr"]\ndist = "normal"\nlow = 0\nhigh = 1\n', "dist = 'normal' is not known"),
        ('[params."optim.lrr"]\ndist = "uniform"\nlow = 0\nhigh = 1\n', "not a config key.*optim.lr"),
        ('[params."optim.lr"]\ndist = "loguniform"\nlow = 0\nhigh = 1\n', "needs low > 0"),
        ('[params."optim.lr"]\ndist = "uniform"\nlow = 1\nhigh = 0.5\n', "low must be below high"),
        ('[params."optim.lr"]\ndist = "uniform"\nlow = 0.1\n', "needs high"),
        ('[params."optim.lr"]\ndist = "quniform"\nlow = 0.1\nhigh = 1\n', "needs q"),
        ('[params."optim.lr"]\ndist = "choice"\n', "needs options"),
        ('[params."optim.lr"]\ndist = "uniform"\nlow = 0.1\nhigh = 1\nstep = 2\n', "unknown keys step"),
        ('[fixed]\n"optim.lr" = 0.1\n[params."optim.lr"]\ndist = "uniform"\nlow = 0.1\nhigh = 1\n', "both fixed"),
        ('[fixed]\n"optim.nme" = "sgd"\n[params."optim.lr"]\ndist = "uniform"\nlow = 0.1\nhigh = 1\n', "optim.name"),
        ('oops = 1\n[params."optim.lr"]\ndist = "uniform"\nlow = 0.1\nhigh = 1\n', "unknown top-level keys oops"),
    ],
)
def test_bad_space_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_space(path)


def test_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_space(tmp_path / "nope.toml")


def test_non_integer_for_integer_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text('[params."kfac.inv_update_steps"]\ndist = "uniform"\nlow = 1\nhigh = 10\n')
    space = load_space(path)
    with pytest.raises(ValueError, match="needs an integer"):
        space.to_overrides({"kfac.inv_update_steps": 2.5})
