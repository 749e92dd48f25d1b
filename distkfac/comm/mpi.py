"""Collectives through MPI (mpi4py), for clusters where MPI is how processes meet: no torch.distributed, no gloo.

- **Buffers.** A CPU tensor goes to MPI as a NumPy view of its own memory (no copy). float16 and bfloat16 travel as
  16-bit words with a user-defined sum (MPI has no such floating types everywhere).
- **GPU tensors** go to MPI directly (``__cuda_array_interface__``) where the MPI library is CUDA-aware: Open MPI's
  ``MPIX_Query_cuda_support()`` says so, or ``DISTKFAC_MPI_CUDA_AWARE=1`` forces it (``=0`` forbids it). Otherwise they
  are staged through host memory: one device-to-host copy before the collective and one host-to-device copy when it
  is waited for. The current CUDA stream is synchronised first in both cases, because MPI does not know streams.
- **Reduction to owners** is one ``MPI_Ireduce_scatter`` with unequal counts per bucket, at any number of ranks.
- **Failures.** MPI has no timeouts: ``wait`` polls the requests and raises CommunicationError after ``timeout`` (a
  rank that hangs). The process then exits with status 1 whatever else it does, without MPI_Finalize (which would
  wait for the hanging rank), and the MPI launcher ends the others. When a rank dies, Open MPI's ``mpirun`` (and
  ``srun``) end every other rank at once and print which rank died and its exit status; the survivors print no
  Python error of their own. A rank that fails in its own code should leave with ``distkfac.comm.leave(status)``:
  a plain exception would reach MPI_Finalize at exit and wait there until the others time out.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from distkfac.comm.base import CommStats, CommunicationError, Done, Pending, guarded, nbytes

# Variables by which an MPI launcher (Open MPI, PMIx under srun, MPICH/Intel MPI's PMI) marks its processes.
MPI_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")
_HALF = (torch.float16, torch.bfloat16)


def import_mpi() -> Any:
    """mpi4py's ``MPI`` module (which initialises MPI), or a RuntimeError that says what is missing."""
    try:
        import mpi4py  # noqa: F401  (the package alone: MPI is initialised by importing mpi4py.MPI)
    except ImportError as error:
        raise RuntimeError(
            f"distkfac: comm='mpi' needs mpi4py ({error}): pip install 'distkfac[mpi]' (mpi4py==4.1.2, which loads "
            "the MPI library it finds at run time; scripts/setup.sh installs it with Open MPI). Or use comm='torch'"
        ) from error
    if "mpi4py.MPI" not in sys.modules and not any(name in os.environ for name in MPI_LAUNCH_VARS):
        raise RuntimeError(
            "distkfac: comm='mpi' needs an MPI launch (mpirun -np N ..., or srun --mpi=pmix ...), and this process "
            f"was not started by one (none of {', '.join(MPI_LAUNCH_VARS)} is set). For one process use comm='single'"
        )
    from mpi4py import MPI

    return MPI


def query_cuda_aware() -> bool:
    """Whether the MPI library reads and writes GPU memory itself (``DISTKFAC_MPI_CUDA_AWARE`` overrides)."""
    forced = os.environ.get("DISTKFAC_MPI_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    query = getattr(ctypes.CDLL(None), "MPIX_Query_cuda_support", None)  # Open MPI's extension, when loaded
    return bool(query()) if query is not None else False


def _mpi_datatype(MPI: Any, dtype: torch.dtype) -> Any:
    types = {
        torch.float64: MPI.DOUBLE,
        torch.float32: MPI.FLOAT,
        torch.int64: MPI.INT64_T,
        torch.int32: MPI.INT32_T,
        torch.uint8: MPI.UINT8_T,
        torch.int8: MPI.INT8_T,
    }
    if dtype in _HALF:
        return MPI.INT16_T
    if dtype not in types:
        raise ValueError(f"distkfac: the MPI communicator cannot carry {dtype} tensors")
    return types[dtype]


def mpi_buffer(MPI: Any, tensor: torch.Tensor) -> list[Any]:
    """``[memory, datatype]`` for mpi4py, sharing ``tensor``'s memory: a NumPy view on CPU, the tensor on a GPU."""
    if not tensor.is_contiguous():
        raise ValueError("distkfac: internal error: the MPI communicator needs contiguous tensors")
    words = tensor.detach().view(torch.int16) if tensor.dtype in _HALF else tensor.detach()
    memory = words.numpy() if words.device.type == "cpu" else words
    return [memory, _mpi_datatype(MPI, tensor.dtype)]


def _half_sum(dtype: torch.dtype) -> Callable[[Any, Any, Any], None]:
    def add(incoming: Any, inout: Any, datatype: Any) -> None:
        target = torch.frombuffer(inout, dtype=dtype)
        target.add_(torch.frombuffer(incoming, dtype=dtype))

    return add


def _contiguous_run(segments: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over ``segments`` if they lie one after another in the same memory, else None."""
    first = segments[0]
    offset = first.storage_offset()
    for segment in segments:
        if segment.storage_offset() != offset or not segment.is_contiguous():
            return None
        if segment.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        offset += segment.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


def _exit_without_finalize() -> None:
    """Make this process's exit skip MPI_Finalize, which would wait for the rank that hangs, forever."""

    def leave_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(leave_now)  # runs before mpi4py's own finalisation at exit


class _MPIPending:
    """Requests in flight, with what to do after them (copy a result into place); ``wait`` polls up to the timeout."""

    def __init__(
        self, comm: MPICommunicator, what: str, requests: list[Any], keep: list[Any], after: Callable[[], object] | None
    ) -> None:
        self._comm = comm
        self._what = what
        self._requests = requests
        self._keep = keep  # the buffers must outlive the requests
        self._after = after

    def wait(self) -> None:
        if not self._requests:
            return
        comm, Request = self._comm, self._comm.MPI.Request
        deadline = time.monotonic() + comm.timeout.total_seconds()
        delay = 0.0
        while not guarded(comm.rank, comm.world_size, self._what, lambda: Request.Testall(self._requests)):
            if time.monotonic() > deadline:
                _exit_without_finalize()
                raise CommunicationError(
                    f"distkfac: {self._what} did not finish within {comm.timeout} on rank {comm.rank} of "
                    f"{comm.world_size}: another rank hangs, or runs a different model or configuration. End the "
                    "job (the MPI launcher stops the other ranks when this one exits with an error)"
                )
            time.sleep(delay)  # 0 at first (a yield), then up to 1 ms: other ranks may share these cores
            delay = min(max(2 * delay, 1e-5), 1e-3)
        self._requests, self._keep = [], []
        if self._after is not None:
            self._after()
            self._after = None


class MPICommunicator:
    """Uses MPI through mpi4py: ``MPI.COMM_WORLD``, or the communicator given (every rank of it takes part)."""

    def __init__(
        self, mpi_comm: Any = None, timeout: timedelta = timedelta(minutes=5), cuda_aware: bool | None = None
    ) -> None:
        self.MPI = import_mpi()
        self._world = mpi_comm if mpi_comm is not None else self.MPI.COMM_WORLD
        self.rank = int(self._world.Get_rank())
        self.world_size = int(self._world.Get_size())
        self.timeout = timeout
        self.cuda_aware = query_cuda_aware() if cuda_aware is None else cuda_aware
        self.stats = CommStats()
        self._groups: dict[tuple[int, ...], Any] = {tuple(range(self.world_size)): self._world}
        self._half_sums: dict[torch.dtype, Any] = {}

    def _sum(self, dtype: torch.dtype) -> Any:
        if dtype not in _HALF:
            return self.MPI.SUM
        if dtype not in self._half_sums:
            self._half_sums[dtype] = self.MPI.Op.Create(_half_sum(dtype), commute=True)
        return self._half_sums[dtype]

    def _through_host(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` must be staged through host memory (GPU memory, MPI not CUDA-aware)."""
        if tensor.device.type == "cpu":
            return False
        torch.cuda.current_stream(tensor.device).synchronize()  # MPI reads the memory now, outside any stream
        return not self.cuda_aware

    def _in_place(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[], object] | None]:
        """The memory an in-place collective works on, and what copies its result back into ``tensor``."""
        if not self._through_host(tensor):
            return tensor, None
        host = tensor.to("cpu")
        return host, lambda: tensor.copy_(host)

    def prepare_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        # MPI_Comm_create is collective over the whole world: every rank creates every group, in the same order.
        for group in groups:
            if len(group) <= 1 or group in self._groups:
                continue
            members = self._world.Get_group().Incl(list(group))
            what = f"creating the MPI communicator of ranks {list(group)}"
            create = functools.partial(self._world.Create, members)
            self._groups[group] = guarded(self.rank, self.world_size, what, create)

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        mine = [int(value) for value in values]
        return guarded(self.rank, self.world_size, "allgather (set-up check)", lambda: self._world.allgather(mine))

    def allreduce_sum(self, tensor: torch.Tensor, purpose: str) -> Pending:
        what = f"allreduce of {purpose}"
        self.stats.record_allreduce(purpose, nbytes(tensor), self.world_size)
        if self.world_size == 1:
            return Done()
        memory, after = self._in_place(tensor)
        buffer = mpi_buffer(self.MPI, memory)
        op = self._sum(tensor.dtype)
        request = guarded(
            self.rank, self.world_size, what, lambda: self._world.Iallreduce(self.MPI.IN_PLACE, buffer, op)
        )
        return _MPIPending(self, what, [request], [memory, buffer], after)

    def reduce_to_owners(self, segments: Sequence[torch.Tensor], purpose: str) -> Pending:
        counts = [segment.numel() for segment in segments]
        if self.world_size == 1 or sum(counts) == 0:
            return Done()
        what = f"reduction of {purpose} to their owners"
        send = _contiguous_run(segments)
        if send is None:
            send = torch.cat([segment.reshape(-1) for segment in segments])
        self.stats.record_one_way(purpose, nbytes(send), self.world_size)
        mine = segments[self.rank]
        staged = self._through_host(send)
        if staged:
            send = send.to("cpu")
        received = torch.empty(mine.numel(), dtype=mine.dtype, device="cpu" if staged else mine.device)
        buffers = mpi_buffer(self.MPI, send), mpi_buffer(self.MPI, received)
        op = self._sum(mine.dtype)
        request = guarded(
            self.rank,
            self.world_size,
            what,
            lambda: self._world.Ireduce_scatter(buffers[0], buffers[1], counts, op),
        )
        # MPI may not write into the buffer it reads from: the result lands apart and is copied into place.
        return _MPIPending(self, what, [request], [send, received, buffers], lambda: mine.view(-1).copy_(received))

    def broadcast(self, tensor: torch.Tensor, src: int, group: tuple[int, ...], purpose: str) -> Pending:
        if len(group) == 1:
            return Done()
        what = f"broadcast of {purpose} from rank {src} to ranks {list(group)}"
        if group not in self._groups:
            raise RuntimeError(f"distkfac: internal error: MPI communicator {group} was not prepared")
        self.stats.record_one_way(purpose, nbytes(tensor), len(group))
        memory, after = self._in_place(tensor)
        buffer = mpi_buffer(self.MPI, memory)
        sub, root = self._groups[group], group.index(src)
        request = guarded(self.rank, self.world_size, what, lambda: sub.Ibcast(buffer, root=root))
        return _MPIPending(self, what, [request], [memory, buffer], after)
