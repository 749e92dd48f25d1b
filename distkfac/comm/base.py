"""The communicator interface: a handful of explicit collectives on flat tensors, each returning a handle to wait on.

The preconditioner (through ``distkfac.exchange``) decides what travels where; a communicator only moves buffers.
Every collective must be called by every rank taking part, in the same order, with buffers of the same shapes.

Byte counters follow the bandwidth term of the standard cost model for bandwidth-optimal algorithms (Chan et al.,
"Collective communication: theory, practice, and experience", 2007), per rank, for a buffer of ``n`` bytes in a
group of ``p`` ranks: allreduce ``2 n (p-1)/p``; reduce and reduce-scatter ``n (p-1)/p``; broadcast ``n (p-1)/p``.
They are independent of the library's actual algorithm, so strategies compare on equal terms.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")


class CommunicationError(RuntimeError):
    """A collective failed or timed out: usually another rank died, hung or runs a different program."""


@dataclass
class CommStats:
    """What this rank handed to collectives, by purpose (``factors``, ``decompositions``, ``gradients``, ...)."""

    bytes_sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, purpose: str, nbytes: float) -> None:
        self.bytes_sent[purpose] += nbytes
        self.calls[purpose] += 1

    def record_allreduce(self, purpose: str, nbytes: float, ranks: int) -> None:
        """An allreduce of ``nbytes`` over ``ranks`` ranks: ``2 n (p-1)/p``."""
        self.record(purpose, 2 * nbytes * (ranks - 1) / ranks)

    def record_one_way(self, purpose: str, nbytes: float, ranks: int) -> None:
        """A reduce, reduce-scatter or broadcast of ``nbytes`` over ``ranks`` ranks: ``n (p-1)/p``."""
        self.record(purpose, nbytes * (ranks - 1) / ranks)

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def total_bytes(self) -> float:
        return float(sum(self.bytes_sent.values()))


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Pending(Protocol):
    """A collective in flight. ``wait()`` blocks until this rank's part is done, or raises CommunicationError."""

    def wait(self) -> None: ...


class Done:
    """A collective with nothing to do (a group of one rank)."""

    def wait(self) -> None:
        return None


class Communicator(Protocol):
    """How buffers travel between ranks. ``distkfac.comm`` has torch.distributed, Horovod and single-process ones."""

    rank: int
    world_size: int
    stats: CommStats

    def prepare_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        """Set up the rank groups later used by ``broadcast``. Collective: every rank passes the same list."""

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length everywhere), blocking; for set-up checks, not the hot path."""

    def allreduce_sum(self, tensor: torch.Tensor, purpose: str) -> Pending:
        """Sum ``tensor`` over all ranks, in place."""

    def reduce_to_owners(self, segments: Sequence[torch.Tensor], purpose: str) -> Pending:
        """Sum ``segments[r]`` over all ranks into rank ``r``'s ``segments[r]`` (a reduce-scatter of unequal parts).

        After ``wait()`` only this rank's own segment is meaningful; the others may have been used as scratch.
        """

    def broadcast(self, tensor: torch.Tensor, src: int, group: tuple[int, ...], purpose: str) -> Pending:
        """Copy ``src``'s ``tensor`` to the other ranks of ``group`` (global ranks). Only members call it."""


def guarded(rank: int, world_size: int, what: str, action: Callable[[], T]) -> T:
    """Run ``action``, turning a backend's failure into a CommunicationError that says what to look for."""
    try:
        return action()
    except CommunicationError:
        raise
    except RuntimeError as error:
        raise CommunicationError(
            f"distkfac: {what} failed on rank {rank} of {world_size}: {error}. Another rank has probably died, "
            "hung or runs a different model or configuration; look for the first error in the other ranks' logs"
        ) from error


class SingleProcessCommunicator:
    """One process holds everything: nothing travels."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.stats = CommStats()

    def prepare_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        return None

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        return [list(values)]

    def allreduce_sum(self, tensor: torch.Tensor, purpose: str) -> Pending:
        return Done()

    def reduce_to_owners(self, segments: Sequence[torch.Tensor], purpose: str) -> Pending:
        return Done()

    def broadcast(self, tensor: torch.Tensor, src: int, group: tuple[int, ...], purpose: str) -> Pending:
        return Done()
