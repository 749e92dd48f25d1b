"""The few collectives the training loop itself needs, for torch.distributed, Horovod, or one process.

Starting and stopping the ranks is ``launch.distributed``'s job (:func:`start` only imports it lazily and falls back
to one process when it is not importable and no launcher started several). K-FAC's own traffic is distkfac's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "Context",
    "SingleContext",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_buffers",
    "start",
    "stop",
]

# Variables by which a launcher says that it started several processes (see launch/environment.py).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


class Context(Protocol):
    """What ``launch.distributed.init_distributed`` returns."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def local_rank(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def kind(self) -> str: ...  # single | torch | horovod


@dataclass(frozen=True)
class SingleContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    kind: str = "single"


def start(backend: str) -> Context:
    """Joins the other ranks through ``launch.distributed`` (one process without it, if that is all there is)."""
    try:
        from launch.distributed import init_distributed
    except ImportError as exc:
        sizes = {name: os.environ[name] for name in _WORLD_SIZE_VARS if os.environ.get(name, "1") != "1"}
        if sizes or backend not in ("auto", "single"):
            raise RuntimeError(
                f"a distributed run ({sizes or 'run.backend = ' + backend}) needs the launch package, which cannot "
                f"be imported ({exc}): run from the repository root (python -m jobs.train ...)"
            ) from exc
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return SingleContext(device=device)
    return init_distributed(backend=backend)  # type: ignore[arg-type]


def stop(context: Context) -> None:
    if context.kind == "single":
        return
    from launch.distributed import shutdown_distributed

    shutdown_distributed(context)  # type: ignore[arg-type]


def _horovod() -> Any:
    import horovod.torch as hvd

    return hvd


def all_reduce_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """Sums ``tensor`` over the ranks, in place; returns it."""
    if context.kind == "torch":
        import torch.distributed as dist

        dist.all_reduce(tensor)
    elif context.kind == "horovod":
        hvd = _horovod()
        hvd.allreduce_(tensor, op=hvd.Sum, name="jobs.all_reduce_sum")
    return tensor


def barrier(context: Context) -> None:
    if context.kind == "torch":
        import torch.distributed as dist

        dist.barrier()
    elif context.kind == "horovod":
        all_reduce_sum(torch.zeros(1), context)


def average_gradients(params: Iterable[nn.Parameter], context: Context) -> None:
    """Averages the gradients over the ranks in one flat buffer (for a model without DDP)."""
    if context.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, context).div_(context.world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_buffers(model: nn.Module, context: Context) -> None:
    """Copies rank 0's buffers (batch-norm statistics) to every rank, so that all ranks evaluate the same model."""
    buffers = [b for b in model.buffers() if b.numel()]
    if context.world_size == 1 or not buffers:
        return
    if context.kind == "torch":
        import torch.distributed as dist

        for b in buffers:
            dist.broadcast(b, src=0)
    elif context.kind == "horovod":
        hvd = _horovod()
        for i, b in enumerate(buffers):
            hvd.broadcast_(b, root_rank=0, name=f"jobs.buffer.{i}")
