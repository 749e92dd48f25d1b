"""The preconditioner's settings: the constructor's keyword arguments, checked in one place.

``KFACSettings.checked(...)`` takes exactly ``KFACPreconditioner``'s keyword arguments (the constructor's signature
holds the defaults) and raises on the first bad one. Checks that need the model or the communicator (``skip_layers``
names, ``strategy`` against the world size, ``comm``) stay with the preconditioner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from distkfac.assignment import Strategy
from distkfac.layers import CONV_FACTORS, G_SCALES, WEIGHT_SHARINGS, ConvFactors, GScale, WeightSharing
from distkfac.methods import DAMPING_FORMS, METHODS, DampingForm

__all__ = [
    "FACTOR_REDUCTIONS",
    "FISHER_TYPES",
    "Hyperparameter",
    "KFACSettings",
    "check_decay",
    "check_positive",
    "hyperparameter_at",
]

Hyperparameter = float | Callable[[int], float]

FISHER_TYPES: tuple[str, ...] = ("empirical", "mc")
FACTOR_REDUCTIONS: tuple[str, ...] = ("owner", "allreduce")


def check_positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"distkfac: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_decay(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(
            f"distkfac: {name} must be in [0, 1), got {value!r} (0 keeps only the newest batch; 0.95 is typical)"
        )
    return float(value)


def hyperparameter_at(
    value: Hyperparameter, name: str, step: int, check: Callable[[str, float], float] = check_positive
) -> float:
    """The hyperparameter's value at ``step`` (a schedule is called), validated by ``check``."""
    return check(name, value(step) if callable(value) else value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"distkfac: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_choices(compute_method: str, conv_factors: str, g_scale: str, fisher: str, factor_reduction: str) -> None:
    if compute_method not in METHODS:
        raise ValueError(f"distkfac: compute_method must be one of {sorted(METHODS)}, got {compute_method!r}")
    _check_choice("conv_factors", conv_factors, CONV_FACTORS)
    _check_choice("g_scale", g_scale, G_SCALES)
    if fisher not in FISHER_TYPES:
        raise ValueError(f"distkfac: fisher must be 'empirical' or 'mc', got {fisher!r}")
    if factor_reduction not in FACTOR_REDUCTIONS:
        raise ValueError(f"distkfac: factor_reduction must be 'owner' or 'allreduce', got {factor_reduction!r}")


def _check_steps(factor_update_steps: int, inv_update_steps: int) -> None:
    for name, steps in (("factor_update_steps", factor_update_steps), ("inv_update_steps", inv_update_steps)):
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"distkfac: {name} must be an integer >= 1, got {steps!r}")


def _check_dtypes(
    factor_dtype: torch.dtype | None, inv_dtype: torch.dtype | None, comm_dtype: torch.dtype | None
) -> None:
    for dtype_name, dtype in (("factor_dtype", factor_dtype), ("inv_dtype", inv_dtype)):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"distkfac: {dtype_name} must be a floating-point dtype, got {dtype}")
    if inv_dtype is not None and inv_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"distkfac: inv_dtype must be torch.float32 or torch.float64, got {inv_dtype}")
    if comm_dtype is not None and comm_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"distkfac: comm_dtype must be float32, float64, bfloat16 or float16, got {comm_dtype}")


def _check_split(split_factors_above: int | None) -> None:
    value = split_factors_above
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(
            f"distkfac: split_factors_above must be a whole number >= 1 (the largest block side, e.g. 1024) or None "
            f"(no split), got {value!r}"
        )


def _resolved_damping_form(compute_method: str, damping_form: str | None) -> str:
    """The damping form to use: the method's historical one when None, checked against what the method can do."""
    if damping_form is None:
        return METHODS[compute_method].default_form
    _check_choice("damping_form", damping_form, DAMPING_FORMS)
    if damping_form not in METHODS[compute_method].forms:
        raise ValueError(
            f"distkfac: damping_form={damping_form!r} cannot be used with compute_method={compute_method!r}: "
            "(A (x) G + damping I)^-1 is no product of two factor inverses. Use compute_method='eigen' for it, "
            f"or one of {METHODS[compute_method].forms} with {compute_method!r}"
        )
    return damping_form


def _check_hyperparameters(
    damping: Hyperparameter, factor_decay: Hyperparameter, lr: Hyperparameter, kl_clip: Hyperparameter | None
) -> None:
    """Fixed values are checked now; schedules are checked each time they are evaluated (at step 0 here)."""
    hyperparameter_at(damping, "damping", 0)
    hyperparameter_at(factor_decay, "factor_decay", 0, check_decay)
    hyperparameter_at(lr, "lr", 0)
    if kl_clip is not None:
        hyperparameter_at(kl_clip, "kl_clip", 0)


@dataclass(frozen=True)
class KFACSettings:
    """``KFACPreconditioner``'s keyword arguments, checked; ``damping_form`` is resolved (never None).

    One field per keyword argument, in the constructor's order, and no defaults: the constructor's signature is the
    one place that says them (``tests/test_errors.py`` keeps the two in step).
    """

    damping: Hyperparameter
    factor_decay: Hyperparameter
    factor_update_steps: int
    inv_update_steps: int
    kl_clip: Hyperparameter | None
    lr: Hyperparameter
    compute_method: Literal["eigen", "inverse"]
    damping_form: DampingForm
    conv_factors: ConvFactors
    g_scale: GScale
    weight_sharing: WeightSharing
    fisher: Literal["empirical", "mc"]
    skip_layers: tuple[str | type[nn.Module], ...]
    factor_dtype: torch.dtype | None
    inv_dtype: torch.dtype | None
    strategy: Strategy
    grad_worker_fraction: float | None
    comm: Any  # a Communicator, "single", "torch", "horovod" or None: resolved by the preconditioner
    comm_dtype: torch.dtype | None
    bucket_cap_mb: float
    overlap_comm: bool
    allreduce_grads: bool | None
    factor_reduction: Literal["owner", "allreduce"]
    pack_factors: bool
    split_factors_above: int | None
    async_decompositions: bool

    @classmethod
    def checked(cls, **arguments: Any) -> KFACSettings:
        """The settings from the constructor's keyword arguments; ValueError names the first bad one."""
        a = arguments
        _check_choices(a["compute_method"], a["conv_factors"], a["g_scale"], a["fisher"], a["factor_reduction"])
        _check_choice("weight_sharing", a["weight_sharing"], WEIGHT_SHARINGS)
        _check_steps(a["factor_update_steps"], a["inv_update_steps"])
        _check_dtypes(a["factor_dtype"], a["inv_dtype"], a["comm_dtype"])
        damping_form = _resolved_damping_form(a["compute_method"], a["damping_form"])
        _check_hyperparameters(a["damping"], a["factor_decay"], a["lr"], a["kl_clip"])
        check_positive("bucket_cap_mb", a["bucket_cap_mb"])
        _check_split(a["split_factors_above"])
        if not isinstance(a["async_decompositions"], bool):
            raise ValueError(f"distkfac: async_decompositions must be True or False, got {a['async_decompositions']!r}")
        return cls(**{**a, "damping_form": damping_form, "skip_layers": tuple(a["skip_layers"])})

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_cap_mb * 2**20)
