"""Projections on the top eigenvector, and the top eigenvalue without the examples that carry it.

``a_i = v_1^T g_i``. For the exact top eigenpair, ``lambda_1 = v_1^T F v_1 = (1/N) sum_i a_i^2 = mean(a_i^2)``: the
eigenvalue is the mean square of the projections, so a few examples with huge ``|a_i|`` can carry it.

``trimmed_top_eigenvalue`` removes the ``r = floor(fraction * N)`` examples with the largest ``|a_i|`` (over every
rank: ties broken by global position, so exactly ``r`` go) and reads the top eigenvalue on the ``N' = N - r`` left,
normalised by ``N'`` (the Fisher of the remaining examples, ``F' = (1/N') sum_kept g_i g_i^T``), in two ways:

- ``fixed``: ``v_1`` kept from the full data, ``v_1^T F' v_1 = (1/N') sum_kept a_i^2``;
- ``recomputed``: the top eigenvalue of ``F'`` itself (``fixed <= recomputed``: a Rayleigh quotient is at most the
  top eigenvalue).

In a data-parallel run the threshold is global: every rank's ``|a_i|`` are gathered (``N`` values; see
``distkfac.diagnostics.gather``) and every rank takes the same decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distkfac.comm import Communicator, resolve_communicator
from distkfac.diagnostics.factored import FactoredRows
from distkfac.diagnostics.gather import allreduce_sum, gather_rows, shard_of
from distkfac.diagnostics.rows import Rows, chunks_of, kept
from distkfac.diagnostics.spectrum import Eigenpairs, top_eigenpairs


@dataclass(frozen=True)
class TrimmedEigenvalue:
    """The top eigenvalue on all ``count`` examples (``full``) and without the ``removed`` ones with ``|a_i| >=
    threshold`` (``fixed``, ``recomputed``; both normalised by ``kept = count - removed``)."""

    full: float
    fixed: float
    recomputed: float
    threshold: float
    removed: int
    kept: int
    count: int


def projections(rows: Rows, vector: torch.Tensor) -> torch.Tensor:
    """``a_i = v^T g_i`` for this rank's rows, in order (no collective)."""
    if isinstance(rows, FactoredRows):
        return rows.matvec(vector.to(rows.device))
    parts = [chunk @ vector.to(chunk.device) for chunk in chunks_of(rows)]
    return torch.cat(parts) if parts else vector.new_zeros(0)


def mean_squared_projection(a: torch.Tensor, comm: Communicator | None = None) -> float:
    """``(1/N) sum_i a_i^2`` over every rank's projections: ``lambda_1`` when ``a`` are the top eigenvector's."""
    comm = resolve_communicator(comm)
    shard = shard_of(len(a), comm)
    return float(allreduce_sum((a.double() ** 2).sum().reshape(1), comm)) / shard.total


def eigenvalue_matches_projections(
    value: float, a: torch.Tensor, comm: Communicator | None = None, rtol: float = 1e-6
) -> bool:
    """Whether ``value`` (an eigenvalue) equals ``mean(a_i^2)`` within ``rtol``: true for the exact top eigenpair."""
    mean_square = mean_squared_projection(a, comm)
    return math.isclose(value, mean_square, rel_tol=rtol, abs_tol=rtol * abs(value))


def trimmed_top_eigenvalue(
    rows: Rows,
    fraction: float = 0.1,
    comm: Communicator | None = None,
    method: str = "auto",
    top: Eigenpairs | None = None,
) -> TrimmedEigenvalue:
    """The top eigenvalue of ``F`` with and without the ``fraction`` of examples with the largest ``|a_i|``.

    ``top``: the full data's top eigenpair if already known (else computed here with ``method``). Collective.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"distkfac.diagnostics: fraction must be in [0, 1), got {fraction}")
    comm = resolve_communicator(comm)
    top = top or top_eigenpairs(rows, 1, method, comm)
    a = projections(rows, top.vectors[:, 0])
    shard = shard_of(len(a), comm)
    magnitudes = gather_rows(a.abs(), shard, comm)
    removed = math.floor(fraction * shard.total)
    order = torch.sort(magnitudes, descending=True, stable=True).indices
    keep = torch.ones(shard.total, dtype=torch.bool, device=magnitudes.device)
    keep[order[:removed]] = False
    count = shard.total - removed
    fixed = float((magnitudes[keep].double() ** 2).sum()) / count
    remaining = kept(rows, keep[shard.offset : shard.offset + shard.local])
    recomputed = float(top_eigenpairs(remaining, 1, method, comm).values[0])
    threshold = float(magnitudes[order[removed - 1]]) if removed else math.inf
    return TrimmedEigenvalue(
        full=float(top.values[0]),
        fixed=fixed,
        recomputed=recomputed,
        threshold=threshold,
        removed=removed,
        kept=count,
        count=shard.total,
    )
