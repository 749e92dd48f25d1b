"""Momentum SGD in Chainer's form, for reproducing results obtained with Chainer (``chainer.optimizers.MomentumSGD``).

torch's SGD keeps ``v <- mu v + g`` and steps ``w <- w - lr v``; Chainer keeps the step itself,
``v <- mu v - lr g`` and ``w <- w + v``. With a constant learning rate the two are the same trajectory. When the
rate changes (a step decay), torch's form applies the new rate to the whole velocity at once, Chainer's only to the
new gradients: after a decay by ``gamma`` Chainer's steps shrink gradually, torch's at once.

Weight decay is added to the gradient before the update (``g <- g + weight_decay w``), as Chainer's ``WeightDecay``
hook and torch's SGD do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["ChainerMomentumSGD"]


class ChainerMomentumSGD(torch.optim.Optimizer):
    """``v <- momentum v - lr (g + weight_decay w)``; ``w <- w + v``. ``lr`` may be changed in ``param_groups``."""

    def __init__(
        self, params: Iterable[Any], lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(
                f"distkfac: ChainerMomentumSGD needs lr >= 0, momentum in [0, 1) and weight_decay >= 0; got lr={lr}, "
                f"momentum={momentum}, weight_decay={weight_decay}"
            )
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
            if group["weight_decay"]:
                grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
            velocities = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                velocities.append(state["velocity"])
            torch._foreach_mul_(velocities, group["momentum"])
            torch._foreach_add_(velocities, grads, alpha=-group["lr"])
            torch._foreach_add_(params, velocities)
        return loss
