"""Saddle-to-saddle dynamics of two-layer networks ``f(X) = W2 sigma(W1 X)`` (seed 004), as tensor maths: the
unit-wise update of its Lemma 1, the units' alignment, the plateau-skipping step, ranks, and plateau/drop phases
of a loss curve (docs/saddle.md).

Unit ``i`` is ``w_i = (row i of W1, column i of W2)``. With ``G = dL/df`` at every example (``m2 x n``) and
``D_i = diag(sigma'(w_{i,1} . x_j))``, gradient descent moves each unit by the symmetric matrix of Lemma 1::

    w_i <- [[I, -eta M_i], [-eta M_i^T, I]] w_i,     M_i = X D_i G^T   (m0 x m2)

exactly when ``sigma(z) = sigma'(z) z`` (linear, ReLU), and to first order near the origin otherwise (tanh). The
matrix's eigenvalues are ``1 +- eta s_k`` over the singular values ``s_k`` of ``M_i``; the top eigenvector is
``(u_1, -v_1) / sqrt(2)`` for the top singular pair. During a plateau every unit turns towards it (Theorem 1), which
takes ``O(log 1/|w(0)|)`` steps; :func:`skip_plateau` puts each unit there at once, at its current norm.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Phase",
    "alignment",
    "detect_phases",
    "effective_rank",
    "sigma_slopes",
    "skip_plateau",
    "top_mode_progress",
    "top_unit_directions",
    "unit_matrices",
    "units",
]


def units(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The units as rows: ``(m1, m0 + m2)``, row ``i`` = (row i of ``w1``, column i of ``w2``)."""
    return torch.cat([w1, w2.T], dim=1)


def unit_matrices(x: torch.Tensor, grad: torch.Tensor, slopes: torch.Tensor | None = None) -> torch.Tensor:
    """``M_i = X D_i G^T`` for every unit: ``(m1, m0, m2)``; ``x``: ``m0 x n``, ``grad``: ``G``, ``m2 x n``;
    ``slopes``: ``sigma'(W1 X)``, ``m1 x n`` (None: linear sigma, one matrix shared by every unit, ``(1, m0, m2)``)."""
    if slopes is None:
        return (x @ grad.T).unsqueeze(0)
    return torch.einsum("aj,ij,bj->iab", x, slopes, grad)


def top_unit_directions(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix ``M_i``: the top eigenvector of Lemma 1's update matrix, ``(u_1, -v_1) / sqrt(2)`` (rows,
    ``(k, m0 + m2)``), and ``s_1`` (the eigenvalue is ``1 + eta s_1``)."""
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    direction = torch.cat([u[..., :, 0], -vh[..., 0, :]], dim=-1) / 2**0.5
    return direction, s[..., 0]


def alignment(unit_rows: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``|(I - P_1) w_i| / |P_1 w_i|`` per unit, ``P_1`` the projection onto ``directions`` (one unit vector per
    unit, or one row for all); ``inf`` for a unit orthogonal to its direction."""
    directions = directions / directions.norm(dim=-1, keepdim=True)
    along = (unit_rows * directions).sum(-1)
    across = (unit_rows - along.unsqueeze(-1) * directions).norm(dim=-1)
    return across / along.abs()


def skip_plateau(
    w1: torch.Tensor,
    w2: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    slopes: torch.Tensor | None = None,
    strength: float | None = None,
    rank_threshold: float = 0.1,
) -> None:
    """The plateau-skipping step, in place, from the current weights' Lemma 1 matrices.

    ``strength=None``: every unit is set along its top direction at its current norm, keeping its sign along it.
    ``strength=alpha`` (our variant, docs/saddle.md): the part of every unit inside the subspace already learned (the
    singular vectors of ``W2 W1`` above ``rank_threshold`` of the largest; none while the largest is below 1e-3 of
    the fit below) is kept; the rest is set along the top direction, its norms scaled by one common factor so that
    the new rank-1 term of ``W2 W1`` is ``alpha`` times the size that fits the top mode, ``s_1 / (u_1^T X X^T u_1)``.
    For nonlinear sigma each unit takes its own direction, and the size is that of the unit with the largest
    ``s_1``, with ``X D_i X^T`` (exact only to first order)."""
    rows = units(w1, w2)
    directions, top = top_unit_directions(unit_matrices(x, grad, slopes))
    if strength is None:
        _set_along(w1, w2, rows, directions.expand_as(rows), rows.norm(dim=-1))
        return
    if not strength > 0:
        raise ValueError(f"skip_plateau: strength must be positive (e.g. 0.05), got {strength}")
    _, _, _, fit = _top_mode(x, grad, slopes, directions, top)
    left, singular, right_h = torch.linalg.svd(w2 @ w1)
    rank = effective_rank(singular, rank_threshold) if float(singular[0]) > 1e-3 * fit else 0  # 0: still noise
    learned1 = w1 @ (right_h[:rank].T @ right_h[:rank])
    learned2 = (left[:, :rank] @ left[:, :rank].T) @ w2
    rest = units(w1 - learned1, w2 - learned2)
    norms = rest.norm(dim=-1)
    scale = (2 * strength * fit / float((norms**2).sum())) ** 0.5  # sum of (scale |q_i|)^2 / 2 = strength * fit
    _set_along(w1, w2, rest, directions.expand_as(rest), scale * norms)
    w1 += learned1
    w2 += learned2


def _top_mode(
    x: torch.Tensor, grad: torch.Tensor, slopes: torch.Tensor | None, directions: torch.Tensor, top: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor, float]:
    """The unit whose ``s_1`` is largest, its singular pair ``u_1``, ``v_1`` and the size of ``W2 W1`` along
    ``-v_1 u_1^T`` that fits the residual there, ``s_1 / (u_1^T X D_i X^T u_1)`` (exact for linear sigma)."""
    best = int(top.argmax())
    m0 = x.shape[0]
    u1, v1 = directions[best, :m0] * 2**0.5, -directions[best, m0:] * 2**0.5
    weighted = x if slopes is None else x * slopes[best]
    return best, u1, v1, float(top[best]) / float(u1 @ weighted @ x.T @ u1)


def top_mode_progress(
    w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, slopes: torch.Tensor | None = None
) -> tuple[float, float]:
    """``s_1`` of the top Lemma 1 matrix, and how far its mode has grown: the size of ``W2 W1`` along ``-v_1 u_1^T``
    over the size that fits the residual there (``W2 W1`` linearises a nonlinear network). Below a skip's
    ``strength`` the skip makes the mode larger; above it gradient descent is already in the mode's drop."""
    directions, top = top_unit_directions(unit_matrices(x, grad, slopes))
    _, u1, v1, fit = _top_mode(x, grad, slopes, directions, top)
    return float(top.max()), float(-(v1 @ w2 @ w1 @ u1)) / fit


def _set_along(
    w1: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor, directions: torch.Tensor, norms: torch.Tensor
) -> None:
    sign = torch.where((rows * directions).sum(-1) < 0, -1.0, 1.0).to(rows.dtype)
    new = (sign * norms).unsqueeze(-1) * directions
    m0 = w1.shape[1]
    w1.copy_(new[:, :m0])
    w2.copy_(new[:, m0:].T)


def effective_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The number of singular values above ``threshold`` times the largest."""
    if len(singular_values) == 0 or float(singular_values.max()) == 0.0:
        return 0
    return int((singular_values > threshold * singular_values.max()).sum())


@dataclass(frozen=True)
class Phase:
    """Steps ``start`` to ``stop`` (exclusive) of a loss curve: a ``"plateau"`` or a ``"drop"``."""

    kind: str
    start: int
    stop: int


def detect_phases(
    losses: Sequence[float], tolerance: float, min_length: int = 1, steps: Sequence[int] | None = None
) -> list[Phase]:
    """Plateaus and drops of a loss curve read at ``steps`` (default 0, 1, 2, ...): the interval from ``steps[t]``
    to ``steps[t + 1]`` is a drop when the loss falls by at least ``tolerance`` of itself per step on average, else
    a plateau; the last point takes its interval's kind for one step. Phases shorter than ``min_length`` steps join
    the phase before them (full-batch curves are smooth; this absorbs wiggles)."""
    at = list(range(len(losses))) if steps is None else [int(s) for s in steps]
    if not losses or not tolerance > 0 or len(at) != len(losses) or any(b <= a for a, b in itertools.pairwise(at)):
        raise ValueError(
            f"detect_phases: give a non-empty curve, a positive tolerance (got {tolerance}) and, if any, one "
            "increasing step per loss"
        )
    kinds = [_interval_kind(losses[t], losses[t + 1], at[t + 1] - at[t], tolerance) for t in range(len(at) - 1)]
    kinds.append(kinds[-1] if kinds else "plateau")
    bounds = list(zip(at, [*at[1:], at[-1] + 1], strict=True))
    phases: list[Phase] = []
    for (start, stop), kind in zip(bounds, kinds, strict=True):
        if phases and phases[-1].kind == kind:
            phases[-1] = Phase(kind, phases[-1].start, stop)
        else:
            phases.append(Phase(kind, start, stop))
    merged: list[Phase] = []
    for phase in phases:
        if merged and (phase.stop - phase.start < min_length or merged[-1].kind == phase.kind):
            merged[-1] = Phase(merged[-1].kind, merged[-1].start, phase.stop)
        else:
            merged.append(phase)
    return merged


def _interval_kind(now: float, later: float, steps: int, tolerance: float) -> str:
    fall = (now - later) / abs(now) if now else 0.0
    per_step = 1.0 - (1.0 - fall) ** (1.0 / steps) if fall < 1 else 1.0
    return "drop" if per_step >= tolerance else "plateau"


def sigma_slopes(sigma: str, pre_activations: torch.Tensor) -> torch.Tensor | None:
    """``sigma'`` at ``pre_activations`` for ``tanh`` and ``relu``; None for ``none`` (linear: ``D_i = I``)."""
    if sigma == "tanh":
        return 1 - torch.tanh(pre_activations) ** 2
    if sigma == "relu":
        return (pre_activations > 0).to(pre_activations.dtype)
    if sigma == "none":
        return None
    raise ValueError(f"unknown activation {sigma!r}; choose none, tanh or relu")
