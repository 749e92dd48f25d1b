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

With ``split_above``, a dense factor larger than that is cut into ``ceil(n / split_above)`` diagonal blocks
(``distkfac.factors.block_bounds``), and the blocks are assigned like factors, each to its own member of the layer's
worker group. Whole factors cannot balance past ``sum / max`` of their costs (4.63x on ResNet-50, whose largest
factor holds 21.6% of the ``n^3`` work); blocks can. The cut depends on ``n`` and ``split_above`` only, never on the
world size, so a run computes the same at any P. Greedy largest-first list scheduling (Graham 1969) keeps every
rank's load below ``mean + largest block`` when the worker group is all ranks (comm-opt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from distkfac.factors import FACTOR_KINDS, FactorBlock, FactorKey, FactorKind, FactorShape, block_bounds, of_kind

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
    blocks: tuple[tuple[FactorBlock, int], ...] = ()  # every block of every present factor, in order, with its owner

    def owners(self, key: FactorKey) -> tuple[int, ...]:
        """The ranks that decompose a block of ``key`` (one rank unless the factor is split)."""
        return tuple(owner for block, owner in self.blocks if block.key == key)

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

    def decomposition_speedup(self) -> float:
        """All the decomposition work over the busiest rank's: the speed-up over one rank under the cost model."""
        return sum(self.loads) / max(self.loads) if max(self.loads) > 0 else 1.0


def decomposition_cost(factor: int | FactorShape) -> float:
    """``n^3`` for a dense ``n x n`` factor (an int); a ``FactorShape`` knows its own (linear for vectors)."""
    return factor.cost if isinstance(factor, FactorShape) else float(factor) ** 3


def _as_shape(factor: int | FactorShape) -> FactorShape:
    return factor if isinstance(factor, FactorShape) else FactorShape.dense(factor)


def assign_work(
    dims: Sequence[tuple[int, int]] | Sequence[tuple[FactorShape, FactorShape]],
    world_size: int,
    grad_workers: int,
    split_above: int | None = None,
) -> WorkAssignment:
    """Assign layers (given as ``(a_dim, g_dim)`` of dense factors, or as ``(A, G)`` factor shapes) to ranks, and
    each factor's blocks (``split_above``; whole factors without it) to members of the layer's worker group;
    deterministic, so every rank computes the same."""
    if world_size < 1 or grad_workers < 1 or world_size % grad_workers != 0:
        raise ValueError(f"distkfac: {grad_workers} gradient workers per layer do not divide {world_size} ranks")
    if split_above is not None and (not isinstance(split_above, int) or split_above < 1):
        raise ValueError(f"distkfac: split_factors_above must be a whole number >= 1 or None, got {split_above!r}")
    columns = world_size // grad_workers
    worker_groups = tuple(tuple(range(k, world_size, columns)) for k in range(columns))
    receiver_groups = tuple(tuple(range(j * columns, (j + 1) * columns)) for j in range(grad_workers))

    shapes = [(_as_shape(a), _as_shape(g)) for a, g in dims]
    blocks: list[tuple[float, FactorBlock]] = []
    for index, pair in enumerate(shapes):
        for kind in FACTOR_KINDS:
            factor = of_kind(kind, pair)
            for start, stop in block_bounds(factor, split_above):
                block = FactorBlock(FactorKey(index, kind), start, stop)
                blocks.append((decomposition_cost(block.shape(factor)), block))
    layer_cost = [0.0] * len(dims)
    for cost, block in blocks:
        layer_cost[block.key.layer] += cost

    group_load = [0.0] * columns
    layer_group = [0] * len(dims)
    for index in sorted(range(len(dims)), key=lambda i: (-layer_cost[i], i)):
        k = min(range(columns), key=lambda c: (group_load[c], c))
        layer_group[index] = k
        group_load[k] += layer_cost[index]

    rank_load = [0.0] * world_size
    owners: dict[FactorBlock, int] = {}
    for cost, block in sorted(blocks, key=lambda b: (-b[0], b[1])):  # largest first; A before G on ties
        members = worker_groups[layer_group[block.key.layer]]
        rank = min(members, key=lambda r: (rank_load[r], r))
        owners[block] = rank
        rank_load[rank] += cost

    first_owner = {block.key: rank for block, rank in owners.items() if block.start == 0}
    layers = tuple(
        LayerWork(
            a_owner=first_owner[FactorKey(i, FactorKind.A)],
            g_owner=first_owner[FactorKey(i, FactorKind.G)],
            grad_workers=worker_groups[layer_group[i]],
        )
        for i in range(len(dims))
    )
    present = tuple(
        (block, owners[block]) for block in sorted(owners) if of_kind(block.key.kind, shapes[block.key.layer]).present
    )
    return WorkAssignment(world_size, layers, worker_groups, receiver_groups, tuple(rank_load), present)
