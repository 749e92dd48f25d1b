"""Time to target from steps and step costs (study.cost): the data-parallel frontier picks, for each number of
devices, the global batch that reaches the target soonest, and a bad step-cost file is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study.cost import cost_section, fastest_by_devices, frontier, load_step_costs, time_to_target


def test_time_to_target_uses_the_local_batch_of_each_device_count() -> None:
    steps = {256: 400.0, 512: 220.0, 1024: 150.0}
    seconds = {128: 0.5, 256: 1.0, 512: 2.0, 1024: 4.0}
    assert time_to_target(steps, seconds, 1) == {256: 400.0, 512: 440.0, 1024: 600.0}
    assert time_to_target(steps, seconds, 2) == {256: 200.0, 512: 220.0, 1024: 300.0}
    assert time_to_target(steps, seconds, 8) == {1024: 75.0}  # 256 / 8 = 32 and 512 / 8 = 64 were not measured
    assert time_to_target(steps, seconds, 16) == {}


def test_frontier_moves_to_larger_batches_as_devices_are_added_and_names_the_fastest() -> None:
    # Perfect scaling up to B = 1024 for "a"; "b" needs half the steps at twice the step cost.
    batches = [128, 256, 512, 1024, 2048]
    steps_a = {b: 100.0 * 1024 / min(b, 1024) for b in batches}
    seconds = {b: b / 1000 for b in batches}
    curves = frontier({"a": steps_a, "b": {b: s / 2 for b, s in steps_a.items()}},
                      {"a": seconds, "b": {b: 2 * t for b, t in seconds.items()}})  # fmt: skip
    assert [p.devices for p in curves["a"]] == [1, 2, 4, 8, 16]
    first, last = curves["a"][0], curves["a"][-1]
    assert (first.devices, first.batch_size, first.seconds) == (1, 128, pytest.approx(102.4))
    assert (last.devices, last.batch_size, last.seconds) == (16, 2048, pytest.approx(12.8))  # 2048 / 16 = 128 only
    rows = fastest_by_devices(curves)
    assert all(row["lead"] == pytest.approx(1.0) for row in rows)  # same time: half the steps at twice the cost
    cheaper = frontier({"a": steps_a, "b": steps_a}, {"a": seconds, "b": {b: 3 * t for b, t in seconds.items()}})
    assert [(row["fastest"], round(row["lead"], 2)) for row in fastest_by_devices(cheaper)] == [("a", 3.0)] * 5


def test_step_cost_file_is_read_or_refused_with_the_fix(tmp_path: Path) -> None:
    good = tmp_path / "step_cost.json"
    good.write_text(json.dumps({"seconds_per_step": {"sgd": {"32": 0.001, "64": 0.002}}}))
    assert load_step_costs(good) == {"sgd": {32: 0.001, 64: 0.002}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sgd": 1}))
    with pytest.raises(ValueError, match=r"not a step-cost file.*python -m benchmarks\.step_cost"):
        load_step_costs(bad)


def test_cost_section_without_and_with_step_costs(tmp_path: Path) -> None:
    steps = {"sgd": {64: 800.0, 128: 420.0}, "kfac": {64: 300.0, 128: 200.0}}
    missing = "\n".join(cost_section(tmp_path, steps, {}))
    assert "No step costs measured: run `python -m benchmarks.step_cost" in missing
    (tmp_path / "step_cost.json").write_text(json.dumps({
        "command": "python -m benchmarks.step_cost --config x.toml", "machine": "test", "threads": 1,
        "seconds_per_step": {"sgd": {"64": 0.002, "128": 0.003}, "kfac": {"64": 0.01, "128": 0.012}},
    }))  # fmt: skip
    text = "\n".join(cost_section(tmp_path, steps, {"sgd": {64: 5.0}}))
    assert "| sgd | 64 | 800 | 2.00 | 1.60 | 5.0 |" in text and "| kfac | 128 | 200 | 12.00 | 2.40 | – |" in text
    assert "| 1 | 1.26 s at B = 128 | 2.40 s at B = 128 | sgd (1.90x) |" in text
    assert "| 2 | 0.84 s at B = 128 | 2.00 s at B = 128 | sgd (2.38x) |" in text
    assert (tmp_path / "cost_frontier.png").stat().st_size > 1000


def test_more_devices_never_make_the_frontier_slower() -> None:
    """Where using all P devices is slower (here a local batch of 32 costs twice 64's), the frontier keeps the best
    of fewer devices and says how many it uses."""
    steps = {128: 100.0, 256: 100.0}  # no gain from a larger batch
    seconds = {32: 2.0, 64: 1.0, 128: 1.0, 256: 1.0}
    (curve,) = frontier({"sgd": steps}, {"sgd": seconds}).values()
    assert [(p.devices, p.seconds, p.used) for p in curve] == [(1, 100.0, 1), (2, 100.0, 2), (4, 100.0, 4),
                                                               (8, 100.0, 4)]  # fmt: skip
    assert curve[-1].text() == "100.00 s at B = 256 on 4"
