"""Per-method state: how factors are decomposed, and how a decomposition preconditions a gradient.

Every function works on a batch: ``factors`` is ``k x n x n`` (k equal-sized factors of different layers) and
``grads`` is ``k x g_dim x a_dim`` (k layers of one shape), so one call serves many layers.

Damping forms (``damping_form``; ``s = sqrt(damping)``):

- ``tikhonov``: ``V = (A (x) G + damping I)^-1 grad``, exact. Eigen only: it is not a product of two factor inverses.
- ``factored``: ``V = (G + s I)^-1 grad (A + s I)^-1``.
- ``factored-pi`` (Martens & Grosse 2015, section 6.3): ``V = (G + s/pi I)^-1 grad (A + pi s I)^-1`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``; ``pi = 1`` when either trace is 0 (a dead layer), where the ratio
  means nothing.

Methods:

- ``eigen``: ``F = Q diag(d) Q^T`` (eigenvalues clamped at 0). ``V = Q_G [(Q_G^T grad Q_A) / D] Q_A^T`` with
  ``D = d_G d_A^T + damping`` (tikhonov), ``(d_G + s)(d_A + s)^T`` (factored) or ``(d_G + s/pi)(d_A + pi s)^T``
  (factored-pi, the traces being the sums of the clamped eigenvalues). Damping, and so pi's use, enters at
  preconditioning time, so a damping schedule acts every step.
- ``inverse``: ``(F + shift I)^-1`` by Cholesky, with the shift of each factor given by the caller (``s``, or
  ``pi s`` for A and ``s / pi`` for G); ``V = G_inv grad A_inv``. Damping is read when the inverses are made.

Factor structures (``distkfac.factors.Structure``): a ``diagonal`` factor's decomposition is its clamped diagonal
(eigen) or the reciprocal of its shifted diagonal (inverse), applied by broadcasting. A ``blocks`` factor (unit-wise
``2 x 2`` blocks, with no Kronecker partner) is decomposed block by block, and takes the whole damping in every
form: ``V_u = (F_u + damping I)^-1 grad_u`` (there is no second factor to share it with).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

from distkfac.factors import FactorShape, Structure

DampingForm = Literal["tikhonov", "factored", "factored-pi"]
DAMPING_FORMS: tuple[str, ...] = ("tikhonov", "factored", "factored-pi")


def _chain(left: torch.Tensor, middle: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ middle @ right`` over a stack; a stack of one goes through plain mm, which is faster than bmm."""
    if middle.shape[0] == 1:
        return torch.mm(torch.mm(left[0], middle[0]), right[0]).unsqueeze(0)
    return torch.matmul(torch.matmul(left, middle), right)


DENSE_PAIR = (Structure.DENSE, Structure.DENSE)


def _apply_left(matrices: torch.Tensor, grads: torch.Tensor, structure: Structure, transpose: bool) -> torch.Tensor:
    """The G side: ``M grad`` (or ``M^T grad``) for dense and per-unit block matrices; other structures pass."""
    if structure is Structure.DENSE:
        return torch.matmul(matrices.transpose(1, 2) if transpose else matrices, grads)
    if structure is Structure.BLOCKS:  # matrices k x u x 2 x 2, grads k x u x 2
        blocks = matrices.transpose(2, 3) if transpose else matrices
        return torch.matmul(blocks, grads.unsqueeze(-1)).squeeze(-1)
    return grads


def _apply_right(grads: torch.Tensor, matrices: torch.Tensor, structure: Structure, transpose: bool) -> torch.Tensor:
    """The A side: ``grad M`` (or ``grad M^T``) for a dense matrix; other structures pass."""
    if structure is Structure.DENSE:
        return torch.matmul(grads, matrices.transpose(1, 2) if transpose else matrices)
    return grads


def _scale(grads: torch.Tensor, values: torch.Tensor, structure: Structure, side: int) -> torch.Tensor:
    """``diag(values) grad`` (side 1, G) or ``grad diag(values)`` (side 2, A) for a diagonal factor's vector."""
    if structure is not Structure.DIAGONAL:
        return grads
    return grads * values.unsqueeze(3 - side)


def pi_correction(mean_a: torch.Tensor, mean_g: torch.Tensor) -> torch.Tensor:
    """Martens & Grosse's ``pi = sqrt(mean_a / mean_g)`` from ``tr F / dim F`` of each factor (any shape).

    ``pi = 1`` where either is 0 (or below, from rounding): a dead layer's factor has no scale to balance.
    """
    usable = (mean_a > 0) & (mean_g > 0)
    ratio = mean_a / torch.where(usable, mean_g, torch.ones_like(mean_g))
    return torch.where(usable, ratio, torch.ones_like(ratio)).sqrt()


class DecompositionError(RuntimeError):
    """A factor could not be decomposed, even in float64."""


class ComputeMethod(ABC):
    """Decomposes stacked factors into state tensors, and preconditions stacked gradients with them."""

    name: str
    forms: tuple[str, ...]  # the damping forms the method can express
    default_form: str  # its historical form, used when the caller gives none
    shifts_at_decomposition: bool  # whether decompose() needs each factor's diagonal shift

    def __init__(self, damping_form: str | None = None) -> None:
        form = self.default_form if damping_form is None else damping_form
        if form not in self.forms:
            raise ValueError(f"distkfac: compute_method={self.name!r} supports damping_form {self.forms}, got {form!r}")
        self.damping_form = form

    @abstractmethod
    def decompose(
        self, factors: torch.Tensor, shifts: torch.Tensor | None, structure: Structure = Structure.DENSE
    ) -> list[torch.Tensor]:
        """State tensors for ``k`` stacked factors of one structure, each with the batch dimension first.

        ``shifts`` (length k) are the diagonal shifts to bake in, for methods with ``shifts_at_decomposition``.
        """

    @abstractmethod
    def precondition(
        self,
        grads: torch.Tensor,
        a_state: list[torch.Tensor],
        g_state: list[torch.Tensor],
        damping: float,
        structures: tuple[Structure, Structure] = DENSE_PAIR,
    ) -> torch.Tensor:
        """Preconditioned gradients ``V`` for ``k x g_dim x a_dim`` gradients; ``structures`` is (A's, G's)."""

    @abstractmethod
    def state_shapes(self, shape: FactorShape | int) -> list[tuple[int, ...]]:
        """Per-factor shapes of the state tensors of one factor (an int is a dense ``n x n`` factor)."""


def _as_shape(shape: FactorShape | int) -> FactorShape:
    return shape if isinstance(shape, FactorShape) else FactorShape.dense(shape)


class EigenMethod(ComputeMethod):
    name = "eigen"
    forms = DAMPING_FORMS
    default_form = "tikhonov"
    shifts_at_decomposition = False

    def decompose(
        self, factors: torch.Tensor, shifts: torch.Tensor | None, structure: Structure = Structure.DENSE
    ) -> list[torch.Tensor]:
        if structure is Structure.DIAGONAL:
            return [factors.clamp(min=0.0)]  # a diagonal matrix is its own eigendecomposition
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
        self,
        grads: torch.Tensor,
        a_state: list[torch.Tensor],
        g_state: list[torch.Tensor],
        damping: float,
        structures: tuple[Structure, Structure] = DENSE_PAIR,
    ) -> torch.Tensor:
        if structures == DENSE_PAIR:
            q_a, d_a = a_state
            q_g, d_g = g_state
            rotated = _chain(q_g.transpose(1, 2), grads, q_a)
            rotated.div_(self.damped_eigenvalues(d_a, d_g, damping))
            return _chain(q_g, rotated, q_a.transpose(1, 2))
        a_structure, g_structure = structures
        q_a, q_g = (a_state or [grads])[0], (g_state or [grads])[0]  # unused for the structures without a basis
        rotated = _apply_right(_apply_left(q_g, grads, g_structure, True), q_a, a_structure, False)
        if a_structure is Structure.NONE:  # unit-wise blocks: the whole damping on each block's eigenvalues
            rotated = rotated / (g_state[-1] + damping)
        else:
            rotated = rotated / self.damped_eigenvalues(a_state[-1], g_state[-1], damping)
        return _apply_right(_apply_left(q_g, rotated, g_structure, False), q_a, a_structure, True)

    def damped_eigenvalues(self, d_a: torch.Tensor, d_g: torch.Tensor, damping: float) -> torch.Tensor:
        """The damped eigenvalues of the preconditioned system, ``k x g_dim x a_dim``."""
        if self.damping_form == "tikhonov":
            return (d_g.unsqueeze(2) * d_a.unsqueeze(1)).add_(damping)
        shift = math.sqrt(damping)
        if self.damping_form == "factored":
            return (d_g + shift).unsqueeze(2) * (d_a + shift).unsqueeze(1)
        # The traces are the eigenvalue sums: pi needs nothing beyond the two decompositions held here.
        pi = pi_correction(d_a.mean(1), d_g.mean(1)).unsqueeze(1)
        return (d_g + shift / pi).unsqueeze(2) * (d_a + shift * pi).unsqueeze(1)

    def state_shapes(self, shape: FactorShape | int) -> list[tuple[int, ...]]:
        structure, n = _as_shape(shape)
        if structure is Structure.DENSE:
            return [(n, n), (n,)]
        if structure is Structure.BLOCKS:
            return [(n, 2, 2), (n, 2)]
        return [(n,)] if structure is Structure.DIAGONAL else []


class InverseMethod(ComputeMethod):
    name = "inverse"
    # tikhonov damps the Kronecker product, and (A (x) G + damping I)^-1 is no product of two factor inverses.
    forms = ("factored", "factored-pi")
    default_form = "factored"
    shifts_at_decomposition = True

    def decompose(
        self, factors: torch.Tensor, shifts: torch.Tensor | None, structure: Structure = Structure.DENSE
    ) -> list[torch.Tensor]:
        assert shifts is not None, "the inverse method bakes each factor's shift into its inverse"
        if structure is Structure.DIAGONAL:
            return [(factors + shifts.to(factors.dtype).view(-1, 1)).reciprocal_()]
        if structure is Structure.BLOCKS:
            return [self._block_inverses(factors, shifts.to(factors.dtype).view(-1, 1, 1, 1))]
        n = factors.shape[-1]
        eye = torch.eye(n, dtype=factors.dtype, device=factors.device)
        damped = factors + shifts.to(factors.dtype).view(-1, 1, 1) * eye
        # Cholesky is the fast, stable route for a symmetric positive definite matrix.
        chol, info = torch.linalg.cholesky_ex(damped)
        if bool(info.any()):
            damped = damped.double()
            chol, info = torch.linalg.cholesky_ex(damped)
            if bool(info.any()):
                raise torch.linalg.LinAlgError("factor plus its damping shift is not positive definite")
        # torch's batched cholesky_inverse is several times slower per matrix than its 2-D kernel on CPU.
        inverses = torch.stack([torch.cholesky_inverse(c) for c in chol])
        return [inverses.to(factors.dtype)]

    @staticmethod
    def _block_inverses(blocks: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """``(B + shift I)^-1`` of symmetric ``2 x 2`` blocks in closed form: ``[[d, -b], [-b, a]] / (ad - b^2)``."""
        a = blocks[..., 0, 0] + shifts[..., 0, 0]
        d = blocks[..., 1, 1] + shifts[..., 0, 0]
        b = blocks[..., 0, 1]
        det = a * d - b * b
        if not bool((det > 0).all()):
            raise torch.linalg.LinAlgError("a unit-wise block plus its damping is not positive definite")
        return torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]

    def precondition(
        self,
        grads: torch.Tensor,
        a_state: list[torch.Tensor],
        g_state: list[torch.Tensor],
        damping: float,
        structures: tuple[Structure, Structure] = DENSE_PAIR,
    ) -> torch.Tensor:
        if structures == DENSE_PAIR:
            return _chain(g_state[0], grads, a_state[0])
        a_structure, g_structure = structures
        out = grads
        if g_structure is not Structure.NONE:
            out = _scale(_apply_left(g_state[0], out, g_structure, False), g_state[0], g_structure, 1)
        if a_structure is not Structure.NONE:
            out = _scale(_apply_right(out, a_state[0], a_structure, False), a_state[0], a_structure, 2)
        return out

    def state_shapes(self, shape: FactorShape | int) -> list[tuple[int, ...]]:
        structure, n = _as_shape(shape)
        return [] if structure is Structure.NONE else [FactorShape(structure, n).tensor_shape]


METHODS: dict[str, type[ComputeMethod]] = {"eigen": EigenMethod, "inverse": InverseMethod}
