"""One rank of a ``distkfac.comm.ops`` test run over gloo, started by ``tests/test_comm_ops.py`` (one process per rank).

    python -m tests.comm_ops_worker --scenario ops|fail --out DIR

``ops``: average_gradients, broadcast_from and barrier on known values; each rank saves what it got, prints a last
line without flushing and calls ``leave(0)``. ``fail``: rank 1 prints a line and calls ``leave(3)`` while rank 0 waits
for a line on its stdin, which the test sends only after rank 1 has exited; then rank 0 calls ``leave(4)``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distkfac.comm import average_gradients, barrier, broadcast_from, leave
from distkfac.comm.torch_dist import TorchDistCommunicator

# Long enough that a barrier inside leave(3) would outlast the test's wait for rank 1 (it would hang, not pass).
TIMEOUT = timedelta(seconds=60)
LAST_LINE = "rank {rank}: the last line before leave"


def gradients(rank: int) -> list[torch.Tensor | None]:
    """The gradients rank ``rank`` starts from: two dtypes (two buffers) and a parameter without one."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        torch.randn(3, 4, generator=generator),
        None,
        torch.randn(5, generator=generator, dtype=torch.float64),
        torch.randn(2, 2, generator=generator),
    ]


def broadcast_values(rank: int) -> list[torch.Tensor]:
    return [torch.full((3,), float(rank)), torch.arange(4, dtype=torch.float64) + 10 * rank]


def run_ops(rank: int, out: Path) -> None:
    comm = TorchDistCommunicator(timeout=TIMEOUT)
    params = []
    for grad in gradients(rank):
        param = torch.nn.Parameter(torch.zeros(1) if grad is None else torch.zeros_like(grad))
        param.grad = grad
        params.append(param)
    average_gradients(params, comm)

    from_0, from_1 = broadcast_values(rank), broadcast_values(rank)
    broadcast_from(from_0, comm)
    broadcast_from(from_1, comm, src=1)

    marker = out / "rank1-before-barrier"
    if rank == 1:
        marker.write_text("written before the barrier")
    barrier(comm, torch.device("cpu"))
    saw_marker = marker.exists()  # on rank 0: only true for sure if the barrier waited for rank 1

    results = {"grads": [p.grad for p in params], "from_0": from_0, "from_1": from_1, "saw_marker": saw_marker}
    torch.save(results, out / f"ops.rank{rank}.pt")
    print(LAST_LINE.format(rank=rank))  # not flushed: stdout is a pipe, so only leave's flush gets it out
    leave(0)


def run_fail(rank: int) -> None:
    if rank == 1:
        print(LAST_LINE.format(rank=rank))
        leave(3)  # rank 0 is in no barrier: leave(3) must not wait for it
    print("rank 0: waiting for the test", flush=True)
    sys.stdin.readline()
    leave(4)  # rank 1 is gone: a barrier here would fail


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["ops", "fail"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    if args.scenario == "ops":
        run_ops(dist.get_rank(), args.out)
    else:
        run_fail(dist.get_rank())


if __name__ == "__main__":
    main()
