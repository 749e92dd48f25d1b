"""Parallel TPE: the regret of the best trial found with 1, 8 and 16 workers, for each way of telling TPE about
pending trials (hpo_worker.pending), on synthetic objectives over the built-in ``sgd`` space.

Run from the repository root::

    python -m benchmarks.hpo_parallel_tpe                    # 20 seeds, 64 trials, workers 1, 8, 16
    python -m benchmarks.hpo_parallel_tpe --seeds 5 --trials 32 --out runs/bench/tpe.json

The proposals are the driver's own (``hpo_worker.driver.make_trial_docs``: TPE, one trial at a time, pending trials
told as chosen). Only the workers are simulated, in one process: ``k`` trials run at once; each takes an
exponentially distributed time (mean 1, drawn from the seed); when one finishes, its result enters the history
and the next trial is proposed with the other ``k - 1`` still pending. With one worker nothing is ever pending.

Objectives, on the space's parameters mapped to [0, 1] (log scale for lr and weight decay), both with minimum 0:

- ``bowl``: a weighted squared distance to a point inside the space;
- ``rippled``: the bowl plus cosine ripples in lr and momentum, several local minima.

Reported per objective, worker count and choice: the regret (the best loss found, as the minimum is 0) after all
trials, mean ± standard error over the seeds.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

CENTRE = {"lr": 0.6, "decay_factor": 0.7, "decay_epoch": 0.3, "momentum": 0.8, "weight_decay": 0.4}
WEIGHTS = {"lr": 4.0, "decay_factor": 1.0, "decay_epoch": 0.5, "momentum": 2.0, "weight_decay": 1.0}


def _unit(params: Mapping[str, float]) -> dict[str, float]:
    return {
        "lr": (math.log10(params["lr"]) + 4) / 4,
        "decay_factor": (params["decay_factor"] - 0.1) / 0.9,
        "decay_epoch": (params["decay_epoch"] - 10) / 90,
        "momentum": (params["momentum"] - 0.5) / 0.49,
        "weight_decay": (math.log10(params["weight_decay"]) + 6) / 4,
    }


def bowl(params: Mapping[str, float]) -> float:
    u = _unit(params)
    return sum(WEIGHTS[k] * (u[k] - CENTRE[k]) ** 2 for k in CENTRE)


def rippled(params: Mapping[str, float]) -> float:
    u = _unit(params)
    ripples = 2 - math.cos(6 * math.pi * (u["lr"] - CENTRE["lr"])) - math.cos(6 * math.pi * (u["momentum"] - 0.8))
    return bowl(params) + 0.3 * ripples


OBJECTIVES: dict[str, Callable[[Mapping[str, float]], float]] = {"bowl": bowl, "rippled": rippled}


def simulate(objective: str, workers: int, pending: str, trials: int, seed: int) -> float:
    """The best loss after ``trials`` trials run ``workers`` at a time (see the module docstring)."""
    from hpo_worker.driver import make_trial_docs
    from hpo_worker.spaces import load_space
    from hpo_worker.store import TrialState

    space, f, rng = load_space("sgd"), OBJECTIVES[objective], np.random.default_rng([seed, workers])
    docs = make_trial_docs(space, "bench", list(range(workers)), [], seed, pending=pending)
    running = [(float(rng.exponential()), doc["tid"]) for doc in docs]
    heapq.heapify(running)
    by_tid = {doc["tid"]: doc for doc in docs}
    done = 0
    while done < trials:
        now, tid = heapq.heappop(running)
        doc = by_tid[tid]
        doc.update(state=TrialState.DONE, result={"status": "ok", "loss": f(doc["spec"]["params"])})
        done += 1
        if len(by_tid) < trials:
            history = sorted(by_tid.values(), key=lambda d: d["tid"])
            (new,) = make_trial_docs(space, "bench", [len(by_tid)], history, seed, pending=pending)
            by_tid[new["tid"]] = new
            heapq.heappush(running, (now + float(rng.exponential()), new["tid"]))
    return min(d["result"]["loss"] for d in by_tid.values() if d["state"] == TrialState.DONE)


def run(seeds: int, trials: int, workers: list[int], choices: list[str]) -> list[dict[str, Any]]:
    rows = []
    for objective in OBJECTIVES:
        for k in workers:
            for pending in choices if k > 1 else ["-"]:
                regrets = [simulate(objective, k, pending if k > 1 else "inf", trials, s) for s in range(seeds)]
                mean, se = statistics.fmean(regrets), statistics.stdev(regrets) / math.sqrt(len(regrets))
                rows.append({"objective": objective, "workers": k, "pending": pending, "regret": mean, "se": se,
                             "regrets": regrets})  # fmt: skip
                print(f"| {objective} | {k} | {pending} | {mean:.4f} ± {se:.4f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--workers", default="1,8,16")
    parser.add_argument("--pending", default="ignore,inf,worst,mean,best", help="the choices to compare")
    parser.add_argument("--out", default="runs/bench/hpo_parallel_tpe.json")
    args = parser.parse_args()
    print("| objective | workers | pending trials told | regret (mean ± s.e.) |\n|---|---|---|---|", flush=True)
    rows = run(args.seeds, args.trials, [int(k) for k in args.workers.split(",")], args.pending.split(","))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "trials": args.trials, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
