"""The names of a layer's two Kronecker factors, and the key that identifies one factor of one layer."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class FactorKind(StrEnum):
    """Which Kronecker factor of a layer: A (from its inputs) or G (from the gradients at its outputs).

    A string enum: it prints as ``"A"``/``"G"`` in messages and sorts A before G.
    """

    A = "A"
    G = "G"


FACTOR_KINDS: tuple[FactorKind, FactorKind] = (FactorKind.A, FactorKind.G)


class FactorKey(NamedTuple):
    """One factor of one layer: the layer's index in the model's list of preconditioned layers, and which factor."""

    layer: int
    kind: FactorKind

    @property
    def position(self) -> int:
        """Where the factor sits in per-factor vectors (finiteness flags, traces): ``2 * layer``, plus 1 for G."""
        return 2 * self.layer + FACTOR_KINDS.index(self.kind)

    @classmethod
    def at(cls, position: int) -> FactorKey:
        """The factor at ``position`` of a per-factor vector (the inverse of ``position``)."""
        return cls(position // 2, FACTOR_KINDS[position % 2])


def of_kind(kind: FactorKind, pair: tuple[T, T]) -> T:
    """The ``kind`` member of an ``(A, G)`` pair, such as a layer's ``(a_dim, g_dim)``."""
    return pair[0] if kind is FactorKind.A else pair[1]


class Structure(StrEnum):
    """How a factor is stored: the layer helper says which, and every stage (exchange, decomposition,
    preconditioning, checkpoints) follows it.

    - ``dense``: a symmetric ``n x n`` matrix (Linear, Conv2d, Embedding's G).
    - ``diagonal``: the ``n`` diagonal entries of a diagonal matrix (Embedding's A: one-hot inputs).
    - ``blocks``: ``n`` symmetric ``2 x 2`` blocks, one per unit (the unit-wise Fisher of a normalisation layer's
      weight and bias). Such a layer has no Kronecker partner: its other factor is ``none``.
    - ``none``: no factor (the identity); nothing is stored, sent or decomposed.
    """

    DENSE = "dense"
    DIAGONAL = "diagonal"
    BLOCKS = "blocks"
    NONE = "none"


BLOCK = 2  # the side of a unit-wise block: (weight, bias)


class FactorShape(NamedTuple):
    """One factor's structure and its side ``dim``: the gradient matrix has ``dim`` columns (A) or rows (G)."""

    structure: Structure
    dim: int

    @classmethod
    def dense(cls, dim: int) -> FactorShape:
        return cls(Structure.DENSE, dim)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The shape of the stored factor tensor."""
        if self.structure is Structure.DENSE:
            return (self.dim, self.dim)
        if self.structure is Structure.DIAGONAL:
            return (self.dim,)
        if self.structure is Structure.BLOCKS:
            return (self.dim, BLOCK, BLOCK)
        return (0,)

    def numel(self, packed: bool = True) -> int:
        """How many numbers the factor takes on the wire: symmetric matrices and blocks as upper triangles."""
        n = self.dim
        if self.structure is Structure.DENSE:
            return n * (n + 1) // 2 if packed else n * n
        if self.structure is Structure.DIAGONAL:
            return n
        if self.structure is Structure.BLOCKS:
            return n * (BLOCK * (BLOCK + 1) // 2 if packed else BLOCK * BLOCK)
        return 0

    @property
    def cost(self) -> float:
        """The estimated cost of decomposing it, for balancing: ``n^3`` dense, linear in ``n`` otherwise."""
        n = float(self.dim)
        if self.structure is Structure.DENSE:
            return n**3
        if self.structure is Structure.BLOCKS:
            return BLOCK**3 * n
        return n if self.structure is Structure.DIAGONAL else 0.0

    @property
    def present(self) -> bool:
        return self.structure is not Structure.NONE


class FactorBlock(NamedTuple):
    """Rows and columns ``start:stop`` of one factor, a diagonal block decomposed on its own.

    A factor that is not split is one block, ``0:dim``. A dense factor split into several blocks is approximated by
    its block diagonal: the entries outside the blocks are neither sent nor decomposed.
    """

    key: FactorKey
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def shape(self, factor: FactorShape) -> FactorShape:
        """The block's own shape: the factor's if the block is the whole factor, else a dense ``size x size``."""
        return factor if (self.start, self.stop) == (0, factor.dim) else FactorShape.dense(self.size)

    def name(self, factor: FactorShape) -> str:
        """``"[start:stop]"`` for a part of a split factor, ``""`` for a whole one (for messages)."""
        return "" if (self.start, self.stop) == (0, factor.dim) else f"[{self.start}:{self.stop}]"


def block_bounds(factor: FactorShape, split_above: int | None) -> list[tuple[int, int]]:
    """Where a factor is cut: ``ceil(n / split_above)`` near-equal diagonal blocks for a dense factor with
    ``n > split_above``; the whole factor otherwise (and always for diagonal, unit-wise and absent factors)."""
    n = factor.dim
    if split_above is None or factor.structure is not Structure.DENSE or n <= split_above:
        return [(0, n)]
    count = -(-n // split_above)
    sizes = [n // count + (1 if i < n % count else 0) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [(start, start + size) for start, size in zip(starts, sizes, strict=True)]
