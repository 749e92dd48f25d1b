"""hpo_worker's dispatch overhead and throughput with 1, 2 and 4 workers, on a trivial objective.

Run from the repository root::

    python -m benchmarks.hpo_dispatch                       # 48 trials of 0.25 s at 1, 2 and 4 workers
    python -m benchmarks.hpo_dispatch --trials 96 --sleep 0.1 --workers 1,2,4,8

Everything but the objective is the real path: an nx-27017 server process on loopback, the real driver
(``python -m hpo_worker driver``: TPE proposals, queue refills, stale checks) and worker processes running
``hpo_worker.worker.run_worker`` (reserve, heartbeat thread, result write). The objective sleeps ``--sleep`` seconds
instead of training, so that it takes no CPU: on a 2-core machine 4 CPU-bound trials cannot run 4x faster than one,
and sleeping trials measure what the issue asks, the cost of dispatch.

Reported per worker count, all from timestamps the objective itself takes (``time.time()`` on one machine):

- **dispatch gap**: from the end of one trial's objective to the start of the same worker's next one: storing the
  result, reserving the next trial, starting its heartbeat. Median and 95th percentile over all trials but each
  worker's first.
  The driver keeps ``4 x workers`` trials queued, so a free worker always finds one: this gap is the trial's time
  from queued-and-a-worker-free to started. (A worker that finds the queue empty sleeps ``--poll``, default 0.2 s,
  between polls: that wait is not dispatch overhead, and a full queue avoids it.)
- **throughput**: trials per second from the first start to the last end, and the ratio to one worker.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "smoke.toml"  # validated by the driver, never trained here


def sleep_trial(experiment: Mapping[str, Any], doc: Mapping[str, Any], out_dir: Path, launch: Any) -> dict[str, Any]:
    """The trivial objective: sleeps, and returns a loss from the proposed learning rate (so TPE has a signal)."""
    start = time.time()
    time.sleep(float(os.environ["HPO_BENCH_SLEEP"]))
    lr = float(doc["spec"]["params"].get("optim.lr", 0.1))
    return {"status": "ok", "loss": abs(lr - 0.1), "t_start": start, "t_end": time.time(), "queued": doc["tid"]}


def _worker_main(url: str, exp: str) -> int:
    from hpo_worker.store import connect
    from hpo_worker.worker import WorkerOptions, run_worker

    store = connect(url)
    options = WorkerOptions(exp_key=exp, workdir=tempfile.mkdtemp(), idle_timeout_s=3.0, trial_fn=sleep_trial)
    return run_worker(store, options, log=lambda message: None)


def _run(url: str, exp: str, workers: int, trials: int, sleep: float, poll: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HPO_BENCH_SLEEP": str(sleep)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "hpo_worker", "driver", "--mongo", url, "--exp", exp, "--space", "sgd",
         "--config", str(CONFIG), "--max-evals", str(trials), "--queue-size", str(4 * workers),
         "--poll", str(poll)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.hpo_dispatch", "--worker", url, exp], env=env)
        for _ in range(workers)
    ]
    _, err = driver.communicate(timeout=600)
    if driver.returncode != 0:
        raise RuntimeError(f"driver failed: {err}")
    for proc in procs:
        proc.wait(60)

    from hpo_worker.store import connect

    store = connect(url)
    docs = store.trial_docs(exp)
    store.close()
    results = [d["result"] for d in docs if d["result"].get("status") == "ok"]
    if len(results) != trials:
        raise RuntimeError(f"{len(results)} of {trials} trials finished")
    gaps: list[float] = []
    by_owner: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_owner.setdefault(doc["owner"], []).append(doc["result"])
    for runs in by_owner.values():
        runs.sort(key=lambda r: r["t_start"])
        gaps += [b["t_start"] - a["t_end"] for a, b in itertools.pairwise(runs)]
    start = min(r["t_start"] for r in results)
    end = max(r["t_end"] for r in results)
    gaps_ms = sorted(1000 * g for g in gaps)
    return {
        "workers": workers,
        "trials": trials,
        "gap_median_ms": statistics.median(gaps_ms),
        "gap_p95_ms": gaps_ms[int(0.95 * (len(gaps_ms) - 1))],
        "throughput": trials / (end - start),
        "ideal": workers / sleep,
        "owners": len(by_owner),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hpo_dispatch", description=__doc__)
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--trials", type=int, default=48, help="trials per worker count (default 48)")
    parser.add_argument("--sleep", type=float, default=0.25, help="seconds the objective sleeps (default 0.25)")
    parser.add_argument("--poll", type=float, default=0.1, help="the driver's --poll (default 0.1)")
    parser.add_argument("--worker", nargs=2, metavar=("URL", "EXP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(*args.worker)

    from hpo_worker.server import EmbeddedServer

    print(f"# {shlex.join(['python', '-m', 'benchmarks.hpo_dispatch', *(argv or sys.argv[1:])])}")
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as data, EmbeddedServer(data) as server:
        for workers in [int(w) for w in args.workers.split(",")]:
            rows.append(_run(server.url, f"bench-{workers}", workers, args.trials, args.sleep, args.poll))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    one = rows[0]["throughput"] / rows[0]["workers"]
    print("| workers | dispatch gap median (ms) | p95 (ms) | trials/s | ideal trials/s | speed-up vs 1 worker |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['workers']} | {row['gap_median_ms']:.1f} | {row['gap_p95_ms']:.1f} | {row['throughput']:.2f} | "
            f"{row['ideal']:.2f} | {row['throughput'] / one:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
