"""Seed 001's XOR task: its residual sigmoid network trained on the XOR truth table until the error falls below a
threshold, by g-EHF (``distkfac.hinf.HInfinity``), by steepest descent (``P`` held at ``P_0``) or by Adam
(docs/hinf.md).

Our choices where the paper is silent (stated in docs/hinf.md):

- targets 0 and 1 (the output is a sigmoid), patterns in the fixed order 00, 01, 10, 11, one update per pattern
  for g-EHF and steepest descent (the filter's time index is the pattern);
- the error is the mean squared error over the four patterns, ``mean (y - h)^2``, measured after every epoch with
  the weights then; a run converges at the first epoch where it is below ``threshold``;
- the networks and the updates are float64.

g-EHF runs one network at a time (its ``P`` is ``n x n``). Adam and steepest descent train many seeds at once: their
weights are stacked along a leading dimension and the model's own ``forward`` is mapped over it (``torch.func``);
each seed's gradients, Adam moments and steps stay its own.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from distkfac.hinf import HInfinity, steepest_update
from jobs.models import SigmoidResNet

__all__ = ["XOR_INPUTS", "XOR_TARGETS", "XorRun", "XorTask", "train_adam", "train_hinf", "train_steepest"]

XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
XOR_TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)


@dataclass(frozen=True)
class XorTask:
    """The network (L = ``depth``, ``width`` hidden units, sigmoid slope, init range) and the stopping rule."""

    depth: int
    width: int = 5
    slope: float = 2.5
    init: float = 0.05
    threshold: float = 1e-2
    max_epochs: int = 100

    def network(self, seed: int) -> SigmoidResNet:
        """Seed ``seed``'s initial network (``torch.manual_seed(seed)`` then the model's uniform init), float64."""
        torch.manual_seed(seed)
        return SigmoidResNet(2, self.depth, self.width, 1, self.slope, self.init).double()


@dataclass
class XorRun:
    """One seed's run: ``epochs`` to converge (None when it did not within the budget) and ``curve[e]``, the error
    after ``e`` epochs (``curve[0]``: at initialisation), up to convergence or the budget."""

    seed: int
    epochs: int | None
    curve: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epochs": self.epochs, "curve": [float(f"{v:.5g}") for v in self.curve],
                "seconds": round(self.seconds, 3)}  # fmt: skip


def _errors(outputs: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the four patterns; ``outputs``: ``(..., 4)``."""
    return ((XOR_TARGETS - outputs) ** 2).mean(-1)


def _pattern(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model(x), y


def train_hinf(task: XorTask, seed: int, gamma_f: float, eps0: float) -> XorRun:
    """g-EHF, one update per pattern, until the error is below the threshold or ``max_epochs``."""
    start = time.perf_counter()
    model = task.network(seed)
    optimizer = HInfinity(model.parameters(), gamma_f=gamma_f, eps0=eps0)
    with torch.no_grad():
        curve = [float(_errors(model(XOR_INPUTS).reshape(4)))]
    while curve[-1] >= task.threshold and len(curve) <= task.max_epochs:
        for x, y in zip(XOR_INPUTS, XOR_TARGETS, strict=True):
            optimizer.step(functools.partial(_pattern, model, x, y))
        with torch.no_grad():
            curve.append(float(_errors(model(XOR_INPUTS).reshape(4))))
    converged = curve[-1] < task.threshold
    return XorRun(seed, len(curve) - 1 if converged else None, curve, time.perf_counter() - start)


class _Stack:
    """Many seeds' networks as one stack of weights (``params``, each with a leading seed dimension) and the
    model's forward mapped over it."""

    def __init__(self, task: XorTask, seeds: Sequence[int]) -> None:
        models = [task.network(seed) for seed in seeds]
        self.params, _ = stack_module_state(models)
        base = models[0]
        self._forward = vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(seeds, patterns)`` outputs for ``x`` (``patterns x 2``)."""
        return self._forward(self.params, x).flatten(1)


def _batched(task: XorTask, seeds: Sequence[int], epoch: Callable[[], None], stack: _Stack) -> list[XorRun]:
    """Calls ``epoch()`` until every seed converged or the budget; the curves end at each seed's convergence."""
    start = time.perf_counter()
    curves: list[list[float]] = [[] for _ in seeds]
    done: list[int | None] = [None] * len(seeds)
    for count in range(task.max_epochs + 1):
        if count:
            epoch()
        with torch.no_grad():
            errors = _errors(stack.outputs(XOR_INPUTS)).tolist()
        for index, error in enumerate(errors):
            if done[index] is None:
                curves[index].append(error)
                done[index] = count if error < task.threshold else None
        if all(d is not None for d in done):
            break
    seconds = (time.perf_counter() - start) / len(seeds)
    return [XorRun(s, d, c, seconds) for s, d, c in zip(seeds, done, curves, strict=True)]


def train_adam(
    task: XorTask, seeds: Sequence[int], lr: float, betas: tuple[float, float], eps: float, per_pattern: bool
) -> list[XorRun]:
    """Adam on ``0.5 sum (y - h)^2``: one step per epoch on the four patterns together, or (``per_pattern``) one
    step per pattern in the fixed order."""
    stack = _Stack(task, seeds)
    optimizer = torch.optim.Adam(list(stack.params.values()), lr=lr, betas=betas, eps=eps)
    batches = [slice(i, i + 1) for i in range(4)] if per_pattern else [slice(0, 4)]

    def epoch() -> None:
        for rows in batches:
            optimizer.zero_grad()
            loss = 0.5 * ((XOR_TARGETS[rows] - stack.outputs(XOR_INPUTS[rows])) ** 2).sum()
            loss.backward()  # a sum over seeds: each seed's gradient is its own
            optimizer.step()

    return _batched(task, seeds, epoch, stack)


def train_steepest(task: XorTask, seeds: Sequence[int], eps0: float) -> list[XorRun]:
    """The paper's steepest-descent comparison: the g-EHF gain with ``P = P_0 = eps0 I``, one step per pattern."""
    stack = _Stack(task, seeds)
    params = list(stack.params.values())
    count = len(seeds)

    def epoch() -> None:
        for rows in (slice(i, i + 1) for i in range(4)):
            outputs = stack.outputs(XOR_INPUTS[rows])[:, 0]
            grads = torch.autograd.grad(outputs.sum(), params)  # row s: seed s's H (the seeds do not interact)
            jacobian = torch.cat([g.reshape(count, -1) for g in grads], dim=1).unsqueeze(1)
            w = torch.cat([p.detach().reshape(count, -1) for p in params], dim=1)
            steepest_update(w, jacobian, (XOR_TARGETS[rows] - outputs.detach()).unsqueeze(1), eps0)
            with torch.no_grad():
                offset = 0
                for p in params:
                    size = p[0].numel()
                    p.copy_(w[:, offset : offset + size].view_as(p))
                    offset += size

    return _batched(task, seeds, epoch, stack)
