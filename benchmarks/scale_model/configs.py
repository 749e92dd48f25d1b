"""Configurations: what the preconditioner is asked for, the schedule, and the issue's stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from benchmarks.scale_model.layer_sets import LayerSet
from distkfac.assignment import WorkAssignment, assign_work, grad_workers_for

# Settings that change no buffer's size or count (the intervals go to ``Schedule``; the model to the layer set).
NO_TRAFFIC_SETTINGS = frozenset(
    {"model", "inv_update_steps", "factor_update_steps", "weight_sharing", "conv_factors", "g_scale", "fisher"}
)


@dataclass(frozen=True)
class Schedule:
    """Decompositions every ``inv_update_steps`` steps, factor updates every ``factor_update_steps``."""

    inv_update_steps: int = 10
    factor_update_steps: int = 1


@dataclass(frozen=True)
class Config:
    """What the preconditioner is asked for, and the stage of the issue (``per_owner``, ``asynchronous``,
    ``split_above``)."""

    strategy: str = "comm-opt"
    fraction: float | None = None
    compute_method: str = "eigen"
    damping_form: str | None = None
    reduction: str = "owner"
    pack: bool = True
    overlap: bool = True
    comm_dtype: torch.dtype | None = None
    bucket_cap_mb: float = 8.0
    passes: int = 1
    ddp: bool = False
    per_owner: bool = False  # one reduce per owner and bucket (before item 3), else one reduce-scatter per bucket
    asynchronous: bool = False
    split_above: int | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Config:
        """From ``KFACPreconditioner`` keyword arguments plus ``passes`` and ``ddp`` (tests/dist_worker.py's
        CONFIGS); an unknown key raises, so that a new setting is modelled rather than ignored."""
        names = {
            "strategy": "strategy",
            "grad_worker_fraction": "fraction",
            "compute_method": "compute_method",
            "damping_form": "damping_form",
            "factor_reduction": "reduction",
            "pack_factors": "pack",
            "overlap_comm": "overlap",
            "comm_dtype": "comm_dtype",
            "bucket_cap_mb": "bucket_cap_mb",
            "passes": "passes",
            "ddp": "ddp",
            "split_factors_above": "split_above",
            "async_decompositions": "asynchronous",
        }
        unknown = set(settings) - set(names) - NO_TRAFFIC_SETTINGS
        if unknown:
            raise ValueError(f"scale_model: settings {sorted(unknown)} are not modelled")
        return cls(**{names[key]: value for key, value in settings.items() if key in names})

    @staticmethod
    def schedule_from(settings: Mapping[str, Any], default: Schedule) -> Schedule:
        """The decomposition and factor intervals of ``settings``, ``default``'s where it says none."""
        return Schedule(
            settings.get("inv_update_steps", default.inv_update_steps),
            settings.get("factor_update_steps", default.factor_update_steps),
        )

    def grad_workers(self, world: int) -> int:
        return grad_workers_for(self.strategy, self.fraction, world)


STRATEGY_CONFIGS: dict[str, Config] = {
    "comm-opt": Config("comm-opt"),
    "mem-opt": Config("mem-opt"),
    "hybrid": Config("hybrid", fraction=0.5),
    "KAISA-like baseline": Config("hybrid", fraction=0.5, reduction="allreduce", pack=False, overlap=False),
}


def stages(split_above: int) -> list[tuple[str, dict[str, Any]]]:
    """The issue's stages, cumulative in this order."""
    return [
        ("(0) today", {"per_owner": True}),
        ("(3) one collective per bucket", {}),
        ("(1) + async decompositions", {"asynchronous": True}),
        (f"(2) + split above {split_above}", {"asynchronous": True, "split_above": split_above}),
    ]


@cache
def assignment_for(layer_set: LayerSet, world: int, grad_workers: int, split_above: int | None) -> WorkAssignment:
    return assign_work(layer_set.dims, world, grad_workers, split_above)


def _element(dtype: torch.dtype | None, default: torch.dtype) -> int:
    return torch.empty((), dtype=dtype or default).element_size()


def compute_dtype(layer_set: LayerSet) -> torch.dtype:
    """Decompositions run in float64 for a float64 model, float32 otherwise (``inv_dtype`` unset)."""
    return torch.float64 if layer_set.dtype == torch.float64 else torch.float32
