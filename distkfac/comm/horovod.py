"""Collectives through Horovod (``horovod.torch``): MPI or Gloo controllers, NCCL on GPUs.

Horovod matches operations across ranks by name, so every operation gets a deterministic one: its purpose and a
counter kept per rank group. (Horovod's automatic names count handles per process, so a rank that took part in a
group-only broadcast would name its next global operation differently from a rank that did not, and both would wait.)

Groups smaller than the world (``strategy="hybrid"``) are Horovod process sets; Horovod creates them at run time only
when initialised with ``hvd.init(process_sets="dynamic")``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from distkfac.comm.base import CommStats, Done, Pending, guarded, nbytes


class _HorovodPending:
    def __init__(self, hvd: Any, handle: Any, comm: HorovodCommunicator, what: str, result: Any = None) -> None:
        self._hvd = hvd
        self._handle = handle
        self._comm = comm
        self._what = what
        self._result = result  # (own segment, length) for reduce_to_owners

    def wait(self) -> None:
        if self._handle is None:
            return
        output = guarded(
            self._comm.rank, self._comm.world_size, self._what, lambda: self._hvd.synchronize(self._handle)
        )
        self._handle = None
        if self._result is not None:
            segment, length = self._result
            segment.copy_(output[0, :length])


class HorovodCommunicator:
    """Uses the Horovod that the user initialised (``hvd.init()``)."""

    def __init__(self) -> None:
        try:
            import horovod.torch as hvd
        except ImportError as error:
            raise RuntimeError(
                "distkfac: comm='horovod' needs Horovod (pip install 'distkfac[horovod]', built as in "
                "scripts/build_horovod.sh); or use torch.distributed"
            ) from error
        if not hvd.is_initialized():
            raise RuntimeError(
                "distkfac: Horovod is not initialised: call hvd.init() before creating the preconditioner"
            )
        self._hvd = hvd
        self.rank = int(hvd.rank())
        self.world_size = int(hvd.size())
        self.stats = CommStats()
        self._sets: dict[tuple[int, ...], Any] = {tuple(range(self.world_size)): hvd.global_process_set}
        self._counters: dict[tuple[int, ...], int] = defaultdict(int)

    def _name(self, purpose: str, group: tuple[int, ...]) -> str:
        self._counters[group] += 1
        members = "all" if len(group) == self.world_size else "-".join(map(str, group))
        return f"distkfac.{purpose}.{members}.{self._counters[group]}"

    def prepare_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        for group in groups:
            if len(group) <= 1 or group in self._sets:
                continue
            try:
                self._sets[group] = self._hvd.add_process_set(list(group))
            except (ValueError, RuntimeError) as error:
                raise RuntimeError(
                    f"distkfac: Horovod could not create the process set {list(group)} ({error}). strategy='hybrid' "
                    "needs Horovod process sets: initialise with hvd.init(process_sets='dynamic')"
                ) from error

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        world = tuple(range(self.world_size))
        mine = torch.tensor([list(values)], dtype=torch.int64)
        name = self._name("setup-check", world)
        gathered = guarded(
            self.rank, self.world_size, "allgather (set-up check)", lambda: self._hvd.allgather(mine, name=name)
        )
        return [row.tolist() for row in gathered]

    def allreduce_sum(self, tensor: torch.Tensor, purpose: str) -> Pending:
        world = tuple(range(self.world_size))
        what = f"allreduce of {purpose}"
        self.stats.record_allreduce(purpose, nbytes(tensor), self.world_size)
        name = self._name(purpose, world)
        handle = guarded(
            self.rank,
            self.world_size,
            what,
            lambda: self._hvd.allreduce_async_(tensor, op=self._hvd.Sum, name=name),
        )
        return _HorovodPending(self._hvd, handle, self, what)

    def reduce_to_owners(self, segments: Sequence[torch.Tensor], purpose: str) -> Pending:
        # Horovod has no reduce-to-one-rank; a reduce-scatter of the segments padded to equal length does the job.
        what = f"reduction of {purpose} to their owners"
        longest = max(s.numel() for s in segments)
        if longest == 0:
            return Done()
        mine = segments[self.rank]
        if mine.dtype == torch.bfloat16 and mine.device.type == "cpu":
            raise ValueError("distkfac: Horovod has no bfloat16 collectives on CPU; use comm_dtype=torch.float16")
        padded = torch.zeros(self.world_size, longest, dtype=mine.dtype, device=mine.device)
        for owner, segment in enumerate(segments):
            padded[owner, : segment.numel()] = segment
        self.stats.record_one_way(purpose, nbytes(padded), self.world_size)
        name = self._name(purpose, tuple(range(self.world_size)))
        handle = guarded(
            self.rank,
            self.world_size,
            what,
            lambda: self._hvd.reducescatter_async(padded, op=self._hvd.Sum, name=name),
        )
        return _HorovodPending(self._hvd, handle, self, what, result=(mine, mine.numel()))

    def broadcast(self, tensor: torch.Tensor, src: int, group: tuple[int, ...], purpose: str) -> Pending:
        if len(group) == 1:
            return Done()
        what = f"broadcast of {purpose} from rank {src} to ranks {list(group)}"
        if group not in self._sets:
            raise RuntimeError(f"distkfac: internal error: process set {group} was not prepared")
        self.stats.record_one_way(purpose, nbytes(tensor), len(group))
        name = self._name(purpose, group)
        process_set = self._sets[group]
        handle = guarded(
            self.rank,
            self.world_size,
            what,
            lambda: self._hvd.broadcast_async_(tensor, root_rank=src, process_set=process_set, name=name),
        )
        return _HorovodPending(self._hvd, handle, self, what)
