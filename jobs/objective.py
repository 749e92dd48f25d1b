"""What a run minimises: the cross-entropy of the labels, or the squared error ``0.5 |f(x) - y|^2`` against one-hot
labels or a regression's targets (seed 004); a mean over the batch's examples (``run.loss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["batch_loss", "hits"]


def batch_loss(outputs: torch.Tensor, y: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    """The loss ``kind`` (``cross_entropy`` | ``squared``) of ``outputs`` against labels or targets ``y``, its
    ``mean`` or ``sum`` over the examples."""
    if kind == "squared":
        target = y if y.is_floating_point() else F.one_hot(y, outputs.shape[1]).to(outputs.dtype)
        per_example = 0.5 * ((outputs - target) ** 2).sum(1)
        return per_example.mean() if reduction == "mean" else per_example.sum()
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, y, reduction=reduction)
    raise ValueError(f"unknown loss {kind!r}; choose cross_entropy or squared (run.loss)")


def hits(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many examples' top output is their label (0 for a regression's targets, which have no accuracy)."""
    if y.is_floating_point():
        return torch.zeros((), dtype=torch.float64, device=outputs.device)
    return (outputs.argmax(1) == y).sum().double()
