"""One rank of an MPI communicator check, started by ``mpirun`` from ``tests/test_mpi.py``.

    mpirun -np 3 python -m tests.mpi_worker --out DIR

Runs every collective of ``distkfac.comm.mpi.MPICommunicator`` on known values, in every dtype it carries, and saves
what this rank got as ``DIR/rank<r>.json``; the test checks the values. On a machine with a GPU it repeats the
allreduce on GPU tensors, staged through the host and (if the MPI library is CUDA-aware) directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from distkfac.comm import average_gradients, barrier, broadcast_from, leave
from distkfac.comm.mpi import MPICommunicator, mpi_buffer

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shared_memory(comm: MPICommunicator) -> dict[str, bool]:
    """Whether the buffer handed to MPI is the tensor's own memory (no copy), per dtype."""
    views = {}
    for name, dtype in {**DTYPES, "int64": torch.int64}.items():
        tensor = torch.arange(5).to(dtype)
        memory = mpi_buffer(comm.MPI, tensor)[0]
        views[name] = bool(memory.ctypes.data == tensor.data_ptr())
    return views


def sums(comm: MPICommunicator, device: torch.device) -> dict[str, list[float]]:
    """allreduce_sum of rank + 1 (plus an index) in every dtype: every rank gets the same exact sum."""
    got = {}
    for name, dtype in DTYPES.items():
        tensor = (torch.arange(4, dtype=torch.float64) + comm.rank + 1).to(dtype).to(device)
        comm.allreduce_sum(tensor, "sum").wait()
        got[name] = tensor.double().cpu().tolist()
    return got


def owner_reductions(comm: MPICommunicator) -> dict[str, Any]:
    """reduce_to_owners with segments of one buffer (2, 0 and 3 elements) and with separate tensors."""
    rank = comm.rank
    flat = torch.arange(5, dtype=torch.float64) * (rank + 1)
    views = list(flat.split([2, 0, 3]))
    comm.reduce_to_owners(views, "factors").wait()
    separate = [torch.full((n,), float(rank + 1), dtype=torch.float16) for n in (1, 2, 3)]
    comm.reduce_to_owners(separate, "factors").wait()
    return {"views": views[rank].tolist(), "separate": separate[rank].double().tolist()}


def broadcasts(comm: MPICommunicator) -> dict[str, Any]:
    """From rank 1 to everyone, and from rank 2 to the group (0, 2) only."""
    comm.prepare_groups([(0, 2), (0, 1, 2)])
    everyone = torch.full((3,), float(comm.rank), dtype=torch.float32)
    comm.broadcast(everyone, 1, (0, 1, 2), "broadcast").wait()
    pair = torch.full((2,), float(10 + comm.rank), dtype=torch.bfloat16)
    if comm.rank in (0, 2):
        comm.broadcast(pair, 2, (0, 2), "pair").wait()
    return {"everyone": everyone.tolist(), "pair": pair.double().tolist()}


def loop_ops(comm: MPICommunicator) -> dict[str, Any]:
    """The training loop's collectives (``distkfac.comm.ops``) over this communicator."""
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    param.grad = torch.full((4,), float(comm.rank), dtype=torch.float64)
    average_gradients([param], comm)
    state = [torch.full((2,), float(comm.rank))]
    broadcast_from(state, comm, src=2)
    barrier(comm, torch.device("cpu"))
    return {"mean_grad": param.grad.tolist(), "from_2": state[0].tolist(), "ints": comm.allgather_ints([comm.rank, 7])}


def on_gpu(comm: MPICommunicator) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False}
    device = torch.device("cuda", 0)
    comm.cuda_aware, cuda_aware = False, comm.cuda_aware
    staged = sums(comm, device)
    comm.cuda_aware = cuda_aware
    return {"available": True, "cuda_aware": cuda_aware, "staged": staged, "as_is": sums(comm, device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPICommunicator()
    result: dict[str, Any] = {"rank": comm.rank, "world_size": comm.world_size, "shared_memory": shared_memory(comm)}
    result["sums"] = sums(comm, torch.device("cpu"))
    result["owners"] = owner_reductions(comm)
    result["bytes"], result["calls"] = dict(comm.stats.bytes_sent), dict(comm.stats.calls)
    result["broadcasts"] = broadcasts(comm)
    result["loop"] = loop_ops(comm)
    result["gpu"] = on_gpu(comm)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{comm.rank}.json").write_text(json.dumps(result))
    leave(0)


if __name__ == "__main__":
    main()
