"""What TPE is told about pending trials (hpo_worker.pending): the lie's value, that it changes TPE's proposals,
that trials proposed in one round see each other, that it never changes the documents it is given, and bad input."""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import pytest

from hpo_worker.driver import make_trial_docs
from hpo_worker.pending import PENDING_LIES, lie_loss, tell_pending
from hpo_worker.spaces import load_space
from hpo_worker.store import TrialState


def _doc(tid: int, state: TrialState, loss: float | None = None, status: str = "ok") -> dict[str, Any]:
    result = {"status": status, "loss": loss} if loss is not None else {"status": "new"}
    return {"tid": tid, "state": state, "result": result, "misc": {}, "exp_key": "e"}


def test_the_lie_is_the_worst_mean_or_best_finished_loss() -> None:
    docs = [_doc(0, TrialState.DONE, 0.3), _doc(1, TrialState.DONE, 0.1), _doc(2, TrialState.DONE, 0.5),
            _doc(3, TrialState.DONE, 9.0, status="fail"), _doc(4, TrialState.ERROR, 7.0),
            _doc(5, TrialState.NEW), _doc(6, TrialState.RUNNING)]  # fmt: skip
    before = copy.deepcopy(docs)
    assert [lie_loss(docs, how) for how in PENDING_LIES] == [0.5, pytest.approx(0.3), 0.1, None, None]
    told = tell_pending(docs, "best")
    assert [(d["state"], d["result"]) for d in told[5:]] == [
        (TrialState.DONE, {"status": "ok", "loss": 0.1, "lie": "best"})
    ] * 2
    assert [d["tid"] for d in tell_pending(docs, "ignore")] == [0, 1, 2, 3, 4]
    assert tell_pending(docs, "inf")[5:] == docs[5:]  # hyperopt's own: it gives pending trials an infinite loss
    assert docs == before  # copies: the driver's view and the store are never changed
    assert tell_pending([_doc(0, TrialState.NEW)], "worst")[0]["state"] == TrialState.NEW  # nothing to lie with yet
    with pytest.raises(ValueError, match="unknown pending-trial lie 'median'; choose one of worst, mean, best"):
        lie_loss(docs, "median")


def _history(finished: int, pending: int) -> list[dict[str, Any]]:
    """``finished`` trials with a loss that is best near lr = 0.05, then ``pending`` proposed but unfinished."""
    space = load_space("sgd")
    docs = make_trial_docs(space, "e", list(range(finished + pending)), [], seed=3, pending="ignore")
    for doc in docs[:finished]:
        lr = float(doc["spec"]["params"]["lr"])
        doc.update(state=TrialState.DONE, result={"status": "ok", "loss": (lr - 0.05) ** 2})
    return docs


def test_the_lie_enters_tpe_and_one_round_sees_its_own_proposals() -> None:
    space, history = load_space("sgd"), _history(24, 6)  # past TPE's 20 random start-up trials
    proposals = {
        how: [d["spec"]["params"] for d in make_trial_docs(space, "e", [30, 31, 32], history, seed=5, pending=how)]
        for how in PENDING_LIES
    }
    # hyperopt's TPE uses the losses only to split the history into a better and a worse group (the best
    # ceil(0.25 sqrt(n)) trials, here 2): a lie ranked in the worse group acts as hyperopt's own infinity does.
    assert proposals["worst"] == proposals["inf"] == proposals["mean"]
    assert proposals["best"] != proposals["worst"] and proposals["ignore"] != proposals["worst"]
    assert proposals["best"] != proposals["ignore"]
    finished_only = [d for d in history if d["state"] == TrialState.DONE]
    alone = [d["spec"]["params"] for d in make_trial_docs(space, "e", [30, 31], finished_only, seed=5, pending="worst")]
    assert alone[0] == proposals["ignore"][0]  # no pending trial: the lie changes nothing for the first proposal
    assert alone[1] != [d["spec"]["params"] for d in make_trial_docs(space, "e", [30, 31], finished_only, seed=5,
                                                                      pending="ignore")][1]  # fmt: skip
    for doc in make_trial_docs(space, "e", [30], history, seed=5, pending="best"):
        assert doc["state"] == TrialState.NEW and doc["result"] == {"status": "new"}  # what the store receives


def test_a_diverged_trial_enters_tpe_as_the_worst_not_left_out() -> None:
    """A diverged run is stored as status fail with no loss (hpo_worker.trial); hyperopt's TPE gives it an infinite
    loss, so TPE steers away from it. Its proposals are those of the same trial told the worst loss, and differ from
    those of a history without it."""
    space, history = load_space("sgd"), _history(24, 0)
    diverged = max(history, key=lambda d: float(d["spec"]["params"]["lr"]))
    diverged["result"] = {"status": "fail", "failure": "diverged: the training loss is 1e6"}

    def proposed(docs: list[dict[str, Any]]) -> list[Any]:
        return [d["spec"]["params"] for d in make_trial_docs(space, "e", [30, 31, 32], docs, seed=5)]

    worst = [{**d, "result": {"status": "ok", "loss": 1e9}} if d is diverged else d for d in history]
    assert proposed(history) == proposed(worst)
    assert proposed(history) != proposed([d for d in history if d is not diverged])


def test_tpe_models_the_history_after_startup_trials_and_draws_from_the_prior_before() -> None:
    """With 8 finished trials, TPE with startup_trials=4 concentrates its learning rates where the history was good;
    with startup_trials=20 (hyperopt's own: 8 < 20 trials is random search) they spread like the log-uniform
    prior (a standard deviation of ln(1e4) / sqrt(12) = 2.66 in log lr)."""
    space, history = load_space("sgd"), _history(8, 0)
    spread = {}
    for startup in (4, 20):
        log_lrs = [
            math.log(float(doc["spec"]["params"]["lr"]))
            for tid in range(8, 48)
            for doc in make_trial_docs(space, "e", [tid], history, seed=tid, startup_trials=startup)
        ]
        spread[startup] = statistics.stdev(log_lrs)
    assert spread[4] < 0.5 * spread[20] and 1.8 < spread[20] < 3.5, spread
