"""How buffers travel between ranks: one interface (``base``), one module per library.

``resolve_communicator`` picks one from what the user asked for or initialised: an explicit communicator, ``"single"``,
``"torch"``, ``"horovod"``, ``"mpi"``, or ``None``: torch.distributed if it is initialised with more than one rank, else
Horovod if it is, else MPI if the program initialised it through mpi4py with more than one rank, else a single process.
"""

from __future__ import annotations

import sys

from distkfac.comm.base import CommStats, CommunicationError, Communicator, Pending, SingleProcessCommunicator
from distkfac.comm.ops import average_gradients, barrier, broadcast_from, leave

__all__ = [
    "CommStats",
    "CommunicationError",
    "Communicator",
    "Pending",
    "SingleProcessCommunicator",
    "average_gradients",
    "barrier",
    "broadcast_from",
    "leave",
    "resolve_communicator",
]


def _torch_distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def _horovod_world() -> int:
    hvd = sys.modules.get("horovod.torch")  # only if the user imported it: never import Horovod on our own
    if hvd is None:
        return 0
    try:
        return int(hvd.size()) if hvd.is_initialized() else 0
    except ValueError:
        return 0


def _mpi_world() -> int:
    mpi = sys.modules.get("mpi4py.MPI")  # only if the program imported it
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return 0
    return int(mpi.COMM_WORLD.Get_size())


def resolve_communicator(comm: Communicator | str | None) -> Communicator:
    if comm is None:
        if _torch_distributed_world() > 1:
            comm = "torch"
        elif _horovod_world() > 1:
            comm = "horovod"
        elif _mpi_world() > 1:
            comm = "mpi"
        else:
            comm = "single"
    if comm == "single":
        return SingleProcessCommunicator()
    if comm == "torch":
        from distkfac.comm.torch_dist import TorchDistCommunicator

        return TorchDistCommunicator()
    if comm == "horovod":
        from distkfac.comm.horovod import HorovodCommunicator

        return HorovodCommunicator()
    if comm == "mpi":
        from distkfac.comm.mpi import MPICommunicator

        return MPICommunicator()
    if isinstance(comm, str):
        raise ValueError(
            f"distkfac: comm must be 'single', 'torch', 'horovod', 'mpi', None or a communicator, got {comm!r}"
        )
    return comm
