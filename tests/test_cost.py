"""Time to target from steps and step costs (study.cost): the data-parallel frontier picks, for each number of
devices, the global batch that reaches the target soonest, and a bad step-cost file is refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.step_comm import communication_seconds, network
from benchmarks.step_cost import decomposition_speedups, partial_file, selected_cells, step_cost
from jobs.config import build_config
from study.config import load_study
from study.cost import (
    OwnTime,
    StepCosts,
    cost_section,
    fastest_by_devices,
    frontier,
    load_step_costs,
    own_time_to_target,
    time_to_target,
)
from tests.processes import ENV, PYTHON, ROOT
from tests.test_study_archive import BASE, STUDY


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
                      StepCosts({"a": seconds, "b": {b: 2 * t for b, t in seconds.items()}}))  # fmt: skip
    assert [p.devices for p in curves["a"]] == [1, 2, 4, 8, 16]
    first, last = curves["a"][0], curves["a"][-1]
    assert (first.devices, first.batch_size, first.seconds) == (1, 128, pytest.approx(102.4))
    assert (last.devices, last.batch_size, last.seconds) == (16, 2048, pytest.approx(12.8))  # 2048 / 16 = 128 only
    rows = fastest_by_devices(curves)
    assert all(row["lead"] == pytest.approx(1.0) for row in rows)  # same time: half the steps at twice the cost
    cheaper = frontier(
        {"a": steps_a, "b": steps_a}, StepCosts({"a": seconds, "b": {b: 3 * t for b, t in seconds.items()}})
    )
    assert [(row["fastest"], round(row["lead"], 2)) for row in fastest_by_devices(cheaper)] == [("a", 3.0)] * 5


def test_step_cost_file_is_read_or_refused_with_the_fix(tmp_path: Path) -> None:
    good = tmp_path / "step_cost.json"
    good.write_text(json.dumps({"seconds_per_step": {"sgd": {"32": 0.001, "64": 0.002}}}))
    assert load_step_costs(good).seconds == {"sgd": {32: 0.001, 64: 0.002}}
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
    text = "\n".join(cost_section(tmp_path, steps, {"sgd": {64: OwnTime(5.0, 0)}}))
    assert "| sgd | 64 | 800 | 2.00 | 1.60 | 5.0 |" in text and "| kfac | 128 | 200 | 12.00 | 2.40 | – |" in text
    assert "over every attempt of a resumed run." in text and "count at that median" not in text
    paused = "\n".join(cost_section(tmp_path, steps, {"sgd": {64: OwnTime(5.0, 2)}}))
    assert "2 step(s) or evaluation(s) of these runs took over 10x their run's median and over 60 s" in paused
    assert "| 1 | 1.26 s at B = 128 | 2.40 s at B = 128 | sgd (1.90x) |" in text
    assert "| 2 | 0.84 s at B = 128 | 2.00 s at B = 128 | sgd (2.38x) |" in text
    assert (tmp_path / "cost_frontier.png").stat().st_size > 1000


def _own(records: list[dict[str, Any]], steps_to_target: float) -> tuple[float, int] | None:
    time = own_time_to_target(records, steps_to_target)
    return None if time is None else (round(time.seconds, 9), time.paused)


def test_own_time_to_target_sums_steps_and_evaluations_to_the_target_and_counts_pauses_at_the_median() -> None:
    steps: list[dict[str, Any]] = [{"kind": "step", "step": n, "seconds": 0.5} for n in range(1, 11)]
    steps[3]["seconds"] = 3600.0  # SIGSTOP for an hour inside step 4
    steps[5]["seconds"] = 1.4  # a step that also measured the noise scale: slow, but work
    evals: list[dict[str, Any]] = [{"kind": "eval", "step": n, "seconds": 2.0} for n in (5, 10)]
    records = [*steps, *evals, {"kind": "noise", "step": 2}, {"kind": "eval", "step": 5}]  # no seconds: not summed
    assert _own(records, 10) == (8 * 0.5 + 1.4 + 0.5 + 2 * 2.0, 1), "the paused step counts at the median, 0.5"
    assert _own(records, 5) == (4 * 0.5 + 0.5 + 2.0, 1), "up to the target's step only"
    evals[0]["seconds"] = 900.0  # the evaluations' median is now 451: 900 is not 10x it
    assert _own(records, 10) == (5.9 + 900.0 + 2.0, 1)
    steps[3]["seconds"] = 50.0  # 100x the median, but under a minute: a hiccup of the machine, counted as work
    assert _own(records, 10) == (8 * 0.5 + 50.0 + 1.4 + 902.0, 0)
    assert _own(evals, 10) is None, "no step times: no time to target"


def test_more_devices_never_make_the_frontier_slower() -> None:
    """Where using all P devices is slower (here a local batch of 32 costs twice 64's), the frontier keeps the best
    of fewer devices and says how many it uses."""
    steps = {128: 100.0, 256: 100.0}  # no gain from a larger batch
    seconds = {32: 2.0, 64: 1.0, 128: 1.0, 256: 1.0}
    (curve,) = frontier({"sgd": steps}, StepCosts({"sgd": seconds})).values()
    assert [(p.devices, p.seconds, p.used) for p in curve] == [(1, 100.0, 1), (2, 100.0, 2), (4, 100.0, 4),
                                                               (8, 100.0, 4)]  # fmt: skip
    assert curve[-1].text() == "100.00 s at B = 256 on 4"


def test_shared_decompositions_cost_a_share_of_their_time_on_p_devices() -> None:
    """K-FAC's step on P devices: t(b) - d(b) + d(b) / s(P), with s beyond the largest measured P held there."""
    costs = StepCosts(
        seconds={"kfac": {64: 0.010, 128: 0.012}, "sgd": {64: 0.002, 128: 0.003}},
        decompositions={"kfac": {64: 0.008, 128: 0.008}},
        speedup={1: 1.0, 2: 2.0, 4: 2.5},
    )
    assert costs.on("kfac", 1) == {64: pytest.approx(0.010), 128: pytest.approx(0.012)}
    assert costs.on("kfac", 2) == {64: pytest.approx(0.006), 128: pytest.approx(0.008)}
    assert costs.on("kfac", 8) == {64: pytest.approx(0.0052), 128: pytest.approx(0.0072)}  # s(8) = s(4) = 2.5
    assert costs.on("kfac", 2, shared=False) == {64: 0.010, 128: 0.012}
    assert costs.on("sgd", 4) == {64: 0.002, 128: 0.003}  # nothing to share
    steps = {"kfac": {128: 100.0, 256: 60.0}, "sgd": {128: 300.0, 256: 200.0}}
    shared, alone = frontier(steps, costs), frontier(steps, costs, shared=False)
    assert [p.seconds for p in shared["kfac"]] == pytest.approx([1.2, 0.48, 0.312])  # 256 on 2: 60 x 0.008 (local 128)
    assert [p.seconds for p in alone["kfac"]] == pytest.approx([1.2, 0.72, 0.6])  # 256 on 2: 60 x 0.012
    assert shared["sgd"] == alone["sgd"]


def test_cost_section_charges_shared_decompositions_and_says_what_sharing_changes(tmp_path: Path) -> None:
    steps = {"sgd": {64: 800.0, 128: 420.0}, "kfac": {64: 300.0, 128: 200.0}}
    (tmp_path / "step_cost.json").write_text(json.dumps({
        "command": "python -m benchmarks.step_cost --config x.toml", "machine": "test", "threads": 1,
        "seconds_per_step": {"sgd": {"64": 0.002, "128": 0.003}, "kfac": {"64": 0.01, "128": 0.012}},
        "decomposition_seconds_per_step": {"kfac": {"64": 0.006, "128": 0.006}},
        "decomposition_speedup": {"1": 1.0, "2": 1.5}, "rounds": 3,
        "max_over_min_of_rounds": {"sgd": {"64": 1.1, "128": 1.3}, "kfac": {"64": 1.2, "128": 1.05}},
    }))  # fmt: skip
    text = "\n".join(cost_section(tmp_path, steps, {}))
    assert "| kfac | 128 | 200 | 12.00 | 6.00 | 2.40 | – |" in text
    # On 2 devices K-FAC at B = 128 (local 64): 0.01 - 0.006 + 0.006 / 1.5 = 0.008 s a step, 200 steps.
    assert "| 2 | 0.84 s at B = 128 | 1.60 s at B = 128 | sgd (1.90x) |" in text
    assert "kfac's decompositions are 50%–60% of its step on one device" in text
    assert "with every decomposition on every device it would be up to 1.25x slower" in text  # 2.00 / 1.60
    assert "moved by up to 1.30x between the benchmark's 3 rounds (median 1.20x;" in text
    unshareable = json.loads((tmp_path / "step_cost.json").read_text()) | {"decomposition_speedup": {"1": 1, "2": 1}}
    (tmp_path / "step_cost.json").write_text(json.dumps(unshareable))  # one factor holds all the work
    text = "\n".join(cost_section(tmp_path, steps, {}))
    assert "with every decomposition on every device it would be the same, within 0.5%." in text


def test_decomposition_speedups_follow_distkfac_assignment_of_the_runs_factors() -> None:
    # An MLP 784-512-10: factors A 785, G 512, A 513, G 10. The largest alone bounds the share-out.
    kfac: dict[str, Any] = {"strategy": "comm-opt", "grad_worker_fraction": 0.0, "split_factors_above": 0}
    resolved = {
        "kfac": kfac,
        "derived": {"kfac_factor_shapes": [[["dense", 785], ["dense", 512]], [["dense", 513], ["dense", 10]]]},
    }
    costs = [785.0**3, 512.0**3, 513.0**3, 10.0**3]
    speedups = decomposition_speedups(resolved, 8)
    assert list(speedups) == ["1", "2", "4", "8"] and speedups["1"] == 1.0
    assert speedups["2"] == pytest.approx(sum(costs) / 785.0**3)  # 785 alone; the rest on the other rank
    assert speedups["8"] == pytest.approx(sum(costs) / 785.0**3)
    kfac["split_factors_above"] = 256  # blocks of at most 256: the share-out goes on
    assert decomposition_speedups(resolved, 8)["8"] > 2 * speedups["8"]


def test_step_cost_adds_the_decomposing_steps_excess_spread_over_the_interval() -> None:
    # Every 10th step (here those with step % 10 == 1) also decomposes, for 50 ms more than the others' 10 ms; two
    # slow outliers (a shared machine) move neither the median nor the decompositions' part.
    step_seconds = {step: 0.010 + (0.050 if step % 10 == 1 else 0.0) for step in range(11, 61)}
    step_seconds[15] = step_seconds[27] = 0.5
    assert step_cost(step_seconds, 10) == (pytest.approx(0.015), pytest.approx(0.005))
    assert step_cost({step: 0.01 for step in range(11, 61)}, 10) == (0.01, 0.0)
    assert step_cost(step_seconds, 1) == (0.010, None)  # every step decomposes: nothing to tell apart
    assert step_cost(step_seconds, None) == (0.010, None)  # not K-FAC: the median step


def test_modelled_communication_is_added_per_device_count_and_reported(tmp_path: Path) -> None:
    steps = {"sgd": {64: 800.0, 128: 420.0}, "kfac": {64: 300.0, 128: 200.0}}
    seconds = {"sgd": {64: 0.002, 128: 0.003}, "kfac": {64: 0.01, 128: 0.012}}
    costs = StepCosts(seconds, communication={"sgd": {1: 0.0, 2: 0.0005}, "kfac": {1: 0.0, 2: 0.002}})
    assert costs.on("sgd", 1) == seconds["sgd"]
    assert costs.on("sgd", 2) == {64: pytest.approx(0.0025), 128: pytest.approx(0.0035)}
    assert costs.on("kfac", 4) == {64: pytest.approx(0.012), 128: pytest.approx(0.014)}  # beyond: the largest P's
    assert costs.on("kfac", 2, communicate=False) == seconds["kfac"]
    # On 2 devices, B = 128 (local 64): sgd 420 x 2.5 ms = 1.05 s instead of 0.84; kfac 200 x 12 ms = 2.4 s.
    assert [p.seconds for p in frontier(steps, costs)["sgd"]] == pytest.approx([1.26, 1.05])
    (tmp_path / "step_cost.json").write_text(json.dumps({
        "command": "python -m benchmarks.step_cost --config x.toml", "machine": "test", "threads": 1,
        "seconds_per_step": seconds, "network": "a test network",
        "communication_seconds_per_step": {"sgd": {"1": 0.0, "2": 0.0005}, "kfac": {"1": 0.0, "2": 0.002}},
    }))  # fmt: skip
    text = "\n".join(cost_section(tmp_path, steps, {}))
    assert "Communication is modelled (below)" in text and "| 2 | 1.05 s at B = 128 | 2.40 s at B = 128 |" in text
    assert "on a test network, never overlapped" in text and "Per step at P = 2: sgd 0.50 ms, kfac 2.00 ms." in text
    assert "compute alone: sgd 1.25x (P = 2), kfac 1.20x (P = 2)." in text  # 1.05 / 0.84, 2.4 / 2.0


def test_communication_model_of_a_run_is_the_gradient_allreduce_plus_kfacs_exchanges() -> None:
    """An MLP 784-64-10 on P devices: SGD's step sends its 50890 gradients once (an allreduce); K-FAC's also sends
    its factors (the 785 x 785 one alone, packed as its upper triangle, at least a reduce-scatter's worth) and the
    decompositions."""
    config = build_config({"model": {"name": "mlp", "hidden": [64]}, "data": {"name": "fashion-mnist"},
                           "optim": {"name": "kfac"}, "run": {"steps": 1}})  # fmt: skip
    parameters = 784 * 64 + 64 + 64 * 10 + 10
    derived = {"parameters": parameters, "input_shape": [1, 28, 28], "classes": 10}
    kfac_run = {**config.to_dict(), "derived": derived}
    sgd_run = {**kfac_run, "optim": {**kfac_run["optim"], "name": "sgd"}}
    sgd, kfac = communication_seconds(sgd_run, 8), communication_seconds(kfac_run, 8)
    assert list(sgd) == list(kfac) == ["1", "2", "4", "8"] and sgd["1"] == kfac["1"] == 0.0
    assert sgd["2"] == pytest.approx(network().seconds("allreduce", 4 * parameters, 2))
    for ranks in ("2", "4", "8"):
        assert kfac[ranks] - sgd[ranks] >= network().seconds("reduce_scatter", 4 * 785 * 786 / 2, int(ranks))
    assert sgd["2"] < sgd["4"] < sgd["8"]


def test_the_benchmark_times_the_cells_it_is_told_and_names_an_unknown_one() -> None:
    study = load_study(Path(__file__).resolve().parents[1] / "jobs/configs/studies/critical_cifar10_cnn.toml")
    assert len(selected_cells(study, None)) == 27
    chosen = selected_cells(study, "kfac:64,sgd:2048")
    assert [(cell.optimizer, cell.batch_size) for cell in chosen] == [("kfac", 64), ("sgd", 2048)]
    with pytest.raises(SystemExit, match=r"--cells: no cell kfac:100 in the study; its cells: sgd:32, "):
        selected_cells(study, "kfac:100")


def test_an_interrupted_benchmark_continues_where_it_stopped(tmp_path: Path) -> None:
    """Real jobs.train runs of a tiny study's 2 cells: killed once the first is measured, the same command again
    measures only the second; other settings are refused while the interrupted run's measurements are kept."""
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "study.toml").write_text(STUDY.split("[tune]")[0] + '[given.sgd]\n"optim.lr" = 0.1\n'
                                         '[given.kfac]\n"optim.lr" = 0.1\n')  # fmt: skip
    out = tmp_path / "step_cost.json"
    command = [PYTHON, "-m", "benchmarks.step_cost", "--config", str(tmp_path / "study.toml"), "--steps", "12",
               "--warmup", "2", "--rounds", "1", "--out", str(out)]  # fmt: skip
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not partial_file(out).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first cell was not measured"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the second cell's jobs.train with it
    first.wait()
    kept = json.loads(partial_file(out).read_text())
    assert [m["cell"] for m in kept["measurements"]] == ["sgd/b32"] and not out.exists()
    other_steps = [*command[:6], "13", *command[7:]]
    other = subprocess.run(other_steps, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "holds the measurements of an interrupted run with other settings" in other.stderr
    assert json.loads(partial_file(out).read_text()) == kept
    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sgd/b32" in again.stdout and "(measured before the interruption)" in again.stdout.split("kfac/b32")[0]
    assert "(measured before the interruption)" not in again.stdout.split("kfac/b32")[1]
    costs = json.loads(out.read_text())
    assert costs["seconds_per_step"]["sgd"]["32"] == kept["measurements"][0]["seconds"]
    assert set(costs["seconds_per_step"]) == {"sgd", "kfac"} and set(costs["decomposition_speedup"]) == {"1"}
    assert not partial_file(out).exists()
