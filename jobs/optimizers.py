"""The optimizers a run may use: one list, with what belongs to each (torch-free, so that configs load fast).

Each entry names the ``optim.*`` keys that apply to it only (others are reported as ignored), its label in reports,
and the built-in hpo_worker search space a study tunes it in by default. ``jobs.optim`` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["LAYER_ORDERS", "OPTIMIZERS", "OPTIMIZER_NAMES", "Optimizer", "report_label"]


@dataclass(frozen=True)
class Optimizer:
    name: str  # the value of optim.name
    label: str  # in reports and plots
    keys: frozenset[str]  # optim.* keys that apply to this optimizer only
    default_space: str  # hpo_worker's built-in space (hpo_worker.spaces) that a study tunes it in
    preconditioned: bool = False  # distkfac's K-FAC preconditions its gradients ([kfac] applies)


_MOMENTUM_KEYS: Final = frozenset({"momentum", "momentum_form", "nesterov"})
_ADAM_KEYS: Final = frozenset({"betas", "eps"})
_SKIP_KEYS: Final = frozenset({"skip_strength", "skip_patience", "skip_tolerance"})
# layerwise_gd's orders, as distkfac.saddle_optim.LAYER_ORDERS (which imports torch; a test keeps them equal)
LAYER_ORDERS: Final = ("forward", "backward")

OPTIMIZERS: Final[dict[str, Optimizer]] = {
    entry.name: entry
    for entry in (
        Optimizer("sgd", "SGD", _MOMENTUM_KEYS, "sgd"),
        Optimizer("adam", "Adam", _ADAM_KEYS, "adam"),
        Optimizer("adamw", "AdamW", _ADAM_KEYS, "adam"),
        Optimizer("kfac", "K-FAC", _MOMENTUM_KEYS, "kfac", preconditioned=True),  # K-FAC + momentum SGD
        # Seed 004 (docs/saddle.md); full batch with data.batch_size = 0. Tuned in the sgd space: only lr applies.
        Optimizer("gd", "GD", frozenset(), "sgd"),
        Optimizer("layerwise_gd", "layer-wise GD", frozenset({"layer_order"}), "sgd"),
        Optimizer("skip_gd", "plateau-skipping GD", _SKIP_KEYS, "sgd"),
    )
}
OPTIMIZER_NAMES: Final = tuple(OPTIMIZERS)


def report_label(name: str) -> str:
    """``K-FAC`` for ``kfac``; an unknown name as it is."""
    entry = OPTIMIZERS.get(name)
    return entry.label if entry is not None else name
