"""Join the other ranks: torch.distributed (NCCL with GPUs, gloo otherwise) or Horovod, one GPU per local rank.

Joining ends with a communicator (``distkfac.comm``) over the ranks joined, which the training loop and K-FAC share.
Leaving is ``distkfac.comm.leave``: launch only starts and joins processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch

from launch.environment import Environment, LaunchError, detect

if TYPE_CHECKING:  # launch imports no training code when it runs: distkfac only inside init_distributed
    from distkfac.comm import Communicator

Backend = Literal["auto", "gloo", "nccl", "horovod", "single"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    kind: str  # single | torch | horovod
    environment: Environment
    comm: Communicator  # the collectives over these ranks (distkfac.comm)


def _device(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # One GPU per local rank; with CUDA_VISIBLE_DEVICES narrowed to one GPU per task, that GPU is device 0.
    device = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(device)
    return device


def init_distributed(backend: Backend = "auto", timeout: timedelta = timedelta(minutes=10)) -> DistributedContext:
    """Detect this process's place, join the others, and pick its device.

    ``auto``: one process runs alone; several use torch.distributed with NCCL when CUDA is available, else gloo.
    ``horovod`` calls ``hvd.init(process_sets="dynamic")`` (Horovod reads its own launcher's variables).
    """
    if backend not in ("auto", "gloo", "nccl", "horovod", "single"):
        raise LaunchError(f"launch: backend must be auto, gloo, nccl, horovod or single, got {backend!r}")
    env = detect()
    if backend == "horovod":
        rank, size, local_rank = _join_horovod()
        comm = _communicator("horovod", timeout)
        return DistributedContext(rank, size, local_rank, _device(local_rank), "horovod", env, comm)
    if backend == "single" or (backend == "auto" and env.world_size == 1):
        return DistributedContext(0, 1, 0, _device(env.local_rank), "single", env, _communicator("single", timeout))
    device = _join_torch(backend, env, timeout)
    comm = _communicator("torch", timeout)
    return DistributedContext(env.rank, env.world_size, env.local_rank, device, "torch", env, comm)


def _communicator(kind: str, timeout: timedelta) -> Communicator:
    """The communicator over the ranks just joined (distkfac is imported here, when a run starts, not with launch)."""
    from distkfac.comm import resolve_communicator

    if kind == "torch":
        from distkfac.comm.torch_dist import TorchDistCommunicator

        # The join's timeout bounds each collective's wait too: a rank may wait at a barrier while another rank
        # decodes a data set or writes a checkpoint, which the process group's own calls allowed before.
        return TorchDistCommunicator(timeout)
    return resolve_communicator(kind)


def _join_horovod() -> tuple[int, int, int]:
    """``hvd.init`` with dynamic process sets (K-FAC's hybrid strategy needs them); (rank, size, local rank)."""
    try:
        import horovod.torch as hvd
    except ImportError as error:
        raise LaunchError(
            "launch: backend 'horovod' needs Horovod (scripts/build_horovod.sh builds it); or use gloo/nccl"
        ) from error
    hvd.init(process_sets="dynamic")
    return int(hvd.rank()), int(hvd.size()), int(hvd.local_rank())


def _join_torch(backend: Backend, env: Environment, timeout: timedelta) -> torch.device:
    """``init_process_group`` at the launcher's rendezvous (NCCL when CUDA is available, else gloo); the device."""
    import torch.distributed as dist

    name = backend if backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if name == "nccl" and not torch.cuda.is_available():
        raise LaunchError("launch: backend 'nccl' needs CUDA GPUs; this process sees none: use gloo")
    device = _device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr  # an IPv6 literal needs brackets
    dist.init_process_group(
        name,
        init_method=f"tcp://{host}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    return device
