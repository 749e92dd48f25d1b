"""Work assignment: which rank decomposes each factor, and which ranks precondition each layer's gradient.

Pure arithmetic on layer sizes, identical on every rank (no communication).

With ``P`` ranks and ``g`` gradient workers per layer (``g`` divides ``P``), the ranks form ``c = P / g`` *worker
groups* and ``g`` *receiver groups*::

    worker group k   = {k, k + c, k + 2c, ...}        (g ranks; k = 0 .. c-1)
    receiver group j = {j c, j c + 1, ..., j c + c-1} (c ranks; j = 0 .. g-1)

Every receiver group holds exactly one member of every worker group. A layer belongs to one worker group: its
members all hold the layer's decompositions and compute its preconditioned gradient; each member then broadcasts that
gradient inside its own receiver group. ``comm-opt`` is ``g = P`` (one worker group, nothing to broadcast),
``mem-opt`` is ``g = 1`` (the owner alone holds the decompositions and broadcasts to everyone), ``hybrid`` is between.

Balancing is greedy, largest first, on the estimated cost of decomposing each factor (``n^3`` for an ``n x n`` one,
linear in ``n`` for diagonal factors and unit-wise blocks, so vector factors balance like the rest): layers go to
the least-loaded worker group, then inside the group each factor goes to the least-loaded member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from distkfac.factors import FACTOR_KINDS, FactorKey, FactorKind, FactorShape, of_kind

Strategy = Literal["comm-opt", "mem-opt", "hybrid"]
STRATEGIES: tuple[str, ...] = ("comm-opt", "mem-opt", "hybrid")


def grad_workers_for(strategy: str, grad_worker_fraction: float | None, world_size: int) -> int:
    """The number of gradient workers per layer, ``g``, checked against the world size."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distkfac: strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    valid = [f"{d}/{world_size}" for d in range(1, world_size + 1) if world_size % d == 0]
    if strategy == "hybrid":
        if grad_worker_fraction is None:
            raise ValueError(
                f"distkfac: strategy='hybrid' needs grad_worker_fraction; with {world_size} ranks use one of {valid}"
            )
    elif grad_worker_fraction is not None:
        implied = 1.0 if strategy == "comm-opt" else 1.0 / world_size
        if abs(grad_worker_fraction - implied) > 1e-9:
            raise ValueError(
                f"distkfac: strategy={strategy!r} fixes grad_worker_fraction at {implied:g}; got "
                f"{grad_worker_fraction!r}. Use strategy='hybrid' to choose the fraction"
            )
    if strategy == "comm-opt":
        return world_size
    if strategy == "mem-opt":
        return 1
    assert grad_worker_fraction is not None
    if not (isinstance(grad_worker_fraction, int | float) and 0.0 < grad_worker_fraction <= 1.0):
        raise ValueError(f"distkfac: grad_worker_fraction must be in (0, 1], got {grad_worker_fraction!r}")
    workers = grad_worker_fraction * world_size
    rounded = round(workers)
    if rounded < 1 or abs(workers - rounded) > 1e-9 or world_size % rounded != 0:
        raise ValueError(
            f"distkfac: grad_worker_fraction={grad_worker_fraction!r} gives {workers:g} gradient workers per layer "
            f"out of {world_size} ranks; it must be a whole number that divides the world size: use one of {valid}"
        )
    return rounded


@dataclass(frozen=True)
class LayerWork:
    """Who works on one layer: the ranks decomposing A and G, and the ranks holding both decompositions."""

    a_owner: int
    g_owner: int
    grad_workers: tuple[int, ...]

    def owner(self, kind: FactorKind) -> int:
        """The rank that decomposes the layer's ``kind`` factor."""
        return self.a_owner if kind is FactorKind.A else self.g_owner


@dataclass(frozen=True)
class WorkAssignment:
    world_size: int
    layers: tuple[LayerWork, ...]
    worker_groups: tuple[tuple[int, ...], ...]
    receiver_groups: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]  # estimated decomposition cost per rank (sum of n^3)

    def receiver_group_of(self, rank: int) -> tuple[int, ...]:
        return next(group for group in self.receiver_groups if rank in group)

    def grad_source(self, layer: int, rank: int) -> int:
        """The gradient worker of ``layer`` that gives ``rank`` its preconditioned gradient (itself if a worker)."""
        receivers = self.receiver_group_of(rank)
        return next(r for r in self.layers[layer].grad_workers if r in receivers)

    def balance(self) -> float:
        """max / mean of the per-rank decomposition cost: 1.0 is perfect."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0


def decomposition_cost(factor: int | FactorShape) -> float:
    """``n^3`` for a dense ``n x n`` factor (an int); a ``FactorShape`` knows its own (linear for vectors)."""
    return factor.cost if isinstance(factor, FactorShape) else float(factor) ** 3


def assign_work(
    dims: Sequence[tuple[int, int]] | Sequence[tuple[FactorShape, FactorShape]], world_size: int, grad_workers: int
) -> WorkAssignment:
    """Assign layers (given as ``(a_dim, g_dim)`` of dense factors, or as ``(A, G)`` factor shapes) to ranks;
    deterministic, so every rank computes the same."""
    if world_size < 1 or grad_workers < 1 or world_size % grad_workers != 0:
        raise ValueError(f"distkfac: {grad_workers} gradient workers per layer do not divide {world_size} ranks")
    columns = world_size // grad_workers
    worker_groups = tuple(tuple(range(k, world_size, columns)) for k in range(columns))
    receiver_groups = tuple(tuple(range(j * columns, (j + 1) * columns)) for j in range(grad_workers))

    group_load = [0.0] * columns
    layer_group = [0] * len(dims)
    costs = [(decomposition_cost(a), decomposition_cost(g)) for a, g in dims]
    layer_cost = [a + g for a, g in costs]
    for index in sorted(range(len(dims)), key=lambda i: (-layer_cost[i], i)):
        k = min(range(columns), key=lambda c: (group_load[c], c))
        layer_group[index] = k
        group_load[k] += layer_cost[index]

    rank_load = [0.0] * world_size
    owners: dict[FactorKey, int] = {}
    factors = [
        (of_kind(kind, pair), FactorKey(index, kind)) for index, pair in enumerate(costs) for kind in FACTOR_KINDS
    ]
    for cost, key in sorted(factors, key=lambda f: (-f[0], f[1])):  # largest first; A before G on ties
        members = worker_groups[layer_group[key.layer]]
        rank = min(members, key=lambda r: (rank_load[r], r))
        owners[key] = rank
        rank_load[rank] += cost

    layers = tuple(
        LayerWork(
            a_owner=owners[FactorKey(i, FactorKind.A)],
            g_owner=owners[FactorKey(i, FactorKind.G)],
            grad_workers=worker_groups[layer_group[i]],
        )
        for i in range(len(dims))
    )
    return WorkAssignment(world_size, layers, worker_groups, receiver_groups, tuple(rank_load))
