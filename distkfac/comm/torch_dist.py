"""Collectives through torch.distributed: gloo on CPU, NCCL on GPUs, MPI where torch was built with it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from distkfac.comm.base import CommStats, Done, Pending, guarded, nbytes


class _TorchPending:
    def __init__(
        self, works: list[dist.Work], comm: TorchDistCommunicator, what: str, after: Callable[[], object] | None = None
    ) -> None:
        self._works = works
        self._comm = comm
        self._what = what
        self._after = after  # what puts the result in place once the works are done

    def wait(self) -> None:
        for work in self._works:
            guarded(self._comm.rank, self._comm.world_size, self._what, functools.partial(self._comm.wait_work, work))
        self._works = []
        if self._after is not None:
            self._after()
            self._after = None


class TorchDistCommunicator:
    """Uses the default process group that the user initialised (``torch.distributed.init_process_group``).

    ``timeout`` bounds every wait: a rank that hangs makes the others raise CommunicationError after it, a rank
    that dies makes them raise as soon as the backend notices the broken connection.
    """

    def __init__(self, timeout: timedelta = timedelta(minutes=5), owner_reduction: str = "scatter") -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distkfac: TorchDistCommunicator needs torch.distributed.init_process_group() to have been called "
                "(torchrun, or mpirun/srun with MASTER_ADDR/MASTER_PORT set); for one process use comm='single'"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout = timeout
        if owner_reduction not in ("scatter", "each"):
            raise ValueError(f"distkfac: owner_reduction must be 'scatter' or 'each', got {owner_reduction!r}")
        self.owner_reduction = owner_reduction
        self.backend = str(dist.get_backend())
        self.stats = CommStats()
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {tuple(range(self.world_size)): None}

    def wait_work(self, work: dist.Work) -> None:
        if self.backend == "gloo":
            work.wait(self.timeout)
        else:  # NCCL and MPI take their timeout from the process group
            work.wait()

    def prepare_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        # new_group is collective over the whole world: every rank creates every group, in the same order.
        for group in groups:
            if len(group) > 1 and group not in self._groups:
                self._groups[group] = guarded(
                    self.rank,
                    self.world_size,
                    f"creating process group {group}",
                    functools.partial(dist.new_group, group),
                )

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        mine = torch.tensor(list(values), dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        guarded(self.rank, self.world_size, "allgather (set-up check)", lambda: dist.all_gather(everyone, mine))
        return [t.tolist() for t in everyone]

    def allreduce_sum(self, tensor: torch.Tensor, purpose: str) -> Pending:
        what = f"allreduce of {purpose}"
        self.stats.record_allreduce(purpose, nbytes(tensor), self.world_size)
        work = guarded(self.rank, self.world_size, what, lambda: dist.all_reduce(tensor, async_op=True))
        assert work is not None
        return _TorchPending([work], self, what)

    def reduce_to_owners(self, segments: Sequence[torch.Tensor], purpose: str) -> Pending:
        """One ``reduce_scatter`` of the unequal segments (gloo and NCCL take uneven parts); one reduce per owner with
        ``owner_reduction="each"`` and on other backends."""
        what = f"reduction of {purpose} to their owners"
        if sum(segment.numel() for segment in segments) == 0:
            return Done()
        if self.owner_reduction == "each" or self.backend not in ("gloo", "nccl"):
            return self._reduce_each(segments, purpose, what)
        self.stats.record_one_way(purpose, sum(map(nbytes, segments)), self.world_size)
        mine = segments[self.rank]
        received = torch.empty_like(mine)  # the result may not land in one of the inputs
        scatter = functools.partial(dist.reduce_scatter, received, list(segments), async_op=True)
        work = guarded(self.rank, self.world_size, what, scatter)
        assert work is not None
        return _TorchPending([work], self, what, after=lambda: mine.copy_(received))

    def _reduce_each(self, segments: Sequence[torch.Tensor], purpose: str, what: str) -> Pending:
        works = []
        for owner, segment in enumerate(segments):
            if segment.numel() == 0:
                continue
            self.stats.record_one_way(purpose, nbytes(segment), self.world_size)
            reduce = functools.partial(dist.reduce, segment, dst=owner, async_op=True)
            works.append(guarded(self.rank, self.world_size, what, reduce))
        return _TorchPending(works, self, what)

    def broadcast(self, tensor: torch.Tensor, src: int, group: tuple[int, ...], purpose: str) -> Pending:
        if len(group) == 1:
            return Done()
        what = f"broadcast of {purpose} from rank {src} to ranks {list(group)}"
        if group not in self._groups:
            raise RuntimeError(f"distkfac: internal error: process group {group} was not prepared")
        self.stats.record_one_way(purpose, nbytes(tensor), len(group))
        pg = self._groups[group]
        work = guarded(self.rank, self.world_size, what, lambda: dist.broadcast(tensor, src, group=pg, async_op=True))
        assert work is not None
        return _TorchPending([work], self, what)
