"""Step time: the projected step of a configuration at a world size, and where its time goes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.scale_model.configs import Config, Schedule, assignment_for
from benchmarks.scale_model.kernels import Kernels
from benchmarks.scale_model.layer_sets import Layer, LayerSet
from benchmarks.scale_model.network import Network
from benchmarks.scale_model.rank_traffic import (
    Call,
    busiest_rank,
    bytes_per_step,
    decomposition_calls,
    memory_per_rank,
    traffic,
)
from distkfac.assignment import WorkAssignment


@dataclass(frozen=True)
class LayerTimes:
    """Seconds of one layer's kernels per rank and step."""

    forward: float
    backward: float
    a_factor: float  # on factor-update steps, in the forward hook
    g_factor: float  # on factor-update steps, in the backward hook


def layer_times(layer: Layer, kernels: Kernels) -> LayerTimes:
    """Forward ``rows x a x g``, backward ``rows x g x a`` and ``a x rows x g``, factors ``a x rows x a`` and
    ``g x rows x g``; a conv's im2col (``F.unfold``) once for A, and in forward and backward for kernels > 1 x 1."""
    m, a, g = layer.rows, layer.a.dim, layer.g.dim
    unfold = kernels.unfold_s(layer.unfold)
    conv = unfold if layer.spatial else 0.0
    return LayerTimes(
        forward=kernels.gemm_s(m, a, g) + conv,
        backward=kernels.gemm_s(m, g, a) + kernels.gemm_s(a, m, g) + conv,
        a_factor=kernels.gemm_s(a, m, a) + unfold,
        g_factor=kernels.gemm_s(g, m, g),
    )


def precondition_s(layer: Layer, kernels: Kernels, method: str) -> float:
    """``Q_G^T grad Q_A`` and back (eigen: two GEMM pairs; inverse: one). Whole-sized for split factors too: their
    blocks are stored in whole ``n x n`` bases (zero outside the blocks), so the products are dense."""
    pairs = 2 if method == "eigen" else 1
    a, g = layer.a.dim, layer.g.dim
    return pairs * (kernels.gemm_s(g, g, a) + kernels.gemm_s(g, a, a))


def network_seconds(network: Network, calls: Iterable[Call]) -> float:
    return sum(network.seconds(call.op, call.nbytes, call.ranks) for call in calls)


def exposed_factor_s(
    buckets: Sequence[tuple[list[int], list[Call]]], backward: Sequence[float], forward_s: float, network: Network,
    overlap: bool,
) -> float:  # fmt: skip
    """Seconds the factor reductions add after the backward pass. A bucket starts once the backward pass has passed
    all its layers (they run last to first), one bucket at a time on the network; without overlap all start after."""
    done: dict[int, float] = {}
    clock = forward_s
    for index in reversed(range(len(backward))):
        clock += backward[index]
        done[index] = clock
    free = 0.0
    for layers, calls in buckets:
        start = max(max(done[i] for i in layers) if overlap else clock, free)
        free = start + network_seconds(network, calls)
    return max(0.0, free - clock)


@dataclass(frozen=True)
class Projection:
    """One configuration at one world size: step times (s), bytes per step, memory, and where the time goes."""

    normal_s: float  # a step without decompositions (mean over factor- and other steps)
    slowest_s: float  # a decomposition step
    mean_s: float
    bytes_rank0: float
    bytes_busiest: float
    busiest: int
    memory_bytes: float  # the fullest rank's K-FAC memory
    parts: dict[str, float]


def _compute_parts(layer_set: LayerSet, config: Config, world: int, kernels: Kernels) -> dict[str, Any]:
    """Forward/backward/factor seconds, per-group preconditioning and per-rank decomposition seconds."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    times = [layer_times(layer, kernels) for layer in layer_set.layers]
    extra = sum(count * kernels.gemm_s(m, k, n) for count, m, k, n in layer_set.extra_gemms)
    decompose = [0.0] * world
    for block, owner in assignment.blocks:
        decompose[owner] += kernels.decompose_s(block.size, config.compute_method)
    precondition: dict[tuple[int, ...], float] = {}
    for layer, work in zip(layer_set.layers, assignment.layers, strict=True):
        seconds = precondition_s(layer, kernels, config.compute_method)
        precondition[work.grad_workers] = precondition.get(work.grad_workers, 0.0) + seconds
    return {
        "assignment": assignment,
        "forward": sum(t.forward for t in times) + extra,
        "backward": [t.backward for t in times],
        "extra_backward": 2 * extra,
        "a_factors": sum(t.a_factor for t in times),
        "g_factors": [t.g_factor for t in times],
        "precondition": precondition,
        "decompose": decompose,
    }


def _elementwise_s(layer_set: LayerSet, config: Config, world: int, kernels: Kernels) -> tuple[float, float]:
    """(every step, factor steps) seconds of elementwise passes: optimizer and gradient copies (5 passes over the
    parameters, 3 more when averaging), preconditioning's copies and divide (8 over each gradient), the running
    average (3 over the fullest rank's factors) and packing for the exchange (4 over every factor sent)."""
    element = layer_set.dtype.itemsize
    passes = 5 + (3 if world > 1 and not config.ddp else 0)
    every = passes * layer_set.params * element + 8 * sum(x.a.dim * x.g.dim for x in layer_set.layers) * element
    factors = sum(x.a.dim**2 + x.g.dim**2 for x in layer_set.layers) * element
    owned = factors if config.reduction == "allreduce" or world == 1 else max(factors / world, 0.0)
    factor_steps = 3 * owned + (4 * factors if world > 1 else 0.0)
    return kernels.elementwise_s(every), kernels.elementwise_s(factor_steps)


def project(
    layer_set: LayerSet, config: Config, world: int, kernels: Kernels, network: Network, schedule: Schedule
) -> Projection:
    """The projected step of ``config`` at ``world`` ranks (weak scaling: ``layer_set`` holds one rank's batch).

    A factor step: forward (with A), backward (with G) while the factor buckets reduce, the exposed rest of the
    reductions, gradient averaging, preconditioning (the slowest worker group), the gradient broadcasts and the
    elementwise passes. A decomposition step adds the checks and the slowest worker group's decompositions and
    broadcasts (asynchronously, only what does not fit in ``inv_update_steps`` steps)."""
    parts = _compute_parts(layer_set, config, world, kernels)
    busiest = busiest_rank(layer_set, config, world)
    mine, theirs = traffic(layer_set, config, world, 0), traffic(layer_set, config, world, busiest)
    every_s, factor_elementwise_s = _elementwise_s(layer_set, config, world, kernels)
    backward = [b + g for b, g in zip(parts["backward"], parts["g_factors"], strict=True)]
    forward = parts["forward"] + parts["a_factors"]
    shown = {
        "compute": forward + sum(backward) + parts["extra_backward"],
        "factor comm": exposed_factor_s(mine.buckets, backward, forward, network, config.overlap),
        "averaging": network_seconds(network, mine.averaging),
        "precondition": max(parts["precondition"].values(), default=0.0),
        "gradient comm": network_seconds(network, mine.gradients),
        "elementwise": every_s + factor_elementwise_s,
    }
    factor_step = sum(shown.values())
    plain_step = parts["forward"] + sum(parts["backward"]) + parts["extra_backward"] + every_s  # no factors
    plain_step += shown["averaging"] + shown["precondition"] + shown["gradient comm"]
    fus, inv = schedule.factor_update_steps, schedule.inv_update_steps
    normal = ((fus - 1) * plain_step + factor_step) / fus
    decompose, broadcasts = _decomposition_s(layer_set, config, world, parts, network)
    checks = network_seconds(network, mine.checks)
    late = max(0.0, decompose + broadcasts - inv * normal) if config.asynchronous else decompose + broadcasts
    shown.update({"decompose": decompose, "decomposition comm": broadcasts, "checks": checks, "shown": late})
    return Projection(
        normal_s=normal,
        slowest_s=factor_step + checks + late,
        mean_s=normal + (checks + late) / inv,
        bytes_rank0=bytes_per_step(mine, inv, fus),
        bytes_busiest=bytes_per_step(theirs, inv, fus),
        busiest=busiest,
        memory_bytes=max(memory_per_rank(layer_set, config, world)),
        parts=shown,
    )


def _decomposition_s(
    layer_set: LayerSet, config: Config, world: int, parts: Mapping[str, Any], network: Network
) -> tuple[float, float]:
    """(decompositions, broadcasts) seconds of the slowest worker group: its busiest member's decompositions, then
    the group's broadcasts one after the other."""
    assignment: WorkAssignment = parts["assignment"]
    decompose: list[float] = parts["decompose"]
    slowest = (0.0, 0.0)
    for group in assignment.worker_groups:
        calls = decomposition_calls(layer_set, config, world, group[0]) if len(group) > 1 else []
        candidate = (max(decompose[r] for r in group), network_seconds(network, calls))
        slowest = max(slowest, candidate, key=sum)
    return slowest
