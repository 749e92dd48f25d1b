"""Collectives built on a communicator for a training loop: gradient averaging, a barrier, broadcasts; and leaving.

One gradient-averaging function serves K-FAC (``KFACPreconditioner`` without DDP) and a plain data-parallel loop.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import NoReturn

import torch

from distkfac.comm.base import Communicator

__all__ = ["average_gradients", "barrier", "broadcast_from", "leave"]


def average_gradients(params: Iterable[torch.Tensor], comm: Communicator, purpose: str = "gradient averaging") -> None:
    """Average every parameter's ``.grad`` over the ranks in place: one flat buffer per device and dtype."""
    if comm.world_size == 1:
        return
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for param in params:
        if param.grad is not None:
            by_kind[(param.grad.device, param.grad.dtype)].append(param.grad)
    pending = []
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        pending.append((grads, flat, comm.allreduce_sum(flat, purpose)))
    for grads, flat, handle in pending:  # all launched first, so that they may overlap
        handle.wait()
        flat.div_(comm.world_size)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def barrier(comm: Communicator, device: torch.device) -> None:
    """Returns once every rank has called it (an allreduce of one number on ``device``, which NCCL needs on a GPU)."""
    if comm.world_size > 1:
        comm.allreduce_sum(torch.zeros(1, device=device), "barrier").wait()


def broadcast_from(
    tensors: Iterable[torch.Tensor], comm: Communicator, src: int = 0, purpose: str = "broadcast"
) -> None:
    """Copy rank ``src``'s ``tensors`` to every rank, in place (every rank passes the same shapes, in order)."""
    if comm.world_size == 1:
        return
    everyone = tuple(range(comm.world_size))
    handles = [comm.broadcast(tensor, src, everyone, purpose) for tensor in tensors]
    for handle in handles:
        handle.wait()


def leave(status: int = 0) -> NoReturn:
    """End a distributed process: flush, barrier, destroy the process group, finalise MPI, exit without teardown.

    torch 2.13's gloo can abort in C++ static destruction ("terminate called without an active exception", SIGABRT)
    even after ``barrier(); destroy_process_group()``: about 1 run in 5 of a plain 2-rank DDP script. Leaving with
    ``os._exit`` skips that teardown, so a finished run does not end as a failed one. Close your files first: nothing
    else is flushed. With ``status != 0`` there is no barrier (the other ranks may be gone; the launcher ends them).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 0:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        hvd = sys.modules.get("horovod.torch")  # only if the program imported it
        if hvd is not None and hvd.is_initialized():
            hvd.shutdown()
        mpi = sys.modules.get("mpi4py.MPI")  # the MPI communicator, or the launch's MPI rendezvous
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            # Open MPI's launcher counts a process that exits without MPI_Finalize as failed, even with status 0.
            mpi.COMM_WORLD.Barrier()
            mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
