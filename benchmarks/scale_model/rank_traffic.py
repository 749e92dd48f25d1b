"""What travels: every collective of one rank from the exchanges' plans, the bytes a communicator counts for
them, and the K-FAC memory of each rank."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from benchmarks.scale_model.configs import Config, Schedule, _element, assignment_for, compute_dtype
from benchmarks.scale_model.constants import MIB
from benchmarks.scale_model.layer_sets import LayerSet
from distkfac.comm.base import CommStats, SingleProcessCommunicator
from distkfac.exchange import DecompositionExchange, FactorExchange, GradientExchange
from distkfac.factors import FACTOR_KINDS, FactorBlock, FactorKey, FactorShape, of_kind
from distkfac.methods import METHODS


class PlanComm(SingleProcessCommunicator):
    """All the exchanges read when they build their plans: a rank and a world size. Nothing travels."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size


@dataclass(frozen=True)
class Call:
    """One collective as this rank sees it: its purpose, kind, buffer bytes and group size."""

    purpose: str
    op: str  # allreduce, reduce_scatter, reduce, broadcast
    nbytes: float
    ranks: int

    def record(self, stats: CommStats) -> None:
        """What the communicators count for it (distkfac/comm/base.py)."""
        if self.op == "allreduce":
            stats.record_allreduce(self.purpose, self.nbytes, self.ranks)
        else:
            stats.record_one_way(self.purpose, self.nbytes, self.ranks)


@dataclass
class Traffic:
    """Every collective of one rank, by when it happens."""

    buckets: list[tuple[list[int], list[Call]]] = field(default_factory=list)  # per factor pass, launch order
    averaging: list[Call] = field(default_factory=list)  # every step, without DDP
    gradients: list[Call] = field(default_factory=list)  # every step
    checks: list[Call] = field(default_factory=list)  # decomposition steps: finiteness flags, factor traces
    decompositions: list[Call] = field(default_factory=list)  # decomposition steps: this rank's worker group

    def factor_calls(self) -> list[Call]:
        return [call for _, calls in self.buckets for call in calls]


def _factor_of(layer_set: LayerSet, key: FactorKey) -> FactorShape:
    return of_kind(key.kind, layer_set.dims[key.layer])


def state_numel(layer_set: LayerSet, block: FactorBlock, method: str, damping_form: str | None) -> int:
    """Numbers in the decomposition of one block of a factor (the whole factor when it is not split)."""
    shape = block.shape(_factor_of(layer_set, block.key))
    return sum(math.prod(s) for s in METHODS[method](damping_form).state_shapes(shape))


def _bucket_calls(exchange: FactorExchange, layer_set: LayerSet, config: Config) -> list[tuple[list[int], list[Call]]]:
    """Each bucket's collectives (``FactorExchange.buckets``): the packed blocks of its layers, segment by owner
    (``FactorExchange.units``), reduced in one collective, in one per owner, or allreduced whole."""
    element = _element(config.comm_dtype, layer_set.dtype)
    world = exchange.comm.world_size
    out = []
    for members in exchange.buckets:
        by_owner: dict[int, int] = {}
        for index in members:
            for kind in FACTOR_KINDS:
                for block, owner in exchange.units.get(FactorKey(index, kind), []):
                    numel = block.shape(_factor_of(layer_set, block.key)).numel(config.pack)
                    by_owner[owner] = by_owner.get(owner, 0) + numel
        total = sum(by_owner.values())
        if config.reduction == "allreduce":
            calls = [Call("factors", "allreduce", total * element, world)]
        elif config.per_owner:
            calls = [Call("factors", "reduce", by_owner[r] * element, world) for r in sorted(by_owner) if by_owner[r]]
        else:
            calls = [Call("factors", "reduce_scatter", total * element, world)] if total else []
        out.append((list(members), calls))
    return out


def decomposition_calls(layer_set: LayerSet, config: Config, world: int, rank: int) -> list[Call]:
    """The broadcasts of decompositions that ``rank`` takes part in (``DecompositionExchange.plan``)."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    method = METHODS[config.compute_method](config.damping_form)
    exchange = DecompositionExchange(PlanComm(rank, world), assignment, layer_set.dims, method.state_shapes)
    element = _element(compute_dtype(layer_set), layer_set.dtype)
    calls = []
    for group, _, blocks in exchange.plan:
        numel = sum(state_numel(layer_set, block, config.compute_method, config.damping_form) for block in blocks)
        calls.append(Call("decompositions", "broadcast", numel * element, len(group)))
    return calls


def traffic(layer_set: LayerSet, config: Config, world: int, rank: int) -> Traffic:
    """Every collective ``rank`` of ``world`` takes part in, from the exchanges' plans."""
    if world == 1:
        return Traffic()
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    comm = PlanComm(rank, world)
    factors = FactorExchange(
        comm,
        assignment,
        layer_set.dims,
        comm_dtype=config.comm_dtype,
        bucket_bytes=int(config.bucket_cap_mb * MIB),
        reduction="allreduce" if config.reduction == "allreduce" else "owner",
        pack=config.pack,
    )
    gradients = GradientExchange(comm, assignment, layer_set.dims)
    element = _element(compute_dtype(layer_set), layer_set.dtype)
    shapes = [(layer.g.dim, layer.a.dim) for layer in layer_set.layers]
    out = Traffic(buckets=_bucket_calls(factors, layer_set, config))
    for _, layers in gradients.plan:
        numel = sum(shapes[i][0] * shapes[i][1] for i in layers) + len(layers)  # V and one <V, grad> per layer
        out.gradients.append(Call("gradients", "broadcast", numel * element, len(gradients.receivers)))
    if not config.ddp:
        out.averaging.append(
            Call("gradient averaging", "allreduce", layer_set.params * layer_set.dtype.itemsize, world)
        )
    flags = 2 * len(layer_set.layers)
    out.checks.append(Call("finiteness check", "allreduce", flags * 4, world))  # int32 flags
    method = METHODS[config.compute_method](config.damping_form)
    if method.shifts_at_decomposition and method.damping_form == "factored-pi":
        out.checks.append(Call("factor traces", "allreduce", flags * 8, world))  # float64 tr F / dim F
    out.decompositions = decomposition_calls(layer_set, config, world, rank)
    return out


def run_stats(
    traffic: Traffic, steps: int, schedule: Schedule, passes: int = 1, asynchronous: bool = False
) -> CommStats:
    """What a rank's communicator counts over ``steps`` steps of ``KFACPreconditioner.step()``. Asynchronously, the
    first decompositions are shared at once and later ones one interval late, so the second decomposition step
    shares nothing."""
    stats = CommStats()
    decomposition_steps = [s for s in range(steps) if s % schedule.inv_update_steps == 0]
    for step in range(steps):
        calls = list(traffic.averaging)
        if step % schedule.factor_update_steps == 0:
            calls += traffic.factor_calls() * passes  # each pass launches every bucket
        if step in decomposition_steps:
            calls += traffic.checks
            if not (asynchronous and decomposition_steps.index(step) == 1):
                calls += traffic.decompositions
        for call in calls + traffic.gradients:
            call.record(stats)
    return stats


def bytes_per_step(traffic: Traffic, inv_update_steps: int, factor_update_steps: int) -> float:
    """Bytes a rank sends per step, on average (CommStats' counting)."""

    def total(calls: Iterable[Call]) -> float:
        stats = CommStats()
        for call in calls:
            call.record(stats)
        return stats.total_bytes()

    return (
        total(traffic.averaging + traffic.gradients)
        + total(traffic.factor_calls()) / factor_update_steps
        + total(traffic.checks + traffic.decompositions) / inv_update_steps
    )


def busiest_rank(layer_set: LayerSet, config: Config, world: int) -> int:
    """The first member of the worker group with the largest decomposition broadcasts. Ranks differ in nothing else:
    factor reductions, gradient averaging and the checks span the world, and every receiver group holds one member of
    each worker group, so the gradient broadcasts have the same sizes in every receiver group."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    per_group: dict[tuple[int, ...], float] = {}
    for block, _ in assignment.blocks:
        group = assignment.layers[block.key.layer].grad_workers
        if len(group) > 1:
            numel = state_numel(layer_set, block, config.compute_method, config.damping_form)
            per_group[group] = per_group.get(group, 0.0) + numel
    return max(per_group, key=lambda g: (per_group[g], -g[0]))[0] if per_group else 0


def memory_per_rank(layer_set: LayerSet, config: Config, world: int) -> list[float]:
    """K-FAC bytes each rank keeps, as ``KFACPreconditioner.memory_bytes`` counts them: running factors (whole on
    their owner, or everywhere when allreduced; a split factor as the owned blocks side by side, an ``m x m`` matrix
    with ``m`` their summed sides) and, on a layer's gradient workers, the decompositions (whole-sized: a split
    factor's blocks fill their diagonal blocks) and the gradient."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    factor_element, state_element = layer_set.dtype.itemsize, compute_dtype(layer_set).itemsize
    method = METHODS[config.compute_method](config.damping_form)
    sides: dict[FactorKey, dict[int, int]] = {}  # factor -> owner -> summed side of its blocks
    for block, owner in assignment.blocks:
        owned = sides.setdefault(block.key, {})
        owned[owner] = owned.get(owner, 0) + block.size
    out = [0.0] * world
    for key, owned in sides.items():
        whole = math.prod(_factor_of(layer_set, key).tensor_shape) * factor_element
        if config.reduction == "allreduce" or world == 1:
            for rank in range(world):
                out[rank] += whole
            continue
        for rank, side in owned.items():
            out[rank] += (
                whole if len(owned) == 1 and side == _factor_of(layer_set, key).dim else side * side * factor_element
            )
    group_bytes: dict[tuple[int, ...], float] = {}
    for layer, work in zip(layer_set.layers, assignment.layers, strict=True):
        states = sum(math.prod(s) for shape in (layer.a, layer.g) for s in method.state_shapes(shape))
        stacked = float(states + layer.a.dim * layer.g.dim) * state_element
        group_bytes[work.grad_workers] = group_bytes.get(work.grad_workers, 0.0) + stacked
    for group, kept in group_bytes.items():
        for rank in group:
            out[rank] += kept
    return out
