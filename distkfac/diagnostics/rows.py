"""The rows ``g_i`` of ``J`` as the spectrum functions read them: a tensor, factors, or a way to pass over them again.

A ``Rows`` is one of:

- a ``(N, d)`` tensor (this rank's examples, already in memory);
- :class:`~distkfac.diagnostics.factored.FactoredRows`: Linear layers' inputs and output gradients, from which the
  products ``J v`` and ``J^T u`` and the norms come without forming a row (``linear_factors``);
- a callable returning a fresh iterable of ``(n, d)`` chunks each time it is called, in the same order every time,
  e.g. ``lambda: per_example_gradients(model, data, layer)``. Lanczos passes over the rows once per step, so a
  callable recomputes the gradients each time: memory stays bounded by one chunk, at the cost of one gradient pass
  per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from distkfac.diagnostics.factored import FactoredRows

Rows = torch.Tensor | FactoredRows | Callable[[], Iterable[torch.Tensor]]


def chunks_of(rows: Rows) -> Iterator[torch.Tensor]:
    """One pass over the rows, chunk by chunk (a tensor is one chunk)."""
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise ValueError(f"distkfac.diagnostics: rows must be a (N, d) tensor, got shape {tuple(rows.shape)}")
        yield rows
        return
    for chunk in rows.explicit() if isinstance(rows, FactoredRows) else rows():
        if chunk.dim() != 2:
            raise ValueError(f"distkfac.diagnostics: a chunk of rows must be (n, d), got shape {tuple(chunk.shape)}")
        yield chunk


def count_and_width(rows: Rows) -> tuple[int, int, torch.dtype, torch.device]:
    """This rank's number of rows, ``d``, and the rows' dtype and device (one pass for a callable)."""
    if isinstance(rows, FactoredRows):
        return len(rows), rows.width, rows.dtype, rows.device
    count, width, dtype, device = 0, 0, torch.get_default_dtype(), torch.device("cpu")
    for chunk in chunks_of(rows):
        if count and chunk.shape[1] != width:
            raise ValueError(f"distkfac.diagnostics: chunks of {width} and {chunk.shape[1]} columns in one set of rows")
        count += chunk.shape[0]
        width, dtype, device = chunk.shape[1], chunk.dtype, chunk.device
    return count, width, dtype, device


def matrix_of(rows: Rows) -> torch.Tensor:
    """All of this rank's rows as one ``(N, d)`` tensor (only for the routes that need ``J`` in memory)."""
    return rows if isinstance(rows, torch.Tensor) else torch.cat(list(chunks_of(rows)))


def kept(rows: Rows, keep: torch.Tensor) -> Rows:
    """The rows whose entry in the boolean ``keep`` (one per row of this rank, in order) is true."""
    if isinstance(rows, torch.Tensor):
        return rows[keep.to(rows.device)]
    if isinstance(rows, FactoredRows):
        return rows.select(keep.to(rows.device))

    def chunks() -> Iterator[torch.Tensor]:
        start = 0
        for chunk in chunks_of(rows):
            mask = keep[start : start + chunk.shape[0]].to(chunk.device)
            start += chunk.shape[0]
            yield chunk[mask]

    return chunks
