"""Warm start (hpo_worker.warm_start): given points are checked against the space, run first as the experiment's
first trials through the real driver, worker and MongoDB server, and count toward max-evals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpo_worker.spaces import load_space
from hpo_worker.warm_start import WarmStartError, check_point, hyperopt_vals, load_points
from tests.test_hpo import _driver, _finish, _worker

POINTS = """
[[points]]
"optim.lr" = 0.05
"optim.momentum" = 0.9
[[points]]
"optim.lr" = 0.2
"optim.momentum" = 0.0
"""


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"lr": 5.0, "momentum": 0.9, "decay_factor": 0.5, "decay_epoch": 30, "weight_decay": 1e-4},
         r"lr = 5.0 is outside the space \[0.0001, 1\]: move the point inside, or widen the space"),
        ({"lr": 0.1, "momentum": 0.9}, r"missing: \['decay_factor', 'decay_epoch', 'weight_decay'\]"),
        ({"lr": 0.1, "momentum": 0.9, "decay_factor": 0.5, "decay_epoch": 30, "weight_decay": 1e-4, "beta": 1},
         r"unknown: \['beta'\]"),
        ({"lr": "fast", "momentum": 0.9, "decay_factor": 0.5, "decay_epoch": 30, "weight_decay": 1e-4},
         "lr = 'fast' is not a number"),
    ],
)  # fmt: skip
def test_a_point_outside_the_space_is_refused(point: dict[str, Any], message: str) -> None:
    with pytest.raises(WarmStartError, match=message):
        check_point(load_space("sgd"), point)


def test_points_files_are_read_and_checked(tmp_path: Path) -> None:
    space = load_space("sgd")
    good = {"lr": 0.1, "momentum": 0.9, "decay_factor": 0.5, "decay_epoch": 30, "weight_decay": 1e-4}
    (tmp_path / "p.toml").write_text("[[points]]\n" + "\n".join(f"{k} = {v}" for k, v in good.items()))
    assert load_points(tmp_path / "p.toml", space) == [good]
    assert hyperopt_vals(space, good)["lr"] == [0.1]
    (tmp_path / "empty.toml").write_text("title = 'no points'\n")
    with pytest.raises(WarmStartError, match="give one or more \\[\\[points\\]\\] tables and nothing else"):
        load_points(tmp_path / "empty.toml", space)


def test_warm_start_points_run_first_and_count(mongo: str, db: Any, tmp_path: Path) -> None:
    (tmp_path / "points.toml").write_text(POINTS)
    driver = _driver(mongo, tmp_path, "warm", 4, "--queue-size", "1", "--warm-start", str(tmp_path / "points.toml"))
    worker = _worker(mongo, tmp_path, "--idle-timeout", "5")
    rc, out = _finish(driver)
    assert rc == 0 and "queued 2 warm-start point(s) as trials 0..1" in out and "4/4 finished" in out, out
    assert _finish(worker)[0] == 0
    docs = sorted(db.jobs.find({"exp_key": "warm"}), key=lambda d: d["tid"])
    assert len(docs) == 4  # the points count toward --max-evals
    assert [d["spec"]["params"] for d in docs[:2]] == [{"optim.lr": 0.05, "optim.momentum": 0.9},
                                                       {"optim.lr": 0.2, "optim.momentum": 0.0}]  # fmt: skip
    assert [d["misc"].get("warm_start", False) for d in docs] == [True, True, False, False]
    assert docs[0]["book_time"] < docs[1]["book_time"] < docs[2]["book_time"]  # the points ran first
    assert all(d["result"]["status"] == "ok" for d in docs)
    assert db.hpo_experiments.find_one({"_id": "warm"})["warm_start"][1] == {"optim.lr": 0.2, "optim.momentum": 0.0}


def test_a_bad_points_file_stops_the_driver_before_anything_is_queued(mongo: str, db: Any, tmp_path: Path) -> None:
    (tmp_path / "points.toml").write_text(POINTS.replace("0.2", "7.0"))
    rc, out = _finish(_driver(mongo, tmp_path, "bad", 4, "--warm-start", str(tmp_path / "points.toml")))
    assert rc == 2 and "point 2: optim.lr = 7.0 is outside the space" in out, out
    assert db.jobs.count_documents({"exp_key": "bad"}) == 0
    (tmp_path / "good.toml").write_text(POINTS)
    rc, out = _finish(_driver(mongo, tmp_path, "few", 1, "--warm-start", str(tmp_path / "good.toml")))
    assert rc == 2 and "2 warm-start points but --max-evals 1: raise --max-evals" in out, out
