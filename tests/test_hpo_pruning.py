"""Pruning (hpo_worker.pruning, hpo_worker.curves): median stopping and ASHA decisions on hand-made curves in a real
nx-27017 store, the run's stop request (jobs.outcome.PRUNE_REQUEST) in one process and on two torchrun ranks, a
SIGKILLed worker during a pruned experiment, TPE's view of pruned trials, and bad pruner settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hpo_worker.curves import CurveWatcher
from hpo_worker.driver import (
    EXPERIMENT_IDENTITY,
    DriverOptions,
    check_experiment,
    experiment_meta,
    make_point_docs,
    run_driver,
)
from hpo_worker.pruning import PrunerSettings, Report, asha_rungs, tell_pruned
from hpo_worker.spaces import load_space
from hpo_worker.store import ExperimentMismatch, TrialState, TrialStore, connect
from hpo_worker.trial import intermediate_values
from jobs.outcome import PRUNE_REQUEST
from tests.processes import processes_mentioning, wait_until_gone
from tests.synthetic_configs import synthetic_mlp_toml
from tests.test_hpo import SPACE, _finish, _wait_for, _worker

TOTAL = 100  # the hand-made runs' budget in steps
TARGET = 0.999  # steps_to_target's accuracy: out of reach of the synthetic runs
POINT = {"optim.lr": 0.05, "optim.momentum": 0.5}


@pytest.fixture
def store(mongo: str) -> Iterator[TrialStore]:
    store = connect(mongo)
    store.ensure_indexes()
    yield store
    store.close()


def _options(
    tmp_path: Path, exp: str, pruner: PrunerSettings, steps: int = TOTAL, objective: str = "test_loss",
    max_evals: int = 10,
) -> DriverOptions:  # fmt: skip
    config = tmp_path / "base.toml"
    run = f"steps = {steps}\neval_every = 0\neval_every_steps = 5\nprogress = false\ntensorboard = false"
    run += f"\ntarget_accuracy = {TARGET}" if objective == "steps_to_target" else ""
    config.write_text(synthetic_mlp_toml(batch_size=32, train_size=256, test_size=128, lr="0.05", run=run))
    (tmp_path / "space.toml").write_text(SPACE)
    space = load_space(str(tmp_path / "space.toml"))
    return DriverOptions(exp, space, str(config), max_evals=max_evals, pruner=pruner, objective=objective)


def _experiment(store: TrialStore, options: DriverOptions) -> dict[str, Any]:
    store.create_or_check_experiment(options.exp_key, experiment_meta(options), EXPERIMENT_IDENTITY)
    experiment = store.get_experiment(options.exp_key)
    assert experiment is not None
    return experiment


def _queue(store: TrialStore, options: DriverOptions) -> int:
    tid = store.new_tids(options.exp_key, 1)[0]
    store.insert_trials(make_point_docs(options.space, options.exp_key, [tid], [POINT]))
    return tid


def _doc(store: TrialStore, query: dict[str, Any]) -> dict[str, Any]:
    doc = store.trials.find_one(query)
    assert doc is not None, query
    return doc


def _curve(values: dict[int, float], total: int = TOTAL) -> list[dict[str, Any]]:
    return [{"step": step, "fraction": step / total, "value": value} for step, value in sorted(values.items())]


def _other(store: TrialStore, options: DriverOptions, values: dict[int, float], state: TrialState) -> None:
    """A trial of someone else, in ``state``, with the curve ``values`` ({step: value})."""
    tid = _queue(store, options)
    status = {TrialState.DONE: "ok", TrialState.PRUNED: "pruned"}.get(state, "running")
    store.trials.update_one(
        {"exp_key": options.exp_key, "tid": tid},
        {"$set": {"state": state, "intermediate": _curve(values), "result": {"status": status}}},
    )


def _watch(
    store: TrialStore, options: DriverOptions, tmp_path: Path, losses: dict[int, float],
    accuracies: dict[int, float] | None = None, queue: bool = True,
) -> tuple[CurveWatcher, dict[str, Any]]:  # fmt: skip
    """Our trial (queued now, or the first queued one), reserved, with a run folder whose metrics.jsonl holds
    evaluations with these test losses (and test accuracies, else 0.5); the watcher has read it once."""
    experiment = _experiment(store, options)
    if queue:
        _queue(store, options)
    doc = store.reserve("me", options.exp_key)
    assert doc is not None
    run_dir = tmp_path / f"run{doc['tid']}"
    run_dir.mkdir()
    target = {"target_accuracy": TARGET} if options.objective == "steps_to_target" else {}
    (run_dir / "config.json").write_text(json.dumps({"derived": {"total_steps": TOTAL}, "run": target}))
    accuracy = accuracies or {}
    lines = [
        {"kind": "eval", "step": step, "test_loss": loss, "test_accuracy": accuracy.get(step, 0.5)}
        for step, loss in losses.items()
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    watcher = CurveWatcher(store, doc, "me", run_dir, experiment, say=print)
    watcher.poll()
    return watcher, doc


def _request(watcher: CurveWatcher) -> str | None:
    path = watcher.run_dir / PRUNE_REQUEST
    return path.read_text() if path.exists() else None


MEDIAN = PrunerSettings("median", warmup_steps=20, min_trials=3)
COMPLETED = ({10: 0.9, 20: 0.5, 30: 0.4}, {10: 0.8, 20: 0.6, 30: 0.5}, {10: 0.7, 20: 0.7, 30: 0.6})


@pytest.mark.parametrize(
    ("settings", "mine", "completed", "verdict"),
    [
        # best-so-far medians of the completed trials at step 20: 0.5, 0.6, 0.7 -> 0.6
        (MEDIAN, {10: 0.9, 20: 0.65}, COMPLETED, "median stopping: best value 0.65 by step 20 is worse than the "
                                                 "median 0.6 of 3 completed trial(s)"),
        (MEDIAN, {10: 0.9, 20: 0.55}, COMPLETED, None),  # better than the median
        (MEDIAN, {10: 0.95}, COMPLETED, None),  # step 10 is within the warm-up
        (MEDIAN, {10: 0.9, 20: 0.65}, COMPLETED[:2], None),  # only 2 completed trials, 3 needed
        # a completed trial whose curve stopped at step 10 (its target) counts at step 20 with its best, 0.2
        (MEDIAN, {10: 0.9, 20: 0.55}, ({10: 0.2}, *COMPLETED[:2]), "median 0.5 of 3"),
    ],
)  # fmt: skip
def test_median_stopping_on_hand_made_curves_in_a_real_store(
    store: TrialStore, tmp_path: Path, settings: PrunerSettings, mine: dict[int, float],
    completed: Sequence[dict[int, float]], verdict: str | None,
) -> None:  # fmt: skip
    options = _options(tmp_path, "median", settings)
    _experiment(store, options)
    for values in completed:
        _other(store, options, values, TrialState.DONE)
    _other(store, options, {10: 0.01, 20: 0.01}, TrialState.RUNNING)  # running trials are not completed ones
    watcher, doc = _watch(store, options, tmp_path, mine)
    stored = _doc(store, {"_id": doc["_id"]})
    assert stored["intermediate"] == _curve(mine)  # the curve is in the store, whatever the verdict
    request = _request(watcher)
    assert (request is None) == (verdict is None), request
    assert verdict is None or verdict in str(request), request


ASHA = PrunerSettings("asha", min_fraction=0.25, reduction_factor=2)


@pytest.mark.parametrize(
    ("mine", "others", "verdict"),
    [
        # rung 0.25: 0.3 (done), 0.5 (pruned), 0.6 (running) and ours; the best 4 // 2 = 2 go on
        ({25: 0.6}, "three", "ASHA: value 0.6 at rung 0.25 of the budget is not among the best 2 of 4"),
        ({25: 0.4}, "three", None),
        ({10: 0.2, 25: 0.6}, "three", None),  # its best so far, 0.2, counts at the rung
        ({25: 0.6}, "none", None),  # the first trial at a rung goes on
        ({25: 0.2, 30: 0.9}, "three", None),  # step 30 reaches no new rung: no decision there
        # rung 0.5: 0.1 (done) and ours, 0.25 (its best so far); the best 2 // 2 = 1 goes on
        ({25: 0.25, 50: 0.9}, "three", "value 0.25 at rung 0.5 of the budget is not among the best 1 of 2"),
    ],
)  # fmt: skip
def test_asha_on_hand_made_curves_in_a_real_store(
    store: TrialStore, tmp_path: Path, mine: dict[int, float], others: str, verdict: str | None
) -> None:
    options = _options(tmp_path, "asha", ASHA)
    _experiment(store, options)
    assert asha_rungs(ASHA) == [0.25, 0.5]
    if others == "three":
        _other(store, options, {25: 0.3, 50: 0.1}, TrialState.DONE)
        _other(store, options, {25: 0.5}, TrialState.PRUNED)
        _other(store, options, {20: 0.6, 25: 0.7}, TrialState.RUNNING)  # 0.6 is its best up to the rung
    watcher, _ = _watch(store, options, tmp_path, mine)
    request = _request(watcher)
    assert (request is None) == (verdict is None), request
    assert verdict is None or verdict in str(request), request


BEHIND = PrunerSettings("median", warmup_steps=20, min_trials=3, behind_best=True)  # the median never decides here
REACHED_AT_20 = {10: 1.3, 20: 0.2}  # steps_to_target's values: 1 + the accuracy missing, then the budget fraction


@pytest.mark.parametrize(
    ("accuracies", "other", "state", "earlier", "verdict"),
    [
        ({10: 0.5, 20: 0.6}, REACHED_AT_20, TrialState.DONE, True,
         "behind the best: not at the target by step 20, where an earlier trial had reached it (step 20)"),
        ({10: 0.5, 30: 0.6}, REACHED_AT_20, TrialState.DONE, True, "not at the target by step 30"),
        ({10: 0.5}, REACHED_AT_20, TrialState.DONE, True, None),  # it may still reach the target first
        ({10: 0.5, 20: 0.6}, REACHED_AT_20, TrialState.DONE, False, None),  # a later trial: every prefix's best kept
        ({10: 0.5, 20: 0.6}, REACHED_AT_20, TrialState.RUNNING, True, None),  # not completed
        ({10: 0.5, 20: 0.6}, {10: 1.3, 20: 1.2}, TrialState.DONE, True, None),  # it never reached the target
        ({10: 0.5, 20: TARGET}, REACHED_AT_20, TrialState.DONE, True, None),  # a tie at step 20 is not behind
    ],
)  # fmt: skip
def test_the_behind_best_stop_on_hand_made_curves_in_a_real_store(
    store: TrialStore, tmp_path: Path, accuracies: dict[int, float], other: dict[int, float], state: TrialState,
    earlier: bool, verdict: str | None,
) -> None:  # fmt: skip
    options = _options(tmp_path, "behind", BEHIND, objective="steps_to_target")
    _experiment(store, options)
    if not earlier:
        _queue(store, options)  # ours first: the other trial gets the larger tid
    _other(store, options, other, state)
    watcher, doc = _watch(store, options, tmp_path, dict.fromkeys(accuracies, 1.0), accuracies, queue=earlier)
    assert (doc["tid"] > 0) == earlier
    values = [r["value"] for r in _doc(store, {"_id": doc["_id"]})["intermediate"]]
    assert values == pytest.approx([s / TOTAL if a >= TARGET else 1 + TARGET - a for s, a in accuracies.items()])
    request = _request(watcher)
    assert (request is None) == (verdict is None), request
    assert verdict is None or verdict in str(request), request


CHANCE = 1 + TARGET - 0.11  # steps_to_target's value of a best accuracy of 11%: a 10-class run still at chance
AT_CHANCE = PrunerSettings(threshold=CHANCE, threshold_after=0.2)  # alone: no rule, no behind-best stop


@pytest.mark.parametrize(
    ("accuracies", "settings", "verdict"),
    [
        ({10: 0.1, 20: 0.1}, AT_CHANCE,
         f"threshold: best value 1.899 by step 20 (20% of the budget) is still at or above {CHANCE:g}"),
        ({10: 0.1, 30: 0.105}, AT_CHANCE, "by step 30 (30% of the budget)"),  # its first report past 20%
        ({10: 0.1}, AT_CHANCE, None),  # before 20% of the budget
        ({10: 0.1, 20: 0.12}, AT_CHANCE, None),  # it left chance
        ({10: 0.3, 20: 0.1}, AT_CHANCE, None),  # its best so far is above chance: not at the bad end
        ({10: 0.1, 20: 0.1}, replace(MEDIAN, threshold=CHANCE, threshold_after=0.2), "threshold: best value"),
        ({10: 0.1, 20: 0.1}, MEDIAN, None),  # the median alone: too few completed trials to compare
    ],
)  # fmt: skip
def test_the_threshold_stop_on_hand_made_curves_in_a_real_store(
    store: TrialStore, tmp_path: Path, accuracies: dict[int, float], settings: PrunerSettings, verdict: str | None
) -> None:
    options = _options(tmp_path, "threshold", settings, objective="steps_to_target")
    watcher, _ = _watch(store, options, tmp_path, dict.fromkeys(accuracies, 1.0), accuracies)
    request = _request(watcher)
    assert (request is None) == (verdict is None), request
    assert verdict is None or verdict in str(request), request


def test_the_watcher_reads_the_finished_trials_once_and_the_others_at_each_evaluation(
    store: TrialStore, tmp_path: Path
) -> None:
    """Two completed trials (the median rule needs 3) and one running: no stop. Then the running one completes,
    and the watcher's next read asks for it and for newer trials only, not for the finished ones again; with the
    third completed curve, the median stops our trial."""
    options = _options(tmp_path, "cached", MEDIAN)
    _experiment(store, options)
    for values in COMPLETED[:2]:
        _other(store, options, values, TrialState.DONE)
    _other(store, options, {10: 0.95}, TrialState.RUNNING)  # tid 2
    asked: list[tuple[list[int], int]] = []
    curves = store.curves

    def spy(exp_key: str, tids: Sequence[int] = (), after_tid: int = -1) -> list[dict[str, Any]]:
        asked.append((sorted(tids), after_tid))
        return curves(exp_key, tids, after_tid)

    store.curves = spy  # type: ignore[method-assign]
    watcher, doc = _watch(store, options, tmp_path, {10: 0.9, 20: 0.65})  # ours: tid 3
    assert _request(watcher) is None and asked == [([], -1)]
    store.trials.update_one(
        {"exp_key": "cached", "tid": 2},
        {"$set": {"state": TrialState.DONE, "intermediate": _curve(COMPLETED[2]), "result": {"status": "ok"}}},
    )
    with (watcher.run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"kind": "eval", "step": 30, "test_loss": 0.65, "test_accuracy": 0.5}) + "\n")
    watcher.poll()
    assert asked[1] == ([2], doc["tid"])  # the running one, and any trial newer than ours
    assert "worse than the median 0.5 of 3 completed trial(s)" in str(_request(watcher))


def test_a_running_trial_takes_the_behind_best_stop_at_its_next_evaluation(store: TrialStore, tmp_path: Path) -> None:
    median = PrunerSettings("median", warmup_steps=20, min_trials=3)
    options = _options(tmp_path, "turned", median, objective="steps_to_target")
    _experiment(store, options)
    _other(store, options, REACHED_AT_20, TrialState.DONE)
    watcher, _ = _watch(store, options, tmp_path, {10: 1.0, 20: 1.0}, {10: 0.5, 20: 0.5})
    assert _request(watcher) is None  # past the best's step, but the stop is off
    store.update_experiment("turned", {"pruner": replace(median, behind_best=True).to_doc()})  # as a resumed driver
    with (watcher.run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"kind": "eval", "step": 30, "test_loss": 1.0, "test_accuracy": 0.5}) + "\n")
    watcher.poll()
    assert "behind the best: not at the target by step 30" in str(_request(watcher))


def test_a_real_trial_behind_the_best_stops_there(mongo: str, store: TrialStore, tmp_path: Path) -> None:
    steps = 200000  # hours, unless it is stopped
    options = _options(tmp_path, "behind-run", PrunerSettings(behind_best=True), steps=steps,
                       objective="steps_to_target")  # fmt: skip
    _experiment(store, options)
    _other(store, options, {10: 10 / steps}, TrialState.DONE)  # reached the target at step 10 of the same budget
    tid = _queue(store, options)
    worker = _worker(mongo, tmp_path, "--exp", "behind-run", "--max-trials", "1", "--idle-timeout", "5")
    rc, out = _finish(worker, timeout=120)
    assert rc == 0, out
    doc = _doc(store, {"exp_key": "behind-run", "tid": tid})
    result = doc["result"]
    assert doc["state"] == TrialState.PRUNED and "behind the best: not at the target by step" in result["pruned"]
    assert "had reached it (step 10)" in result["pruned"], result
    # evaluations every 5 steps; the watcher reads them every 0.25 s, so the stop comes a few evaluations late
    assert [r["step"] for r in doc["intermediate"]][:2] == [5, 10] and 10 <= result["steps"] < 2000, doc
    assert result["loss"] > 1 and result["loss"] == doc["intermediate"][-1]["value"], result


def test_a_resumed_experiment_may_turn_the_behind_best_stop_on_and_change_nothing_else(
    store: TrialStore, tmp_path: Path
) -> None:
    median = PrunerSettings("median", warmup_steps=20, min_trials=3)
    options = _options(tmp_path, "resume", median, objective="steps_to_target", max_evals=1)
    _experiment(store, options)
    assert "behind_best" not in _experiment(store, options)["pruner"]  # as stored before the stop existed
    assert check_experiment(store, options) is False
    _other(store, options, {10: 0.2}, TrialState.DONE)  # the one trial of max_evals 1: a driver only resumes
    store.trials.update_one({"exp_key": "resume"}, {"$set": {"result": {"status": "ok", "loss": 0.2}}})
    other = replace(options, pruner=replace(median, min_trials=4))
    with pytest.raises(ExperimentMismatch, match="another pruner"):
        check_experiment(store, other)  # what a study checks before it starts any process
    with pytest.raises(ExperimentMismatch, match="another pruner"):
        run_driver(store, other, log=print)  # what a driver checks
    said: list[str] = []
    behind = replace(options, pruner=replace(median, behind_best=True))
    assert run_driver(store, behind, log=said.append) == 0
    experiment = _experiment(store, options)
    assert experiment["pruner"] == behind.pruner.to_doc() and experiment["pruner"]["behind_best"] is True
    [change] = experiment["pruner_changes"]
    assert change["trials_before"] == 1 and change["from"] == median.to_doc() and change["to"] == behind.pruner.to_doc()
    assert any("the behind-best stop is on from now; 1 trial(s) were made before" in line for line in said), said
    assert check_experiment(store, behind) is False  # stored now: a second resume changes nothing
    with pytest.raises(ExperimentMismatch, match="another pruner"):
        check_experiment(store, options)  # and it cannot be turned off again


def test_a_resumed_experiment_may_turn_the_threshold_stop_on_and_it_is_recorded(
    store: TrialStore, tmp_path: Path
) -> None:
    options = _options(tmp_path, "resume-threshold", MEDIAN, objective="steps_to_target", max_evals=1)
    assert "threshold" not in _experiment(store, options)["pruner"]  # as stored before the stop existed
    _other(store, options, {10: 0.2}, TrialState.DONE)
    store.trials.update_one({"exp_key": "resume-threshold"}, {"$set": {"result": {"status": "ok", "loss": 0.2}}})
    both = replace(MEDIAN, behind_best=True, threshold=CHANCE, threshold_after=0.2)
    said: list[str] = []
    assert run_driver(store, replace(options, pruner=both), log=said.append) == 0
    experiment = _experiment(store, options)
    assert experiment["pruner"] == both.to_doc() and experiment["pruner"]["threshold"] == CHANCE
    [change] = experiment["pruner_changes"]
    assert change["trials_before"] == 1 and change["from"] == MEDIAN.to_doc() and change["to"] == both.to_doc()
    expected = f"the behind-best stop and the threshold stop ({CHANCE:g} after 0.2) are on from now; 1 trial(s)"
    assert any(expected in line for line in said), said
    for other in (
        replace(both, threshold=1.5),
        replace(both, threshold_after=0.5),
        replace(both, threshold=None, threshold_after=0),
    ):
        with pytest.raises(ExperimentMismatch, match="another pruner"):
            check_experiment(store, replace(options, pruner=other))  # a stop once on cannot move or go


def test_intermediate_values_follow_the_objective() -> None:
    records = [
        {"kind": "epoch", "step": 10, "accuracy": 0.6},
        {"kind": "eval", "step": 10, "test_loss": 1.5, "test_accuracy": 0.7},
        {"kind": "eval", "step": 20, "test_loss": 1.0, "test_accuracy": 0.85},
    ]
    assert intermediate_values(records, "test_loss", 40, None) == [Report(10, 0.25, 1.5), Report(20, 0.5, 1.0)]
    assert [r.value for r in intermediate_values(records, "train_error", 40, None)] == [pytest.approx(0.4)]
    # steps to an 80% target: 1 + the accuracy missing, then the fraction of the budget used
    assert [r.value for r in intermediate_values(records, "steps_to_target", 40, 0.8)] == [pytest.approx(1.1), 0.5]


def test_tpe_sees_a_pruned_trial_as_its_last_value_or_not_at_all() -> None:
    docs = [
        {"tid": 0, "state": TrialState.DONE, "result": {"status": "ok", "loss": 0.3}},
        {"tid": 1, "state": TrialState.PRUNED, "result": {"status": "pruned", "loss": 0.9}},
    ]
    last = tell_pruned(docs, "last")
    assert last[1]["state"] == TrialState.DONE and last[1]["result"] == {"status": "ok", "loss": 0.9}
    assert docs[1]["state"] == TrialState.PRUNED  # the caller's documents are not changed
    assert [d["tid"] for d in tell_pruned(docs, "ignore")] == [0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "median"}, "the median pruner needs warm-up steps"),
        ({"name": "asha", "reduction_factor": 1}, "ASHA's reduction factor must be an integer of at least 2"),
        ({"name": "asha", "min_fraction": 1.0}, "ASHA's first rung must be a fraction of the budget in"),
        ({"name": "hyperband"}, "unknown pruner 'hyperband': choose one of none, median, asha"),
        ({"threshold_after": 0.2}, "threshold_after needs a threshold"),
        ({"threshold": 1.4, "threshold_after": 1.0}, r"the fraction of its budget a trial trains .* in \[0, 1\)"),
        ({"threshold": float("nan")}, "the pruning threshold must be a finite number, not nan"),
    ],
)
def test_bad_pruner_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrunerSettings(**settings)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pruner", "median"], "the median pruner needs warm-up steps (--prune-warmup-steps, now 0)"),
        (["--pruner", "asha", "--asha-reduction-factor", "1"], "ASHA's reduction factor must be an integer of"),
        (["--prune-behind-best"], "the behind-best stop needs the steps_to_target objective (it reads a trial's"),
        (["--prune-threshold", "1.4", "--prune-threshold-after", "2"], "(--prune-threshold-after) is the fraction"),
    ],
)
def test_the_driver_refuses_bad_pruner_flags_in_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    options = _options(tmp_path, "bad", PrunerSettings())
    done = subprocess.run(
        [
            sys.executable, "-m", "hpo_worker", "driver", "--mongo", "mongodb://127.0.0.1:1/x", "--exp", "bad",
            "--space", str(tmp_path / "space.toml"), "--config", options.config_path, "--max-evals", "2", *flags,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def _prunable(store: TrialStore, tmp_path: Path, exp: str, steps: int) -> tuple[DriverOptions, int]:
    """An experiment whose completed trial is perfect (loss 0 from step 1): the median pruner stops any new trial
    at its first evaluation after the warm-up; and one queued trial of ``steps`` steps."""
    options = _options(tmp_path, exp, PrunerSettings("median", warmup_steps=10), steps=steps)
    _experiment(store, options)
    _other(store, options, {1: 0.0}, TrialState.DONE)
    return options, _queue(store, options)


@pytest.mark.parametrize("launch", [(), ("--launcher", "torchrun", "--ranks", "2")], ids=["in-process", "torchrun-2"])
def test_a_pruned_trial_stops_on_every_rank(
    mongo: str, store: TrialStore, tmp_path: Path, launch: tuple[str, ...]
) -> None:
    _, tid = _prunable(store, tmp_path, "cut", steps=200000)  # hours, unless it is stopped
    worker = _worker(mongo, tmp_path, "--exp", "cut", "--max-trials", "1", "--idle-timeout", "5", *launch)
    rc, out = _finish(worker, timeout=120)
    assert rc == 0, out
    doc = _doc(store, {"exp_key": "cut", "tid": tid})
    result = doc["result"]
    assert doc["state"] == TrialState.PRUNED and result["status"] == "pruned", doc
    assert "median stopping" in result["pruned"] and f"trial {tid}: pruned at step" in out, out
    assert 10 <= result["steps"] < 2000, result  # stopped soon after the warm-up, every rank at the same step
    assert result["loss"] == doc["intermediate"][-1]["value"] and doc["intermediate"][-1]["step"] <= result["steps"]
    summary = json.loads((Path(result["out_dir"]) / "run" / "summary.json").read_text())
    assert summary["end"] == "pruned" and summary["steps"] == result["steps"], summary
    assert not processes_mentioning(result["out_dir"]), "a rank outlived the trial"


def test_a_sigkilled_worker_during_a_pruned_experiment_leaves_nothing_running_and_nothing_lost(
    mongo: str, store: TrialStore, tmp_path: Path
) -> None:
    options = _options(tmp_path, "kill", PrunerSettings("median", warmup_steps=10, min_trials=2), steps=200000)
    _experiment(store, options)
    _other(store, options, {1: 0.0}, TrialState.DONE)  # one completed trial: min_trials 2 keeps the trial going
    tid = _queue(store, options)
    victim = _worker(mongo, tmp_path, "--exp", "kill", "--launcher", "torchrun", "--ranks", "2")
    curve = _wait_for(lambda: _doc(store, {"tid": tid, "exp_key": "kill"}).get("intermediate"), 90,
                      "the trial's first intermediate values")  # fmt: skip
    assert curve and curve[0]["step"] == 5, curve
    killed = f"trial{tid}.{_doc(store, {'tid': tid, 'exp_key': 'kill'})['version']}"
    run_dir = str(tmp_path / "runs" / "kill")
    assert processes_mentioning(run_dir), "the ranks should be running"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not wait_until_gone(run_dir, 30), "ranks outlived their SIGKILLed worker"
    # A second completed trial: the next attempt is pruned at its first evaluation after the warm-up.
    _other(store, options, {1: 0.0}, TrialState.DONE)
    rescuer = _worker(mongo, tmp_path, "--exp", "kill", "--max-trials", "1", "--idle-timeout", "20")
    rc, out = _finish(rescuer, timeout=120)
    assert rc == 0 and "is gone (its process on this host ended): requeued" in out, out
    doc = _doc(store, {"exp_key": "kill", "tid": tid})
    assert doc["state"] == TrialState.PRUNED and doc["attempts"] == 2 and len(doc["misc"]["lost_owners"]) == 1, doc
    # the second attempt's own folder and curve (a reservation starts the curve again)
    assert Path(doc["result"]["out_dir"]).name != killed and doc["intermediate"][0]["step"] == 5, doc
    assert doc["result"]["steps"] < 2000 and "median stopping" in doc["result"]["pruned"], doc["result"]
    counts = store.count_states("kill")
    assert counts[TrialState.RUNNING] == counts[TrialState.NEW] == 0 and counts[TrialState.PRUNED] == 1, counts
    assert not processes_mentioning(run_dir)


def test_the_threshold_replay_merges_a_trials_attempts_and_judges_as_a_worker(tmp_path: Path) -> None:
    """benchmarks.threshold_replay on hand-made run folders: a trial resumed in a second attempt is one curve (the
    later attempt's records win), stopped at its first evaluation past 20% of the budget; one that left chance is
    not."""
    from benchmarks.threshold_replay import replay, trial_records

    def attempt(name: str, evals: dict[int, float]) -> None:
        run = tmp_path / name / "run"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"derived": {"total_steps": 100}}))
        lines = [{"kind": "step", "step": s, "seconds": 1.0} for s in evals]
        lines += [{"kind": "eval", "step": s, "test_accuracy": a, "seconds": 0.5} for s, a in evals.items()]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    attempt("trial0.1", {10: 0.1, 20: 0.3})  # interrupted after step 20: its step-20 evaluation is replaced
    attempt("trial0.3", {20: 0.1, 30: 0.1, 40: 0.6})
    attempt("trial1.1", {10: 0.1, 20: 0.15, 30: 0.6})
    attempt("trial2.1", {})  # no evaluation yet
    trials = trial_records(tmp_path)
    assert sorted(trials) == [0, 1, 2] and trials[0][0] == 100
    assert [(r["kind"], r["step"]) for r in trials[0][1] if r["kind"] == "eval"] == [
        ("eval", s) for s in (10, 20, 30, 40)
    ]
    settings = PrunerSettings(threshold=1 + 0.55 - 0.11, threshold_after=0.2)
    assert [replay(trials[t][1], 100, 0.55, settings) for t in (0, 1, 2)] == [20, None, None]
