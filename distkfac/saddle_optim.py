"""Optimizers of the saddle-to-saddle study (seed 004, docs/saddle.md): gradient descent one layer at a time
(:class:`LayerwiseGD`), and gradient descent that ends plateaus at once (:class:`PlateauSkippingGD`).

Both step ``w <- w - lr g`` on what they move, with the ``lr`` of the param groups, which may change between steps
as torch.optim's does. Their counters are in ``state_dict()``, so a resumed run continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distkfac.saddle import sigma_slopes, skip_plateau, top_mode_progress

__all__ = ["LAYER_ORDERS", "SIGMAS", "LayerwiseGD", "PlateauSkippingGD"]

LAYER_ORDERS = ("forward", "backward")  # forward: from the input layer to the output layer; backward: the reverse
SIGMAS = ("none", "tanh", "relu")  # the activation between the two layers of PlateauSkippingGD


class _CountedGD(torch.optim.Optimizer):
    """Gradient descent with counters kept beside torch.optim's per-parameter state."""

    counters: tuple[str, ...] = ("steps",)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["counters"] = {name: getattr(self, name) for name in self.counters}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        for name, value in state.pop("counters", {}).items():
            setattr(self, name, value)
        super().load_state_dict(state)

    @torch.no_grad()
    def _descend(self, group: dict[str, Any]) -> None:
        for param in group["params"]:
            if param.grad is not None:
                param.add_(param.grad, alpha=-group["lr"])


class LayerwiseGD(_CountedGD):
    """Gradient descent on one layer per step. ``layers`` lists each layer's parameters from input to output; step
    ``t`` moves layer ``t mod L`` of ``order`` (``forward`` or ``backward``) and leaves the others as they are (their
    gradients are computed, and not used)."""

    def __init__(self, layers: Sequence[Sequence[nn.Parameter]], lr: float, order: str = "forward") -> None:
        if order not in LAYER_ORDERS:
            raise ValueError(f"layer-wise gradient descent: unknown order {order!r}; choose one of {LAYER_ORDERS}")
        if not layers:
            raise ValueError("layer-wise gradient descent needs at least one layer with parameters")
        super().__init__([{"params": list(params)} for params in layers], {"lr": lr})
        self.order: str = order
        self.steps: int = 0

    @property
    def next_layer(self) -> int:
        """The index (from the input) of the layer the next step moves."""
        index = self.steps % len(self.param_groups)
        return index if self.order == "forward" else len(self.param_groups) - 1 - index

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._descend(self.param_groups[self.next_layer])
        self.steps += 1


class PlateauSkippingGD(_CountedGD):
    """Gradient descent on ``W2 sigma(W1 x)`` (``first`` and ``last``: two Linear layers without biases) that ends
    each plateau with :func:`distkfac.saddle.skip_plateau`.

    A skip comes at the first step, and whenever the loss has fallen by less than ``tolerance`` of itself for
    ``patience`` steps in a row while the top singular value of Lemma 1's ``M_i`` is still above 1e-3 of its first
    (something is left to learn) and its mode has grown to less than ``strength`` of its fit (the skip would enlarge
    it: a slow drop is not a plateau). It replaces that step's gradient step. ``strength`` > 0 is our variant
    (docs); 0 is the literal step, every unit along its direction at its current norm.

    It reads the batch through hooks: ``first``'s input X and pre-activations, and ``G = dL/df`` at ``last``'s
    output. Call :meth:`observe` with the step's loss before :meth:`step`. The loss must be a mean over the batch's
    examples (G is scaled back to the sum's, whose size ``skip_plateau`` assumes), on one process.
    """

    counters = ("steps", "previous_loss", "flat_steps", "first_top", "skip_steps")

    def __init__(
        self,
        first: nn.Linear,
        last: nn.Linear,
        sigma: str,
        lr: float,
        strength: float = 0.05,
        patience: int = 5,
        tolerance: float = 1e-4,
        rank_threshold: float = 0.1,
    ) -> None:
        if sigma not in SIGMAS or first.bias is not None or last.bias is not None:
            raise ValueError(
                f"plateau skipping is for W2 sigma(W1 x): two Linear layers without biases, sigma in {SIGMAS} "
                f"(got sigma {sigma!r}, biases {first.bias is not None}, {last.bias is not None})"
            )
        if not (strength >= 0 and patience >= 1 and tolerance > 0):
            raise ValueError(
                f"plateau skipping: strength >= 0, patience >= 1 and tolerance > 0 (got {strength}, {patience}, "
                f"{tolerance})"
            )
        super().__init__([first.weight, last.weight], {"lr": lr})
        self.first: nn.Linear = first
        self.last: nn.Linear = last
        self.sigma: str = sigma
        self.strength: float = strength
        self.patience: int = patience
        self.tolerance: float = tolerance
        self.rank_threshold: float = rank_threshold
        self.steps: int = 0
        self.flat_steps: int = 0
        self.previous_loss: float | None = None
        self.first_top: float | None = None
        self.skip_steps: list[int] = []
        self._loss: float | None = None
        self._batch: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = [
            first.register_forward_hook(self._keep_input),
            last.register_forward_hook(self._watch_output),
        ]

    def _keep_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # a training pass, not an evaluation
            self._batch["x"], self._batch["z"] = inputs[0].detach(), output.detach()

    def _watch_output(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(self._keep_grad)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self._batch["g"] = grad.detach()

    def observe(self, loss: float) -> None:
        """The loss of the batch whose gradients the next :meth:`step` uses."""
        self._loss = loss

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _lemma_1(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """X (m0 x n), G as the sum's (m2 x n) and sigma'(W1 X) (m1 x n; None for linear sigma)."""
        if set(self._batch) != {"x", "z", "g"}:
            raise RuntimeError("PlateauSkippingGD.step: no batch seen; run forward and backward through the model")
        x, z, g = self._batch["x"], self._batch["z"], self._batch["g"]
        slopes = sigma_slopes(self.sigma, z)
        return x.flatten(1).T, g.T * len(g), slopes.T if slopes is not None else None

    def _progress(self) -> tuple[float, float]:
        x, g, slopes = self._lemma_1()
        return top_mode_progress(self.first.weight, self.last.weight, x, g, slopes)

    def _wants_skip(self) -> bool:
        loss, previous = self._loss, self.previous_loss
        if loss is not None and previous is not None:
            stalled = (previous - loss) < self.tolerance * abs(previous)
            self.flat_steps = self.flat_steps + 1 if stalled else 0
        self.previous_loss = loss
        if self.steps == 0:
            self.first_top = self._progress()[0]
            return True
        if self.flat_steps < self.patience:
            return False
        self.flat_steps = 0
        top, grown = self._progress()
        left_to_learn = self.first_top is not None and top > 1e-3 * self.first_top
        return left_to_learn and (not self.strength or grown < self.strength)  # the skip would enlarge the mode

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if self._wants_skip():
            x, g, slopes = self._lemma_1()
            strength = self.strength or None
            skip_plateau(self.first.weight, self.last.weight, x, g, slopes, strength, self.rank_threshold)
            self.skip_steps.append(self.steps)
        else:
            self._descend(self.param_groups[0])
        self.steps += 1
        self._loss = None
