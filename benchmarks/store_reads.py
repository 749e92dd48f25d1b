"""The two reads a running study repeats, whole against incremental, on a real nx-27017 server process.

Run from the repository root, with nothing else running (on a 2-core machine, pause any study first)::

    python -m benchmarks.store_reads                          # 27 cells of 20, 40 and 80 trials, 40-point curves
    python -m benchmarks.store_reads --trials 40 --points 120 --repeats 50

The store holds a study's shape: ``--cells`` experiments (27: 3 optimizers x 9 batch sizes), each with ``--trials``
trials, of which 2 are running and the rest finished (done, pruned or diverged, as a study leaves them), each with a
learning curve of ``--points`` intermediate values. The reads, through the code a study runs:

- **the pruner's read**: at each evaluation of a trial, its ``hpo_worker.curves.CurveWatcher`` reads the other
  trials' curves of its cell. *Whole*: a new watcher, which reads every trial. *Incremental*: the same watcher
  again, which keeps the finished trials' curves and asks only for the unfinished and newer ones.
- **the progress line's read**: every 15 s, a study counts the states of every trial of every cell
  (``hpo_worker.status.StateReader``). *Whole*: a new reader; *incremental*: the same reader again.

Reported per store size, medians over ``--repeats`` reads: the reader's wall time, and the server process's CPU time
per read (psutil): the server is what every worker and the progress line share. The incremental reads' results are
checked against the whole reads' before any timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

OWNER = "bench"
FINISHED_MIX = ("done", "done", "pruned", "pruned", "pruned", "diverged")  # cycled over a cell's finished trials


def _trial_doc(exp_key: str, tid: int, points: int, running: bool) -> dict[str, Any]:
    """One trial document as a worker leaves it: its curve, and a result unless it is still running."""
    from hpo_worker.store import TrialState, utcnow

    curve = [{"step": 10 * (i + 1), "fraction": (i + 1) / points, "value": 1.0 / (i + 1)} for i in range(points)]
    doc: dict[str, Any] = {
        "exp_key": exp_key, "tid": tid, "spec": {"params": {"optim.lr": 0.01 * (tid + 1)}}, "owner": OWNER,
        "version": 0, "book_time": utcnow(), "refresh_time": utcnow(), "intermediate": curve,
    }  # fmt: skip
    if running:
        return doc | {"state": TrialState.RUNNING}
    kind = FINISHED_MIX[tid % len(FINISHED_MIX)]
    state = TrialState.PRUNED if kind == "pruned" else TrialState.DONE
    status = {"done": "ok", "pruned": "pruned", "diverged": "fail"}[kind]
    return doc | {"state": state, "result": {"status": status, "loss": curve[-1]["value"]}}


def fill(url: str, cells: int, trials: int, points: int) -> list[str]:
    """``cells`` experiments of ``trials`` trials each, the last 2 of each running; returns their keys."""
    from hpo_worker.store import connect

    store = connect(url)
    store.ensure_indexes()  # as the driver makes them: both reads rely on them
    keys = [f"bench-cell-{c}" for c in range(cells)]
    store.insert_trials([_trial_doc(k, t, points, running=t >= trials - 2) for k in keys for t in range(trials)])
    store.close()
    return keys


def _timed(read: Callable[[], Any], server: Any, repeats: int) -> tuple[float, float]:
    """Median wall milliseconds of ``read``, and the server's CPU milliseconds per read."""
    walls = []
    cpu_before = sum(server.cpu_times()[:2])
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        walls.append(1000 * (time.perf_counter() - start))
    return statistics.median(walls), 1000 * (sum(server.cpu_times()[:2]) - cpu_before) / repeats


def _watcher(store: Any, exp_key: str, tid: int, run_dir: Path) -> Any:
    """A running trial's curve watcher, as a worker makes it (its thread never started)."""
    from hpo_worker.curves import CurveWatcher

    doc = {"exp_key": exp_key, "tid": tid}
    return CurveWatcher(store, doc, OWNER, run_dir, {"objective": "steps_to_target"}, say=lambda text: None)


def _comparable(docs: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((d.get("exp_key"), int(d["tid"]), int(d["state"]), d.get("status")) for d in docs)


def _change(store: Any, exp_key: str, trials: int) -> None:
    """Between two reads, as in a study: a running trial finishes and a new one starts (the cell keeps 2 running)."""
    from hpo_worker.store import TrialState

    first_running = trials - 2
    result = {"status": "ok", "loss": 0.5}
    store.trials.update_one(
        {"exp_key": exp_key, "tid": first_running}, {"$set": {"state": TrialState.DONE, "result": result}}
    )
    store.insert_trials([_trial_doc(exp_key, trials, 3, running=True)])


def measure(url: str, server: Any, keys: Sequence[str], trials: int, repeats: int) -> dict[str, float]:
    """Whole and incremental timings of both reads; raises if an incremental read, after a trial finished and
    another started, differs from a whole one."""
    from hpo_worker.status import StateReader
    from hpo_worker.store import connect

    store = connect(url)
    with tempfile.TemporaryDirectory() as run_dir:
        watcher = _watcher(store, keys[0], trials - 1, Path(run_dir))  # one of the 2 running
        watcher._read_others()  # the first read is whole; the next ones are incremental
        reader = StateReader(store, keys)
        reader.read()
        _change(store, keys[0], trials)
        whole_curves = _watcher(store, keys[0], trials - 1, Path(run_dir))._read_others()
        if _comparable(watcher._read_others()) != _comparable(whole_curves):
            raise AssertionError("the watcher's incremental read differs from a whole read")
        if _comparable(reader.read()) != _comparable(StateReader(store, keys).read()):
            raise AssertionError("the progress line's incremental read differs from a whole read")
        row: dict[str, float] = {}
        row["prune_whole_ms"], row["prune_whole_cpu"] = _timed(
            lambda: _watcher(store, keys[0], trials - 1, Path(run_dir))._read_others(), server, repeats
        )
        row["prune_incr_ms"], row["prune_incr_cpu"] = _timed(watcher._read_others, server, repeats)
        row["state_whole_ms"], row["state_whole_cpu"] = _timed(lambda: StateReader(store, keys).read(), server, repeats)
        row["state_incr_ms"], row["state_incr_cpu"] = _timed(reader.read, server, repeats)
    store.close()
    return row


def _table(rows: Sequence[tuple[int, int, dict[str, float]]]) -> None:
    print("| trials stored | read | whole: wall (ms) | server CPU (ms) | incremental: wall (ms) | server CPU (ms) |"
          " wall ratio | server CPU ratio |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for total, per_cell, row in rows:
        for read, name in (("prune", f"pruner's (one cell of {per_cell})"), ("state", "progress line's (all cells)")):
            whole, incr = row[f"{read}_whole_ms"], row[f"{read}_incr_ms"]
            cpu_whole, cpu_incr = row[f"{read}_whole_cpu"], row[f"{read}_incr_cpu"]
            # psutil counts CPU time in clock ticks (10 ms): below one tick over all reads it shows as 0
            cpu_ratio = f"{cpu_whole / cpu_incr:.1f}" if cpu_incr > 0 else "(incremental below one tick)"
            print(
                f"| {total} | {name} | {whole:.1f} | {cpu_whole:.1f} | {incr:.1f} | {cpu_incr:.1f} | "
                f"{whole / incr:.1f} | {cpu_ratio} |"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_reads", description=__doc__)
    parser.add_argument("--cells", type=int, default=27, help="experiments (default 27)")
    parser.add_argument("--trials", default="20,40,80", help="trials per cell, one store each (default 20,40,80)")
    parser.add_argument("--points", type=int, default=40, help="intermediate values per curve (default 40)")
    parser.add_argument("--repeats", type=int, default=30, help="reads timed per kind (default 30)")
    args = parser.parse_args(argv)
    import psutil

    from hpo_worker.server import EmbeddedServer

    print(f"# {shlex.join(['python', '-m', 'benchmarks.store_reads', *(argv or sys.argv[1:])])}")
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    rows = []
    for trials in [int(t) for t in args.trials.split(",")]:
        with tempfile.TemporaryDirectory() as data, EmbeddedServer(data) as server:
            assert server.process is not None
            keys = fill(server.url, args.cells, trials, args.points)
            row = measure(server.url, psutil.Process(server.process.pid), keys, trials, args.repeats)
            rows.append((args.cells * trials, trials, row))
    print(f"{args.cells} cells, 2 running trials each, {args.points}-point curves; medians of {args.repeats} reads")
    _table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
