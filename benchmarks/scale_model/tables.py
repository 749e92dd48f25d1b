"""Step tables: step time, bytes and memory per P, strategy and stage, and where a decomposition step's time goes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from benchmarks.scale_model.configs import STRATEGY_CONFIGS, Schedule, stages
from benchmarks.scale_model.constants import MIB
from benchmarks.scale_model.kernels import Kernels
from benchmarks.scale_model.layer_sets import LayerSet
from benchmarks.scale_model.network import Network
from benchmarks.scale_model.projection import project


@dataclass(frozen=True)
class Scenario:
    """What the step tables project with: the machine's kernels and network, the K-FAC schedule, the block size that
    splits factors, and the hybrid strategies' gradient-worker fraction."""

    kernels: Kernels
    network: Network
    schedule: Schedule
    split_above: int
    fraction: float


def step_table(layer_set: LayerSet, worlds: Sequence[int], scenario: Scenario) -> list[str]:
    """Per P and strategy: slowest / mean step at each stage, bytes per step per rank, K-FAC memory per rank."""
    kernels, network, schedule, fraction = scenario.kernels, scenario.network, scenario.schedule, scenario.fraction
    stage_list = stages(scenario.split_above)
    rows = [
        "Step time in ms, slowest (a decomposition step) / mean, at each stage (cumulative, left to right); bytes per "
        "step per rank (rank 0 / busiest rank) and the fullest rank's K-FAC memory, today and split:",
        "",
        "| P | strategy | " + " | ".join(name for name, _ in stage_list) + " | MiB/step/rank today (0 / busiest) | "
        "MiB/step/rank split | K-FAC MiB/rank today | split |",
        "|---:|---|" + "---:|" * (len(stage_list) + 4),
    ]
    configs = dict(STRATEGY_CONFIGS)
    configs["hybrid"] = replace(configs["hybrid"], fraction=fraction)
    configs["KAISA-like baseline"] = replace(configs["KAISA-like baseline"], fraction=fraction)
    for world in worlds:
        for name, base in configs.items():
            baseline = base.reduction == "allreduce"
            steps = [project(layer_set, replace(base, **s), world, kernels, network, schedule) for _, s in stage_list]
            if baseline:  # no stages: full factors allreduced, synchronous, whole
                steps = [project(layer_set, base, world, kernels, network, schedule)] * len(stage_list)
            cells = [f"{p.slowest_s * 1e3:.0f} / {p.mean_s * 1e3:.0f}" for p in steps]
            today, split = steps[0], steps[-1]
            rows.append(
                f"| {world} | {name} | " + " | ".join(cells) + f" | {today.bytes_rank0 / MIB:.1f} / "
                f"{today.bytes_busiest / MIB:.1f} (rank {today.busiest}) | {split.bytes_rank0 / MIB:.1f} / "
                f"{split.bytes_busiest / MIB:.1f} | {today.memory_bytes / MIB:.0f} | {split.memory_bytes / MIB:.0f} |"
            )
    return rows


BREAKDOWN = (
    ("compute", "forward + backward + factors"),
    ("factor comm", "factor reductions, exposed"),
    ("averaging", "gradient averaging"),
    ("precondition", "preconditioning"),
    ("gradient comm", "gradient broadcasts"),
    ("elementwise", "elementwise"),
    ("checks", "checks"),
    ("decompose", "decompositions"),
    ("decomposition comm", "their broadcasts"),
    ("shown", "decompositions shown"),
)


def breakdown_table(layer_set: LayerSet, worlds: Sequence[int], scenario: Scenario) -> list[str]:
    """Where a decomposition step's time goes (ms), today and with every stage, for a few world sizes."""
    rows = [
        "Where a decomposition step's time goes, in ms (the slowest worker group's decompositions and broadcasts; "
        "'shown' is what the step waits for):",
        "",
        "| P | strategy | stage | " + " | ".join(title for _, title in BREAKDOWN) + " |",
        "|---:|---|---|" + "---:|" * len(BREAKDOWN),
    ]
    kernels, network, schedule, fraction = scenario.kernels, scenario.network, scenario.schedule, scenario.fraction
    first, *_, last = stages(scenario.split_above)
    for world in worlds:
        for name, base in STRATEGY_CONFIGS.items():
            base = replace(base, fraction=fraction) if base.fraction is not None else base
            chosen = [first] if base.reduction == "allreduce" else [first, last]
            for stage, settings in chosen:
                parts = project(layer_set, replace(base, **settings), world, kernels, network, schedule).parts
                cells = " | ".join(f"{parts[key] * 1e3:.1f}" for key, _ in BREAKDOWN)
                rows.append(f"| {world} | {name} | {stage.split(' ')[0]} | {cells} |")
    return rows
