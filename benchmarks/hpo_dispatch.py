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

``--experiments D --history H[,H2,...]`` measures a study's shape instead: D experiments, each with its own driver
(one per cell of a study) and H finished trials already stored (each with a 100-point learning curve), served by the
same workers (no ``--exp``). It reports the dispatch gap and throughput per history length and, from the server
process's CPU time, the server's work per dispatched trial: a driver whose rounds read every stored trial makes both
grow with H, which is what the comparison between history lengths shows.
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


def sleep_trial(
    experiment: Mapping[str, Any], doc: Mapping[str, Any], out_dir: Path, launch: Any, checkpoint_every_s: float
) -> dict[str, Any]:
    """The trivial objective: sleeps, and returns a loss from the proposed learning rate (so TPE has a signal).
    With a pruner (``--pruner``), it writes a run folder whose metrics.jsonl gains 4 evaluations during the sleep,
    which the worker's curve thread stores and judges as it would a real run's."""
    start = time.time()
    lr = float(doc["spec"]["params"].get("optim.lr", 0.1))
    sleep = float(os.environ["HPO_BENCH_SLEEP"])
    if experiment.get("pruner", {}).get("name", "none") == "none":
        time.sleep(sleep)
    else:
        run = out_dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps({"derived": {"total_steps": 100}, "run": {}}))
        with open(run / "metrics.jsonl", "a", buffering=1) as metrics:
            for step in (25, 50, 75, 100):
                time.sleep(sleep / 4)
                metrics.write(json.dumps({"kind": "eval", "step": step, "test_loss": abs(lr - 0.1) + 25 / step}) + "\n")
    return {"status": "ok", "loss": abs(lr - 0.1), "t_start": start, "t_end": time.time(), "queued": doc["tid"]}


def _worker_main(url: str, exp: str) -> int:
    from hpo_worker.store import connect
    from hpo_worker.worker import WorkerOptions, run_worker

    store = connect(url)
    options = WorkerOptions(exp_key=exp or None, workdir=tempfile.mkdtemp(), idle_timeout_s=3.0, trial_fn=sleep_trial)
    return run_worker(store, options, log=lambda message: None)


def _prefill(url: str, exp: str, history: int) -> None:
    """``history`` finished trials of ``exp``, as a worker stores them (random proposals, a learning curve each)."""
    from hpo_worker.driver import make_trial_docs
    from hpo_worker.spaces import load_space
    from hpo_worker.store import TrialState, connect

    store = connect(url)
    docs = make_trial_docs(load_space("sgd"), exp, list(range(history)), [], seed=1)
    curve = [{"kind": "eval", "step": 10 * i, "epoch": i, "test_loss": 1.0, "test_accuracy": 0.5} for i in range(100)]
    for doc in docs:
        lr = float(doc["spec"]["params"].get("optim.lr", 0.1))
        doc.update(
            state=TrialState.DONE,
            owner="prefill",
            result={"status": "ok", "loss": abs(lr - 0.1), "learning_curve": curve},
        )
    if docs:
        store.insert_trials(docs)
        store.counters.insert_one({"_id": exp, "next_tid": history})  # the driver goes on from tid H
    store.close()


def _run(
    url: str,
    exp: str,
    workers: int,
    trials: int,
    sleep: float,
    poll: float,
    experiments: int = 1,
    history: int = 0,
    server_pid: int | None = None,
    pruner: str = "none",
) -> dict[str, Any]:
    """``trials`` new trials in each of ``experiments`` experiments (``exp``, or ``exp-0``...), each already holding
    ``history`` finished ones, run by ``workers`` workers."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HPO_BENCH_SLEEP": str(sleep)}
    exps = [exp] if experiments == 1 else [f"{exp}-{i}" for i in range(experiments)]
    for name in exps:
        _prefill(url, name, history)
    server = psutil.Process(server_pid) if server_pid else None
    cpu_before = sum(server.cpu_times()[:2]) if server else 0.0
    drivers = [
        subprocess.Popen(
            [sys.executable, "-m", "hpo_worker", "driver", "--mongo", url, "--exp", name, "--space", "sgd",
             "--config", str(CONFIG), "--max-evals", str(history + trials),
             "--queue-size", str(max(4 * workers // experiments, 2)), "--poll", str(poll), "--pruner", pruner,
             "--prune-warmup-steps", "25"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for name in exps
    ]  # fmt: skip
    serve = exp if experiments == 1 else ""  # several experiments: every worker takes trials of any of them
    procs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.hpo_dispatch", "--worker", url, serve], env=env)
        for _ in range(workers)
    ]
    for driver in drivers:
        _, err = driver.communicate(timeout=600)
        if driver.returncode != 0:
            raise RuntimeError(f"driver failed: {err}")
    for proc in procs:
        proc.wait(60)
    server_cpu = sum(server.cpu_times()[:2]) - cpu_before if server else float("nan")

    setting = {"workers": workers, "experiments": experiments, "history": history, "ideal": workers / sleep}
    return setting | _measure(url, exps, history, trials, server_cpu)


def _measure(url: str, exps: list[str], history: int, trials: int, server_cpu: float) -> dict[str, Any]:
    """The dispatch gaps, throughput and server CPU of the new trials, read back from the store."""
    from hpo_worker.store import connect

    store = connect(url)
    docs = [d for name in exps for d in store.trial_docs(name) if d["tid"] >= history]
    store.close()
    results = [d["result"] for d in docs if d["result"].get("status") in ("ok", "pruned")]
    if len(results) != trials * len(exps):
        raise RuntimeError(f"{len(results)} of {trials * len(exps)} trials finished")
    trials = len(results)
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
        "server_cpu_ms_per_trial": 1000 * server_cpu / trials,
        "trials": trials,
        "gap_median_ms": statistics.median(gaps_ms),
        "gap_p95_ms": gaps_ms[int(0.95 * (len(gaps_ms) - 1))],
        "throughput": trials / (end - start),
        "owners": len(by_owner),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hpo_dispatch", description=__doc__)
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    parser.add_argument("--trials", type=int, default=48, help="trials per worker count (default 48)")
    parser.add_argument("--sleep", type=float, default=0.25, help="seconds the objective sleeps (default 0.25)")
    parser.add_argument("--poll", type=float, default=0.1, help="the driver's --poll (default 0.1)")
    parser.add_argument("--experiments", type=int, default=1, help="experiments, one driver each (default 1)")
    parser.add_argument("--history", default="", help="finished trials already stored per experiment, e.g. 0,300")
    parser.add_argument("--pruner", choices=("none", "median", "asha"), default="none", help="the drivers' pruner")
    parser.add_argument("--worker", nargs=2, metavar=("URL", "EXP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(*args.worker)

    from hpo_worker.server import EmbeddedServer

    print(f"# {shlex.join(['python', '-m', 'benchmarks.hpo_dispatch', *(argv or sys.argv[1:])])}")
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.history:
        return _history_main(args)
    rows = []
    with tempfile.TemporaryDirectory() as data, EmbeddedServer(data) as server:
        for workers in [int(w) for w in args.workers.split(",")]:
            rows.append(
                _run(server.url, f"bench-{workers}", workers, args.trials, args.sleep, args.poll, pruner=args.pruner)
            )
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


def _history_main(args: argparse.Namespace) -> int:
    """One row per history length, each on a fresh server; ratios against the first (shortest) history."""
    from hpo_worker.server import EmbeddedServer

    workers = int(args.workers.split(",")[-1])
    rows = []
    for history in [int(h) for h in args.history.split(",")]:
        with tempfile.TemporaryDirectory() as data, EmbeddedServer(data) as server:
            assert server.process is not None
            rows.append(_run(server.url, f"study-{history}", workers, args.trials, args.sleep, args.poll,
                             args.experiments, history, server.process.pid))  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    first = rows[0]
    print(f"{args.experiments} experiments (one driver each), {workers} workers, {args.trials} new trials each")
    print("| finished trials stored | dispatch gap median (ms) | p95 (ms) | trials/s | server CPU per trial (ms) |"
          " gap vs first | server CPU vs first |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['history']} | {row['gap_median_ms']:.1f} | {row['gap_p95_ms']:.1f} | {row['throughput']:.2f} | "
            f"{row['server_cpu_ms_per_trial']:.1f} | {row['gap_median_ms'] / first['gap_median_ms']:.2f} | "
            f"{row['server_cpu_ms_per_trial'] / first['server_cpu_ms_per_trial']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
