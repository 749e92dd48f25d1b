"""Join the other ranks: torch.distributed (NCCL with GPUs, gloo otherwise), Horovod or MPI; one GPU per local rank.

torch.distributed's ranks meet where ``launch.rendezvous`` says: through MPI under an MPI launcher, else from the
environment. With ``backend="mpi"`` every collective goes through MPI (mpi4py) and torch.distributed is not used.

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
from launch.rendezvous import MPI_LAUNCHERS, meeting_point

if TYPE_CHECKING:  # launch imports no training code when it runs: distkfac only inside init_distributed
    from distkfac.comm import Communicator

Backend = Literal["auto", "gloo", "nccl", "horovod", "mpi", "single"]
BACKENDS = ("auto", "gloo", "nccl", "horovod", "mpi", "single")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    kind: str  # single | torch | horovod | mpi
    environment: Environment
    comm: Communicator  # the collectives over these ranks (distkfac.comm)
    rendezvous: str = "none"  # torch.distributed's meeting point, "mpi:HOST:PORT" or "environment:HOST:PORT"


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
    ``mpi`` uses MPI's world through mpi4py (the process must have been started by an MPI launcher).
    """
    if backend not in BACKENDS:
        raise LaunchError(f"launch: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    env = detect()
    if backend == "horovod":
        rank, size, local_rank = _join_horovod()
        comm = _communicator("horovod", timeout)
        return DistributedContext(rank, size, local_rank, _device(local_rank), "horovod", env, comm)
    if backend == "mpi":
        comm = _join_mpi(env, timeout)
        return DistributedContext(env.rank, env.world_size, env.local_rank, _device(env.local_rank), "mpi", env, comm)
    if backend == "single" or (backend == "auto" and env.world_size == 1):
        return DistributedContext(0, 1, 0, _device(env.local_rank), "single", env, _communicator("single", timeout))
    device, rendezvous = _join_torch(backend, env, timeout)
    comm = _communicator("torch", timeout)
    return DistributedContext(env.rank, env.world_size, env.local_rank, device, "torch", env, comm, rendezvous)


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


def _join_mpi(env: Environment, timeout: timedelta) -> Communicator:
    """The MPI communicator over MPI's world, which must be the launcher's (mpirun, srun --mpi=pmix, ...)."""
    if env.launcher not in MPI_LAUNCHERS:
        raise LaunchError(
            f"launch: backend 'mpi' needs an MPI launcher (mpirun -np N ..., or srun --mpi=pmix ...); this process "
            f"was started by {env.launcher!r}. Or use backend gloo"
        )
    try:
        from distkfac.comm.mpi import MPICommunicator

        comm = MPICommunicator(timeout=timeout)
    except RuntimeError as error:  # mpi4py missing: the message says how to install it
        raise LaunchError(f"launch: backend 'mpi': {error}") from error
    if (comm.rank, comm.world_size) != (env.rank, env.world_size):
        raise LaunchError(
            f"launch: MPI says rank {comm.rank} of {comm.world_size} but the {env.launcher} launcher says rank "
            f"{env.rank} of {env.world_size}: was this process started by another MPI library?"
        )
    return comm


def _join_torch(backend: Backend, env: Environment, timeout: timedelta) -> tuple[torch.device, str]:
    """``init_process_group`` at the rendezvous (NCCL when CUDA is available, else gloo); the device and meeting."""
    import torch.distributed as dist

    name = backend if backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if name == "nccl" and not torch.cuda.is_available():
        raise LaunchError("launch: backend 'nccl' needs CUDA GPUs; this process sees none: use gloo")
    device = _device(env.local_rank)
    meeting = meeting_point(env, os.environ)
    os.environ.setdefault("MASTER_ADDR", meeting.host)
    os.environ.setdefault("MASTER_PORT", str(meeting.port))
    store = dist.TCPStore(
        meeting.host,
        meeting.port,
        env.world_size,
        is_master=env.rank == 0,
        timeout=timeout,
        master_listen_fd=meeting.listen_fd,  # rank 0 under MPI: the socket it already bound, so the port stays ours
    )
    dist.init_process_group(name, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    return device, f"{meeting.how}:{meeting.host}:{meeting.port}"
