"""Adaptive Levenberg-Marquardt damping (Martens & Grosse 2015, section 6.5).

Every ``interval`` (T1) steps the update ``delta`` that was just taken is judged by the reduction ratio

    rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0)),
    M(delta) - M(0) = grad^T delta + 1/2 delta^T (F + lambda I) delta,

with ``h`` the training loss on the step's batch, ``grad`` its raw (unpreconditioned) gradient and ``F`` the exact
Fisher (the Gauss-Newton matrix of the loss) on that batch. If ``rho > 3/4``, ``lambda <- omega1 lambda``; if
``rho < 1/4``, ``lambda <- lambda / omega1``; ``omega1 = (19/20)^T1``. lambda stays in ``[minimum, maximum]``.

:class:`LevenbergMarquardt` holds lambda and is itself a damping hyperparameter (a callable of the step), so
``KFACPreconditioner(model, damping=LevenbergMarquardt())`` reads it like any schedule. :func:`predicted_change`
computes ``M(delta) - M(0)`` with one forward-mode pass; :func:`measure_and_adapt` does a training loop's whole
measurement (the loss after the step, the model's prediction, their mean over the ranks, the rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.func import functional_call, jvp

if TYPE_CHECKING:
    from distkfac.preconditioner import KFACPreconditioner

__all__ = ["Adaptation", "LevenbergMarquardt", "Likelihood", "measure_and_adapt", "predicted_change"]

Likelihood = Literal["categorical", "gaussian"]
LIKELIHOODS: tuple[str, ...] = ("categorical", "gaussian")


def _finite_positive(name: str, value: object, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"distkfac: LevenbergMarquardt {name} must be a finite number > 0, got {value!r}; {fix}")
    return float(value)


class LevenbergMarquardt:
    """The damping lambda of Martens & Grosse's Levenberg-Marquardt rule; call it with a step to read it.

    ``initial``: lambda at the start. ``interval``: T1, steps between adaptations (:meth:`due`). ``omega``: the
    factor omega1 (default ``(19/20) ** interval``). ``minimum``/``maximum``: the clamp on lambda (defaults 1e-8 and
    1e4; the paper sets none). ``good``/``poor``: the thresholds on rho (3/4 and 1/4). A predicted change that is
    not a finite negative number, or an actual change that is not finite, counts as a poor ratio: lambda goes up.
    """

    def __init__(
        self,
        initial: float = 1e-3,
        interval: int = 5,
        *,
        omega: float | None = None,
        minimum: float = 1e-8,
        maximum: float = 1e4,
        good: float = 0.75,
        poor: float = 0.25,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"distkfac: LevenbergMarquardt interval must be an integer >= 1 (steps between adaptations, T1 of "
                f"Martens & Grosse; 5 is theirs), got {interval!r}"
            )
        self.initial = _finite_positive("initial", initial, "give the starting damping, e.g. 1e-3")
        self.minimum = _finite_positive("minimum", minimum, "give the smallest damping allowed, e.g. 1e-8")
        self.maximum = _finite_positive("maximum", maximum, "give the largest damping allowed, e.g. 1e4")
        if not self.minimum <= self.initial <= self.maximum:
            raise ValueError(
                f"distkfac: LevenbergMarquardt needs minimum <= initial <= maximum, got {self.minimum!r} <= "
                f"{self.initial!r} <= {self.maximum!r}; move initial inside the bounds or widen them"
            )
        self.interval = interval
        self.omega = (19 / 20) ** interval if omega is None else float(omega)
        if not 0.0 < self.omega < 1.0:
            raise ValueError(
                f"distkfac: LevenbergMarquardt omega must be in (0, 1) (lambda is multiplied by it after a good step "
                f"and divided by it after a poor one), got {omega!r}; leave it None for (19/20)^interval"
            )
        if not (isinstance(good, int | float) and isinstance(poor, int | float) and 0.0 < poor < good < 1.0):
            raise ValueError(
                f"distkfac: LevenbergMarquardt needs 0 < poor < good < 1, got poor={poor!r}, good={good!r}; "
                "Martens & Grosse use poor=0.25, good=0.75"
            )
        self.good, self.poor = float(good), float(poor)
        self.value = self.initial
        self.rho: float | None = None  # the last reduction ratio (NaN when it could not be formed)
        self.updates = self.increases = self.decreases = 0

    def __call__(self, step: int) -> float:
        """The current lambda, whatever the step: the preconditioner reads damping as a schedule of its step."""
        return self.value

    def due(self, step: int) -> bool:
        """Whether step ``step`` (counted from 0, as ``KFACPreconditioner.steps`` before it) is followed by an
        adaptation: the last step of every interval, so the first adaptation judges step ``interval - 1``."""
        return step % self.interval == self.interval - 1

    def update(self, actual_change: float, predicted_change: float) -> float:
        """Apply the rule to one measurement; returns rho (NaN when it cannot be formed, which counts as poor)."""
        usable = math.isfinite(actual_change) and math.isfinite(predicted_change) and predicted_change < 0
        rho = actual_change / predicted_change if usable else math.nan
        if usable and rho > self.good:
            self.value = max(self.minimum, self.value * self.omega)
            self.decreases += 1
        elif not usable or rho < self.poor:
            self.value = min(self.maximum, self.value / self.omega)
            self.increases += 1
        self.rho = rho
        self.updates += 1
        return rho

    def state_dict(self) -> dict[str, Any]:
        """lambda, the last rho and the counts, as Python floats and ints (exact: a resume is bit for bit)."""
        return {
            "value": self.value,
            "rho": self.rho,
            "updates": self.updates,
            "increases": self.increases,
            "decreases": self.decreases,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the settings (interval, omega, bounds) are the constructor's."""
        missing = {"value", "rho", "updates", "increases", "decreases"} - set(state)
        if missing:
            raise ValueError(f"distkfac: not a LevenbergMarquardt state_dict: missing {sorted(missing)}")
        self.value = _finite_positive("value (from the state_dict)", state["value"], "the checkpoint is damaged")
        self.rho = None if state["rho"] is None else float(state["rho"])
        self.updates, self.increases, self.decreases = (int(state[k]) for k in ("updates", "increases", "decreases"))

    def __repr__(self) -> str:
        return (
            f"LevenbergMarquardt(value={self.value!r}, interval={self.interval}, omega={self.omega!r}, "
            f"minimum={self.minimum!r}, maximum={self.maximum!r}, rho={self.rho!r}, updates={self.updates})"
        )


def _outputs(model: nn.Module, weights: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)`` with ``weights`` in place of those parameters and copies of every buffer (so batch-norm
    running statistics and counters stay as they are)."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return functional_call(model, {**buffers, **weights}, (inputs,))


def curvature(
    model: nn.Module,
    inputs: torch.Tensor,
    delta: Mapping[str, torch.Tensor],
    likelihood: Likelihood = "categorical",
    at: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``delta^T F delta`` for the exact Fisher ``F`` of the mean loss on ``inputs``, by one ``jvp``: float64, 0-dim.

    ``u = J delta`` (J: the outputs' Jacobian, one row of logits per example, extra leading dimensions flattened).
    ``categorical``: ``mean_i [sum_j p_ij u_ij^2 - (sum_j p_ij u_ij)^2]``, ``p = softmax``; ``gaussian``:
    ``mean_i |u_i|^2``. ``delta`` names parameters of ``model`` (others move by 0); ``at``: the parameters where F
    is taken (default the model's own).
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"distkfac: likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
    params = dict(model.named_parameters())
    unknown = set(delta) - set(params)
    if unknown:
        raise ValueError(f"distkfac: delta names no parameter of the model: {sorted(unknown)}")
    names = sorted(delta)
    base = at if at is not None else params
    primals = tuple(base[name].detach() for name in names)
    tangents = tuple(delta[name].detach().to(p.dtype) for name, p in zip(names, primals, strict=True))

    def forward(*weights: torch.Tensor) -> torch.Tensor:
        return _outputs(model, dict(zip(names, weights, strict=True)), inputs)

    with torch.no_grad():
        pushed = jvp(forward, primals, tangents)
    logits, u = pushed[0], pushed[1]
    logits = logits.reshape(-1, logits.shape[-1]).double()
    u = u.reshape(-1, u.shape[-1]).double()
    if likelihood == "gaussian":
        return u.pow(2).sum(1).mean()
    p = torch.softmax(logits, dim=1)
    return ((p * u * u).sum(1) - (p * u).sum(1).pow(2)).mean()


def predicted_change(
    model: nn.Module,
    inputs: torch.Tensor,
    delta: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    damping: float,
    likelihood: Likelihood = "categorical",
    at: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``M(delta) - M(0) = grad^T delta + 1/2 delta^T (F + damping I) delta``, a float64 0-dim tensor.

    ``F``: the exact Fisher on ``inputs`` (:func:`curvature`), taken at ``at`` (default: the model's parameters).
    ``grad`` and ``delta`` are keyed by parameter name (``model.named_parameters()``); a missing entry is zero.
    """
    device = next(iter(model.parameters())).device
    linear = torch.zeros((), dtype=torch.float64, device=device)
    squared = torch.zeros((), dtype=torch.float64, device=device)
    for name, step in delta.items():
        step = step.detach().double()
        squared = squared + step.pow(2).sum()
        if name in grad:
            linear = linear + (grad[name].detach().double() * step).sum()
    return linear + 0.5 * (curvature(model, inputs, delta, likelihood, at) + damping * squared)


@dataclass(frozen=True)
class Adaptation:
    """One measurement of :func:`measure_and_adapt`, the same on every rank: means over the global batch."""

    actual: float  # h(theta + delta) - h(theta)
    predicted: float  # M(delta) - M(0)
    rho: float  # actual / predicted (NaN when it could not be formed)
    damping: float  # lambda after the rule


def measure_and_adapt(
    precond: KFACPreconditioner,
    model: nn.Module,
    inputs: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_before: torch.Tensor | float,
    before: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    likelihood: Likelihood = "categorical",
) -> Adaptation:
    """After ``optimizer.step()``: judge the step just taken on its batch and apply the rule to ``precond.damping``.

    ``model``: the plain module (not a DDP wrapper); ``loss_fn(outputs)``: the batch's mean loss h; ``loss_before``:
    h(theta), from the training pass; ``before``: the parameters theta (by name) and ``grad`` the raw gradient,
    both kept before the step. Runs one forward pass at theta + delta and one ``jvp`` at theta, with no factors
    captured and no buffer changed. In a distributed run every rank calls it: the two changes, means over the local
    examples, are averaged over the ranks (one allreduce of two numbers), so all ranks keep the same lambda.
    """
    controller = precond.damping
    if not isinstance(controller, LevenbergMarquardt):
        raise TypeError(
            f"distkfac: measure_and_adapt needs KFACPreconditioner(damping=LevenbergMarquardt(...)), this one has "
            f"damping={controller!r}"
        )
    params = dict(model.named_parameters())
    delta = {name: params[name].detach() - theta for name, theta in before.items()}
    with precond.paused():
        with torch.no_grad():
            loss_after = loss_fn(_outputs(model, {}, inputs))
        predicted = predicted_change(model, inputs, delta, grad, controller.value, likelihood, at=before)
    before_value = loss_before.detach() if isinstance(loss_before, torch.Tensor) else loss_before
    actual = loss_after.detach().double() - torch.as_tensor(before_value, dtype=torch.float64, device=loss_after.device)
    pair = torch.stack([actual.to(predicted.device), predicted])
    if precond.comm.world_size > 1:
        precond.comm.allreduce_sum(pair, "damping adaptation").wait()
        pair /= precond.comm.world_size
    mean_actual, mean_predicted = pair.tolist()
    rho = controller.update(mean_actual, mean_predicted)
    return Adaptation(actual=mean_actual, predicted=mean_predicted, rho=rho, damping=controller.value)
