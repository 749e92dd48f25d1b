"""Gradient-norm outliers by the median absolute deviation (MAD).

For values ``x_i`` (by default ``x_i = ||g_i||``): ``m = median(x)``, ``MAD = median(|x_i - m|)``; the median of an
even number of values is the mean of the two middle ones. Two counts:

- ``above``: ``x_i > k MAD``, the paper's literal rule (its equation 8 and text: gradients larger than 10 MAD);
- ``deviating``: ``|x_i - m| > k MAD``, the usual MAD outlier rule.

In a data-parallel run the medians are global: every rank's values are gathered (``N`` values; see
``distkfac.diagnostics.gather``), so every rank returns the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distkfac.comm import Communicator, resolve_communicator
from distkfac.diagnostics.factored import FactoredRows
from distkfac.diagnostics.gather import gather_rows, shard_of
from distkfac.diagnostics.rows import Rows, chunks_of


@dataclass(frozen=True)
class OutlierCounts:
    """The MAD outlier counts of ``count`` values with ``median`` and ``mad``, at ``k``."""

    median: float
    mad: float
    k: float
    above: int
    deviating: int
    count: int


def gradient_norms(rows: Rows) -> torch.Tensor:
    """``||g_i||`` for this rank's rows, in order (no collective)."""
    if isinstance(rows, FactoredRows):
        return rows.norms()
    parts = [chunk.norm(dim=1) for chunk in chunks_of(rows)]
    return torch.cat(parts) if parts else torch.zeros(0)


def median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-d tensor; the mean of the two middle values for an even count (``torch.median`` would
    take the lower one)."""
    ordered = values.sort().values
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def mad_outliers(values: torch.Tensor, k: float = 10.0, comm: Communicator | None = None) -> OutlierCounts:
    """The MAD outlier counts of every rank's ``values`` (1-d, this rank's share). Collective when distributed."""
    if k <= 0:
        raise ValueError(f"distkfac.diagnostics: the MAD multiple k must be positive, got {k}")
    if values.dim() != 1:
        raise ValueError(f"distkfac.diagnostics: values must be 1-d, got shape {tuple(values.shape)}")
    comm = resolve_communicator(comm)
    everything = gather_rows(values, shard_of(len(values), comm), comm)
    centre = median(everything)
    mad = median((everything - centre).abs())
    return OutlierCounts(
        median=float(centre),
        mad=float(mad),
        k=k,
        above=int((everything > k * mad).sum()),
        deviating=int(((everything - centre).abs() > k * mad).sum()),
        count=len(everything),
    )
