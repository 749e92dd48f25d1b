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
