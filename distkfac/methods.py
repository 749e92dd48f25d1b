"""Per-method state: how factors are decomposed, and how a decomposition preconditions a gradient.

Every function works on a batch: ``factors`` is ``k x n x n`` (k equal-sized factors of different layers) and
``grads`` is ``k x g_dim x a_dim`` (k layers of one shape), so one call serves many layers.

- ``eigen``: ``F = Q diag(d) Q^T``; ``V = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T``, the exact solution
  of ``G V A + damping V = grad``. Damping enters at preconditioning time, so a damping schedule acts every step.
- ``inverse``: ``(F + sqrt(damping) I)^-1``; ``V = G_inv grad A_inv``. Damping is read when the inverses are made.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


def _chain(left: torch.Tensor, middle: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ middle @ right`` over a stack; a stack of one goes through plain mm, which is faster than bmm."""
    if middle.shape[0] == 1:
        return torch.mm(torch.mm(left[0], middle[0]), right[0]).unsqueeze(0)
    return torch.matmul(torch.matmul(left, middle), right)


class DecompositionError(RuntimeError):
    """A factor could not be decomposed, even in float64."""


class ComputeMethod(ABC):
    """Decomposes stacked factors into state tensors, and preconditions stacked gradients with them."""

    name: str

    @abstractmethod
    def decompose(self, factors: torch.Tensor, damping: float) -> list[torch.Tensor]:
        """State tensors for ``k x n x n`` factors, each with the batch dimension first."""

    @abstractmethod
    def precondition(
        self, grads: torch.Tensor, a_state: list[torch.Tensor], g_state: list[torch.Tensor], damping: float
    ) -> torch.Tensor:
        """Preconditioned gradients ``V`` for ``k x g_dim x a_dim`` gradients."""

    def state_shapes(self, n: int) -> list[tuple[int, ...]]:
        """Per-factor shapes of the state tensors of one ``n x n`` factor."""
        return [(n, n)]


class EigenMethod(ComputeMethod):
    name = "eigen"

    def decompose(self, factors: torch.Tensor, damping: float) -> list[torch.Tensor]:
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(factors)
        except torch.linalg.LinAlgError:
            # LAPACK's eigh can fail to converge in float32 on ill-conditioned factors; float64 rarely does.
            if factors.dtype == torch.float64:
                raise
            eigenvalues, eigenvectors = torch.linalg.eigh(factors.double())
            eigenvalues, eigenvectors = eigenvalues.to(factors.dtype), eigenvectors.to(factors.dtype)
        # Factors are positive semi-definite; rounding can leave tiny negative eigenvalues.
        return [eigenvectors, eigenvalues.clamp_(min=0.0)]

    def precondition(
        self, grads: torch.Tensor, a_state: list[torch.Tensor], g_state: list[torch.Tensor], damping: float
    ) -> torch.Tensor:
        q_a, d_a = a_state
        q_g, d_g = g_state
        rotated = _chain(q_g.transpose(1, 2), grads, q_a)
        rotated.div_((d_g.unsqueeze(2) * d_a.unsqueeze(1)).add_(damping))
        return _chain(q_g, rotated, q_a.transpose(1, 2))

    def state_shapes(self, n: int) -> list[tuple[int, ...]]:
        return [(n, n), (n,)]


class InverseMethod(ComputeMethod):
    name = "inverse"

    def decompose(self, factors: torch.Tensor, damping: float) -> list[torch.Tensor]:
        n = factors.shape[-1]
        shift = math.sqrt(damping)
        damped = factors + shift * torch.eye(n, dtype=factors.dtype, device=factors.device)
        # Cholesky is the fast, stable route for a symmetric positive definite matrix.
        chol, info = torch.linalg.cholesky_ex(damped)
        if bool(info.any()):
            damped = damped.double()
            chol, info = torch.linalg.cholesky_ex(damped)
            if bool(info.any()):
                raise torch.linalg.LinAlgError("factor plus sqrt(damping) I is not positive definite")
        # torch's batched cholesky_inverse is several times slower per matrix than its 2-D kernel on CPU.
        inverses = torch.stack([torch.cholesky_inverse(c) for c in chol])
        return [inverses.to(factors.dtype)]

    def precondition(
        self, grads: torch.Tensor, a_state: list[torch.Tensor], g_state: list[torch.Tensor], damping: float
    ) -> torch.Tensor:
        return _chain(g_state[0], grads, a_state[0])


METHODS: dict[str, type[ComputeMethod]] = {"eigen": EigenMethod, "inverse": InverseMethod}
