"""Every rank's examples in one place: the global count, this rank's offset, and a gather of float values.

The communicator has ``allreduce_sum`` and ``allgather_ints`` only. Floats are gathered by each rank writing its
values into a zero buffer of the global size at its own offset and summing the buffers over the ranks: every
position has exactly one non-zero writer, so the sum is exact (adding zeros rounds nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distkfac.comm import Communicator

PURPOSE = "fisher diagnostics"


@dataclass(frozen=True)
class Shard:
    """Where this rank's ``local`` examples sit among all ranks' ``total`` (ranks in order, rank 0 first), and the
    rows' common ``width`` (0 for values)."""

    local: int
    offset: int
    total: int
    width: int = 0


def shard_of(local_count: int, comm: Communicator, width: int = 0) -> Shard:
    """This rank's shard from every rank's count and width (collective). A rank may have no examples (e.g. all
    trimmed away), but not all of them; ranks with examples must agree on the width. The ValueError is raised on
    every rank alike (each sees all the counts), so no rank is left waiting in a later collective."""
    gathered = comm.allgather_ints([local_count, width])
    counts = [row[0] for row in gathered]
    widths = sorted({row[1] for row in gathered if row[0] > 0})
    if sum(counts) == 0:
        raise ValueError("distkfac.diagnostics: empty data: no rank has any examples")
    if len(widths) > 1:
        raise ValueError(f"distkfac.diagnostics: the ranks' rows have different widths {widths}")
    return Shard(local=local_count, offset=sum(counts[: comm.rank]), total=sum(counts), width=widths[0])


def gather_rows(local: torch.Tensor, shard: Shard, comm: Communicator) -> torch.Tensor:
    """All ranks' rows of ``local`` (shape ``(shard.local, ...)``) stacked in rank order, on every rank."""
    everything = local.new_zeros((shard.total, *local.shape[1:]))
    everything[shard.offset : shard.offset + shard.local] = local
    comm.allreduce_sum(everything, PURPOSE).wait()
    return everything


def allreduce_sum(tensor: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place, and returned."""
    comm.allreduce_sum(tensor, PURPOSE).wait()
    return tensor
