"""Decomposition speed-up over one rank: distkfac's assignments and kfac-pytorch's KAISA on the same layers."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from benchmarks.scale_model.configs import assignment_for
from benchmarks.scale_model.constants import PEERS_DIR
from benchmarks.scale_model.kernels import Kernels
from benchmarks.scale_model.layer_sets import LayerSet


def speedups(layer_set: LayerSet, world: int, grad_workers: int, split_above: int | None, kernels: Kernels) -> dict:
    """Decomposition speed-up over one rank: all the work over the busiest rank's, under the ``n^3`` model and with
    the measured eigh times; for split factors also against today's unsplit work at one rank."""
    today = assignment_for(layer_set, 1, 1, None)
    work = assignment_for(layer_set, world, grad_workers, split_above)
    measured = [0.0] * world
    for block, owner in work.blocks:
        measured[owner] += kernels.decompose_s(block.size, "eigen")
    whole_s = sum(kernels.decompose_s(block.size, "eigen") for block, _ in today.blocks)
    return {
        "model": work.decomposition_speedup(),
        "model vs today": sum(today.loads) / max(work.loads),
        "measured": sum(measured) / max(measured),
        "measured vs today": whole_s / max(measured),
        "work": sum(work.loads) / sum(today.loads),
    }


def kaisa_speedup(layer_set: LayerSet, world: int, fraction: float, colocate: bool) -> float | str:
    """kfac-pytorch's ``KAISAAssignment`` on the same layers and ``n^3`` costs: sum of costs over the busiest rank's;
    a short reason instead where kfac-pytorch (build/peers) cannot be imported."""
    if str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))  # last: its "examples" package must not shadow anything
    warnings.filterwarnings("ignore", message="NVIDIA Apex is not installed", category=UserWarning)
    try:
        from kfac.assignment import KAISAAssignment
    except Exception as error:  # ImportError, or anything its import runs into
        return f"n/a ({type(error).__name__}: kfac-pytorch not importable from {PEERS_DIR})"
    work = decomposition_work(layer_set)
    assignment = KAISAAssignment(
        work,
        local_rank=0,
        world_size=world,
        grad_worker_fraction=fraction,
        group_func=lambda ranks: None,
        colocate_factors=colocate,
    )
    return busiest_rank_speedup(work, assignment.inv_worker, world)


def decomposition_work(layer_set: LayerSet) -> dict[str, dict[str, float]]:
    """Each layer's ``A`` and ``G`` decomposition costs (``n^3``), keyed as kfac-pytorch's assignments take them."""
    return {f"layer{i}": {"A": float(x.a.dim) ** 3, "G": float(x.g.dim) ** 3} for i, x in enumerate(layer_set.layers)}


def busiest_rank_speedup(work: dict[str, dict[str, float]], owner: Callable[[str, str], int], world: int) -> float:
    """The sum of all costs over the busiest rank's, where ``owner(layer, factor)`` is the rank that decomposes it."""
    loads = [0.0] * world
    for layer, factors in work.items():
        for factor, cost in factors.items():
            loads[owner(layer, factor)] += cost
    return sum(loads) / max(loads)


def _cell(value: float | str, digits: int = 2) -> str:
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def speedup_table(
    layer_set: LayerSet, worlds: Sequence[int], split_above: int, fraction: float, kernels: Kernels
) -> list[str]:
    rows = [
        f"Decomposition speed-up over one rank (sum of costs / busiest rank's), split above {split_above} where "
        f"said; split work at one rank = {speedups(layer_set, 1, 1, split_above, kernels)['work']:.1%} of the "
        "unsplit (n^3):",
        "",
        "| P | P/2 | comm-opt today, n^3 | comm-opt split, n^3 (vs split at 1 rank) | vs today at 1 rank | "
        "comm-opt today, eigh | split, eigh | split, eigh vs today at 1 rank | hybrid today / split, n^3 | "
        "mem-opt today / split, n^3 | KAISA comm-opt, colocated (default) | KAISA comm-opt, per factor | "
        "KAISA hybrid, colocated |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world in worlds:
        today, split = (
            speedups(layer_set, world, world, None, kernels),
            speedups(layer_set, world, world, split_above, kernels),
        )
        hybrid = [speedups(layer_set, world, round(world * fraction), s, kernels)["model"] for s in (None, split_above)]
        memopt = [speedups(layer_set, world, 1, s, kernels)["model"] for s in (None, split_above)]
        kaisa = [kaisa_speedup(layer_set, world, f, c) for f, c in ((1.0, True), (1.0, False), (fraction, True))]
        mark = " (>= P/2)" if split["model"] >= world / 2 else ""
        rows.append(
            f"| {world} | {world / 2:g} | {today['model']:.2f} | {split['model']:.2f}{mark} | "
            f"{split['model vs today']:.1f} | {today['measured']:.2f} | {split['measured']:.2f} | "
            f"{split['measured vs today']:.1f} | {hybrid[0]:.2f} / {hybrid[1]:.2f} | "
            f"{memopt[0]:.2f} / {memopt[1]:.2f} | " + " | ".join(_cell(k) for k in kaisa) + " |"
        )
    return rows
