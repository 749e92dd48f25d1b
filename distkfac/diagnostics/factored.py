"""Per-example gradients of Linear layers kept as factors: ``N (in + out)`` numbers instead of ``N in out``.

Example ``i``'s weight gradient in a Linear layer is the outer product ``g_i a_i^T`` (its bias gradient ``g_i``),
``a_i`` the layer's input and ``g_i`` the loss gradient at its output. Keeping ``A`` (``N x in``) and ``G``
(``N x out``) instead of the rows ``vec(g_i a_i^T)`` is what makes the Fisher's products cheap at scale:

- ``J v``: ``(J v)_i = g_i^T V a_i (+ g_i^T b)``, i.e. ``rowsum((A V^T) * G)``: two matrix products, no row formed;
- ``J^T u = vec(G^T diag(u) A) (+ G^T u)``;
- ``||g_i||^2 = |g_i|^2 (|a_i|^2 + 1)`` with a bias, ``|g_i|^2 |a_i|^2`` without.

Several layers (every Linear of an MLP: the whole model) are blocks of columns, in ``named_parameters()`` order, so
the rows equal :func:`~distkfac.diagnostics.per_example_gradients`'s. Lanczos on factors costs one pass over ``A``
and ``G`` per step, with nothing recomputed through the model; the routes that need explicit rows (eigh, gram) get
them chunk by chunk from :meth:`FactoredRows.explicit`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearFactors:
    """One Linear layer's factors over this rank's examples: ``inputs`` ``a_i`` (N x in), ``output_grads`` ``g_i``
    (N x out); ``bias``: whether the bias's gradient is among the columns (after the weight's)."""

    inputs: torch.Tensor
    output_grads: torch.Tensor
    bias: bool

    @property
    def width(self) -> int:
        outputs, inputs = self.output_grads.shape[1], self.inputs.shape[1]
        return outputs * inputs + (outputs if self.bias else 0)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        outputs, inputs = self.output_grads.shape[1], self.inputs.shape[1]
        result = ((self.inputs @ v[: outputs * inputs].view(outputs, inputs).T) * self.output_grads).sum(1)
        return result + self.output_grads @ v[outputs * inputs :] if self.bias else result

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        weighted = self.output_grads * u[:, None]
        weight = (weighted.T @ self.inputs).reshape(-1)
        return torch.cat([weight, weighted.sum(0)]) if self.bias else weight

    def squared_norms(self) -> torch.Tensor:
        a_squared = (self.inputs**2).sum(1) + (1.0 if self.bias else 0.0)
        return (self.output_grads**2).sum(1) * a_squared

    def rows(self, start: int, stop: int) -> torch.Tensor:
        g, a = self.output_grads[start:stop], self.inputs[start:stop]
        weight = (g[:, :, None] * a[:, None, :]).reshape(len(g), -1)
        return torch.cat([weight, g], dim=1) if self.bias else weight

    def select(self, keep: torch.Tensor) -> LinearFactors:
        return LinearFactors(self.inputs[keep], self.output_grads[keep], self.bias)


@dataclass(frozen=True)
class FactoredRows:
    """The rows ``g_i`` of ``J`` as blocks of Linear layers' factors (column blocks in order)."""

    blocks: Sequence[LinearFactors]
    chunk_size: int = 256  # rows per chunk of :meth:`explicit`

    def __len__(self) -> int:
        return len(self.blocks[0].inputs)

    @property
    def width(self) -> int:
        return sum(block.width for block in self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].inputs.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].inputs.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` (N values)."""
        parts = v.split([block.width for block in self.blocks])
        return torch.stack([block.matvec(part) for block, part in zip(self.blocks, parts, strict=True)]).sum(0)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``J^T u`` (d values)."""
        return torch.cat([block.rmatvec(u) for block in self.blocks])

    def norms(self) -> torch.Tensor:
        """``||g_i||`` for every example."""
        return torch.stack([block.squared_norms() for block in self.blocks]).sum(0).sqrt()

    def explicit(self) -> Iterator[torch.Tensor]:
        """The rows themselves, ``chunk_size`` at a time."""
        for start in range(0, len(self), self.chunk_size):
            stop = min(start + self.chunk_size, len(self))
            yield torch.cat([block.rows(start, stop) for block in self.blocks], dim=1)

    def select(self, keep: torch.Tensor) -> FactoredRows:
        """The rows whose entry in the boolean ``keep`` is true."""
        return FactoredRows([block.select(keep) for block in self.blocks], self.chunk_size)
