"""``distkfac.comm.ops`` in two real gloo processes: gradient averaging, broadcasts, the barrier, and leave().

Each rank is its own process (no torchrun: its agent would end the other rank as soon as one leaves with a failure),
started by ``tests/comm_ops_worker.py``; every wait is bounded.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import comm_ops_worker
from tests.processes import ENV, PYTHON, ROOT

WORLD = 2
LIMIT_S = 30  # well under the worker's process-group timeout, so that a rank stuck in a barrier fails the test
# Block-buffered stdout, as under a launcher: with PYTHONUNBUFFERED a lost flush in leave() would go unnoticed.
BUFFERED_ENV = {key: value for key, value in ENV.items() if key != "PYTHONUNBUFFERED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(scenario: str, out: Path) -> list[subprocess.Popen[str]]:
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = {
            **BUFFERED_ENV,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
        }
        command = [PYTHON, "-m", "tests.comm_ops_worker", "--scenario", scenario, "--out", str(out)]
        procs.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(proc: subprocess.Popen[str], stdin: str = "") -> tuple[int, str, str]:
    """The exit status, stdout and stderr of ``proc``; a rank still running after LIMIT_S fails the test."""
    try:
        out, err = proc.communicate(stdin, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the rank did not finish within {LIMIT_S} s:\n{out[-2000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def _ops_run(out: Path) -> list[tuple[int, str, str]]:
    procs = _start("ops", out)
    try:
        return [_finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[int, str, str]], list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("comm-ops")
    finished = _ops_run(out)
    for code, _, err in finished:
        assert code == 0, err[-3000:]
    return finished, [torch.load(out / f"ops.rank{rank}.pt") for rank in range(WORLD)]


def test_average_gradients_gives_every_rank_the_mean(ops: Any) -> None:
    _, results = ops
    per_rank = [comm_ops_worker.gradients(rank) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        for position, got in enumerate(result["grads"]):
            mine = per_rank[rank][position]
            if mine is None:
                assert got is None, "a parameter without a gradient must keep none"
                continue
            first, second = (grads[position] for grads in per_rank)
            assert first is not None and second is not None
            assert not torch.equal(first, second), "the ranks must start from different gradients"
            assert got.dtype == mine.dtype
            assert torch.equal(got, (first + second) / WORLD), f"rank {rank}, parameter {position}"


def test_broadcast_from_copies_the_source_ranks_tensors(ops: Any) -> None:
    _, results = ops
    for result in results:
        for got, want in zip(result["from_0"], comm_ops_worker.broadcast_values(0), strict=True):
            assert torch.equal(got, want)
        for got, want in zip(result["from_1"], comm_ops_worker.broadcast_values(1), strict=True):
            assert torch.equal(got, want)


def test_barrier_waits_for_every_rank(ops: Any) -> None:
    _, results = ops
    assert results[0]["saw_marker"], "rank 0 left the barrier before rank 1 had reached it"


def test_leave_0_flushes_and_exits_0_on_every_rank(ops: Any) -> None:
    finished, _ = ops
    for rank, (code, out, err) in enumerate(finished):
        assert code == 0, err[-3000:]
        assert comm_ops_worker.LAST_LINE.format(rank=rank) in out, f"rank {rank}'s unflushed last line was lost"
        assert "terminate called" not in err


def test_leave_with_a_failure_status_exits_with_it_without_a_barrier(tmp_path: Path) -> None:
    procs = _start("fail", tmp_path)
    try:
        # Rank 0 waits on its stdin, in no barrier: rank 1 can only finish if leave(3) does not wait for it.
        code, out, err = _finish(procs[1])
        assert code == 3, err[-3000:]
        assert comm_ops_worker.LAST_LINE.format(rank=1) in out
        code, out, err = _finish(procs[0], stdin="go\n")
        assert code == 4, err[-3000:]
        assert "rank 0: waiting for the test" in out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
