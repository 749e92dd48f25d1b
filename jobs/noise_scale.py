"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A.1).

G is the full-batch gradient and Sigma the per-example gradient covariance. A mini-batch gradient of size B has
E|G_B|^2 = |G|^2 + tr(Sigma) / B, so the squared norms measured at two batch sizes (e.g. the per-worker gradient before
the all-reduce and the global one after it) give unbiased estimates of |G|^2 and tr(Sigma). Their ratio is the batch
size at which the gradient's signal and noise are about equal; it is a prediction of the critical batch size.

:func:`measure_noise` makes one such pair of measurements during training (``run.noise_every`` in
:mod:`jobs.loop`): each rank's local batch is split into two halves, whose gradients give the small batch's squared
norm, and their average over the halves and the ranks gives the global batch's. It lives here rather than in
:mod:`study` because the training loop uses it and must not depend on the study package built on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jobs.parallel import Context

__all__ = ["NoiseScaleEstimator", "b_simple_from_norms", "measure_noise", "noise_estimates", "squared_grad_norm"]


def squared_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of the ``.grad`` of every parameter that has one, as a 0-d float32 tensor.

    Stays on the device (no ``.item()``), so calling it every step adds no host synchronisation.
    """
    total: torch.Tensor | None = None
    for p in parameters:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().square().sum()
        total = sq if total is None else total + sq.to(total.device)
    return torch.zeros((), dtype=torch.float32) if total is None else total


def _check_batches(b_small: int, b_big: int) -> None:
    if not 0 < b_small < b_big:
        raise ValueError(
            f"the noise scale needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}: pass the smaller "
            "batch's norm first (e.g. the per-worker gradient before the all-reduce, then the global one)"
        )


def noise_estimates(small_sq_norm: float, b_small: int, big_sq_norm: float, b_big: int) -> tuple[float, float]:
    """Unbiased single-pair estimates ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes."""
    _check_batches(b_small, b_big)
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def b_simple_from_norms(small_sq_norm: float, b_small: int, big_sq_norm: float, b_big: int) -> float:
    """B_simple from a single pair of measurements; NaN when the |G|^2 estimate is not positive.

    One pair is very noisy (McCandlish et al. average many); prefer :class:`NoiseScaleEstimator` during training.
    """
    grad_sq, trace = noise_estimates(small_sq_norm, b_small, big_sq_norm, b_big)
    return trace / grad_sq if grad_sq > 0 else float("nan")


class NoiseScaleEstimator:
    """Exponential moving averages of the |G|^2 and tr(Sigma) estimates, kept separately.

    Averaging numerator and denominator separately (rather than the noisy ratio) is what the paper does: the ratio of
    two unbiased estimates is much less biased than the mean of per-step ratios, whose denominator crosses zero.
    """

    def __init__(self, ema: float = 0.95) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}: e.g. 0.95 averages over about the last 20 updates")
        self.ema = ema
        self._count = 0
        self._grad_sq = 0.0
        self._trace = 0.0

    def update(self, small_sq_norm: float, b_small: int, big_sq_norm: float, b_big: int) -> None:
        """Add one pair of measurements (squared gradient norms at batch sizes ``b_small < b_big``)."""
        grad_sq, trace = noise_estimates(float(small_sq_norm), b_small, float(big_sq_norm), b_big)
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return  # a diverged step would poison the averages forever
        self._count += 1
        self._grad_sq = self.ema * self._grad_sq + (1.0 - self.ema) * grad_sq
        self._trace = self.ema * self._trace + (1.0 - self.ema) * trace

    def _corrected(self, value: float) -> float | None:
        if self._count == 0:
            return None
        # Bias correction (as in Adam): the averages start at 0, so early on they under-estimate by ema**count.
        return value / (1.0 - self.ema**self._count)

    @property
    def updates(self) -> int:
        """How many pairs were averaged."""
        return self._count

    @property
    def trace_sigma(self) -> float | None:
        """Averaged tr(Sigma) estimate (None before the first update; may be negative early on)."""
        return self._corrected(self._trace)

    @property
    def grad_sq_norm(self) -> float | None:
        """Averaged |G|^2 estimate (None before the first update; may be negative early on)."""
        return self._corrected(self._grad_sq)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2: None before the first update, NaN while the |G|^2 estimate is not positive."""
        grad_sq, trace = self.grad_sq_norm, self.trace_sigma
        if grad_sq is None or trace is None:
            return None
        if grad_sq <= 0:
            # |G|^2 is the difference of two noisy norms and can come out <= 0 while the true gradient is small next
            # to its noise (late in training, or with few updates averaged): the ratio would be a meaningless
            # negative number or inf, so report "unknown" instead.
            return float("nan")
        return trace / grad_sq

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state, for checkpoints."""
        return {"ema": self.ema, "count": self._count, "grad_sq_avg": self._grad_sq, "trace_avg": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.ema = float(state["ema"])
        self._count = int(state["count"])
        self._grad_sq = float(state["grad_sq_avg"])
        self._trace = float(state["trace_avg"])


def measure_noise(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: Context, pass_size: int | None = None
) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    """One pair ``(small_sq_norm, b_small, big_sq_norm, b_big)`` for :meth:`NoiseScaleEstimator.update`.

    ``model`` must be the unwrapped module (not DistributedDataParallel, whose backward would average the gradients
    over the ranks) and ``x, y`` this rank's local batch (at least 2 examples; with an odd count the last is left
    out). Each half's gradient of the mean cross-entropy comes from ``torch.autograd.grad``, so ``.grad`` is not
    touched. ``small_sq_norm`` is the mean over halves and ranks of their squared norms (batch ``local // 2``);
    ``big_sq_norm`` the squared norm of their mean over halves and ranks (batch ``2 * (local // 2) * ranks``). The
    ranks exchange one flat buffer in one all-reduce, a collective every rank must join. The norms stay on the
    device: reading them (``torch.stack([small, big]).tolist()``) is one host synchronisation.

    ``pass_size`` (the training step's, :func:`jobs.passes.pass_examples`) computes each half's gradient in passes
    of at most that many examples, each pass's mean loss weighted by its share of the half: the same gradient up to
    float32 rounding, and on the CPU faster for the same reason as the step's passes. Default: one pass per half.

    Batch-norm running statistics (every buffer) are restored afterwards. K-FAC's forward hooks would capture
    factors from these passes: call it inside :meth:`distkfac.KFACPreconditioner.paused`.
    """
    half = x.shape[0] // 2
    if half < 1:
        raise ValueError(
            f"measure_noise needs at least 2 examples per rank to split into two halves, got {x.shape[0]}: "
            "raise the batch size or measure less often"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    try:
        halves = [
            _mean_gradient(model, params, x[part], y[part], pass_size or half)
            for part in (slice(0, half), slice(half, 2 * half))
        ]
    finally:
        with torch.no_grad():  # the training step that follows must see the running statistics it would have seen
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
    first, second = halves
    small = (first.square().sum() + second.square().sum()) / 2
    # One collective: the mean gradient over both halves, then the small-batch norm in the last slot.
    flat = torch.cat([(first + second) / 2, small.reshape(1)])
    context.comm.allreduce_sum(flat, "noise scale").wait()
    flat.div_(context.world_size)
    return flat[-1], half, flat[:-1].square().sum(), 2 * half * context.world_size


def _mean_gradient(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, pass_size: int
) -> torch.Tensor:
    """The flat float32 gradient of the mean cross-entropy over ``(x, y)``, in passes of at most ``pass_size``
    examples (one pass: the mean loss itself, weighted by exactly 1)."""
    total: torch.Tensor | None = None
    for xs, ys in zip(x.split(pass_size), y.split(pass_size), strict=True):
        loss = F.cross_entropy(model(xs), ys) * (len(ys) / len(y))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [(p.new_zeros(p.shape) if g is None else g).reshape(-1).float() for p, g in zip(params, grads, strict=True)]
        )
        total = flat if total is None else total.add_(flat)
    assert total is not None  # at least one example: measure_noise checked
    return total
