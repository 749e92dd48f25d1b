"""Optimizers (momentum SGD, Adam, AdamW, K-FAC + momentum SGD, seed 004's gradient descents) and learning-rate
schedules.

A schedule is a callable of the step count (0 for the first step), so the same object sets the optimizer's
learning rate each step and is handed to ``KFACPreconditioner(lr=...)`` for KL clipping. Its value is::

    peak = lr * global_batch / base_batch_size      (linear scaling rule; peak = lr when base_batch_size = 0)
    lr(step) = peak * decay(step) * min(1, (step + 1) / warmup_steps)

with ``decay`` 1 (``constant``), ``gamma ** (milestones passed)`` (``step``: milestones in epochs; with
``decay_every = e`` instead, ``gamma ** floor(epoch / e)``, Chainer's ``ExponentialShift`` every e epochs), or, for
``linear``, a straight line from ``peak`` at the end of warmup to ``end_lr`` at step ``total_steps`` (never
reached: the last step, ``total_steps - 1``, still has a positive rate). Warmup can be given in steps or epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distkfac import KFACPreconditioner, LevenbergMarquardt
from distkfac.comm import Communicator
from distkfac.momentum import ChainerMomentumSGD
from distkfac.saddle_optim import LayerwiseGD, PlateauSkippingGD
from jobs.config import KFACConfig, OptimConfig
from jobs.optimizers import OPTIMIZER_NAMES, OPTIMIZERS

__all__ = ["DTYPES", "LRSchedule", "build_kfac", "build_optimizer", "make_lr_schedule", "peak_lr", "set_lr"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate at each step; see the module docstring."""

    peak: float
    total_steps: int
    kind: str = "constant"  # constant | step | linear
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()  # in steps
    every: int = 0  # step: decay every this many steps instead of at milestones (0 = off)
    gamma: float = 0.1
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "step", "linear"):
            raise ValueError(f"unknown schedule {self.kind!r}; choose constant, step or linear (optim.schedule)")
        if self.kind == "linear" and self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"linear decay after {self.warmup_steps} warmup steps leaves nothing of a {self.total_steps}-step run:"
                " shorten the warmup (optim.warmup_steps / optim.warmup_epochs)"
            )

    def __call__(self, step: int) -> float:
        if self.kind == "step" and self.every:
            lr = self.peak * self.gamma ** (step // self.every)
        elif self.kind == "step":
            lr = self.peak * self.gamma ** sum(1 for m in self.milestones if step >= m)
        elif self.kind == "linear":
            progress = max(0, step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            lr = self.end_lr + (self.peak - self.end_lr) * (1.0 - progress)
        else:
            lr = self.peak
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr


def peak_lr(config: OptimConfig, global_batch: int) -> float:
    """``config.lr``, scaled by the linear scaling rule when ``config.base_batch_size`` is set."""
    if config.base_batch_size:
        return config.lr * global_batch / config.base_batch_size
    return config.lr


def make_lr_schedule(config: OptimConfig, steps_per_epoch: int, total_steps: int, global_batch: int) -> LRSchedule:
    """The schedule of ``config`` for a run of ``total_steps`` steps of ``steps_per_epoch`` per epoch."""
    warmup = config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)
    peak = peak_lr(config, global_batch)
    return LRSchedule(
        peak=peak,
        total_steps=total_steps,
        kind=config.schedule,
        warmup_steps=warmup,
        milestones=tuple(m * steps_per_epoch for m in config.milestones),
        every=config.decay_every * steps_per_epoch,
        gamma=config.gamma,
        end_lr=peak * config.end_factor if config.end_factor > 0 else config.end_lr,
    )


def build_optimizer(
    config: OptimConfig, model: nn.Module, lr: float, activation: str = "relu"
) -> torch.optim.Optimizer:
    """The torch optimizer for ``config.name`` on ``model``'s parameters (``kfac`` steps with momentum SGD), starting
    at ``lr``; ``activation`` is the model's (plateau-skipping GD needs sigma)."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.name!r}; choose {', '.join(OPTIMIZER_NAMES)} (optim.name)")
    params = model.parameters()
    if config.name in ("sgd", "kfac") and config.momentum_form == "chainer":
        return ChainerMomentumSGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name in ("sgd", "kfac"):
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    betas = (config.betas[0], config.betas[1])
    if config.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=config.eps, weight_decay=config.weight_decay)
    if config.name in ("gd", "layerwise_gd", "skip_gd"):
        return _build_gd(config, model, lr, activation)
    raise NotImplementedError(f"jobs.optimizers lists {config.name!r}, which jobs.optim cannot build yet")


def _build_gd(config: OptimConfig, model: nn.Module, lr: float, activation: str) -> torch.optim.Optimizer:
    """Seed 004's gradient descents: plain, layer-wise (the layers with parameters, input to output), skipping."""
    if config.name == "gd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    layers = [list(m.parameters(recurse=False)) for m in model.modules() if list(m.parameters(recurse=False))]
    if config.name == "layerwise_gd":
        return LayerwiseGD(layers, lr=lr, order=config.layer_order)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 2:
        raise ValueError(f"plateau-skipping GD trains W2 sigma(W1 x); this model has {len(linears)} Linear layers")
    return PlateauSkippingGD(
        linears[0],
        linears[1],
        activation,
        lr=lr,
        strength=config.skip_strength,
        patience=config.skip_patience,
        tolerance=config.skip_tolerance,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_kfac(config: KFACConfig, model: nn.Module, lr: LRSchedule, comm: Communicator) -> KFACPreconditioner:
    """The K-FAC preconditioner of ``config`` on ``model`` (plain or DDP), KL-clipped with the schedule ``lr``.

    ``comm`` is the run's communicator (``context.comm``): K-FAC and the loop share it. With
    ``kfac.damping_adaptive`` the damping is a :class:`~distkfac.LevenbergMarquardt` controller starting at
    ``kfac.damping`` (the loop measures and adapts it).
    """
    damping = (
        LevenbergMarquardt(
            config.damping, config.damping_interval, minimum=config.damping_min, maximum=config.damping_max
        )
        if config.damping_adaptive
        else config.damping
    )
    return KFACPreconditioner(
        model,
        comm=comm,
        damping=damping,
        factor_decay=config.factor_decay,
        factor_update_steps=config.factor_update_steps,
        inv_update_steps=config.inv_update_steps,
        kl_clip=config.kl_clip or None,
        lr=lr,
        compute_method=config.compute_method,  # type: ignore[arg-type]
        damping_form=config.damping_form or None,  # type: ignore[arg-type]
        conv_factors=config.conv_factors,  # type: ignore[arg-type]
        g_scale=config.g_scale,  # type: ignore[arg-type]
        weight_sharing=config.weight_sharing,  # type: ignore[arg-type]
        fisher=config.fisher,  # type: ignore[arg-type]
        skip_layers=tuple(config.skip_layers),
        factor_dtype=DTYPES.get(config.factor_dtype),
        inv_dtype=DTYPES.get(config.inv_dtype),
        strategy=config.strategy,  # type: ignore[arg-type]
        grad_worker_fraction=config.grad_worker_fraction or None,
        comm_dtype=DTYPES.get(config.comm_dtype),
        bucket_cap_mb=config.bucket_cap_mb,
        overlap_comm=config.overlap_comm,
        split_factors_above=config.split_factors_above or None,
        async_decompositions=config.async_decompositions,
    )
