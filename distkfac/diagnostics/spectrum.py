"""The top eigenpairs of the empirical Fisher ``F = (1/N) sum_i g_i g_i^T = (1/N) J^T J``.

``J`` (``N x d``) has the per-example gradients ``g_i`` as rows; in a data-parallel run each rank holds its shard of
the rows and ``N`` is the global count. Three routes, all giving the same eigenpairs:

- ``"eigh"``: ``F`` itself, accumulated chunk by chunk as ``sum J_c^T J_c`` (d x d), summed over the ranks, then
  ``torch.linalg.eigh``. Exact; memory ``d^2``.
- ``"gram"``: when ``N < d``, the Gram matrix ``G = J J^T / N`` (N x N) has the same non-zero eigenvalues. Its
  eigenvector ``u`` maps back to ``v = J^T u / sqrt(N lambda)`` (normalised again against rounding). Every rank's
  rows are gathered (``N d`` values), so it is for small ``N``; it needs ``k <= N``.
- ``"lanczos"``: at most ``steps`` Lanczos steps with full reorthogonalisation on ``v -> J^T (J v) / N``, computed
  chunk by chunk (or from Linear factors) and summed over the ranks, never forming ``F``; a fixed-seed start vector,
  so every rank runs the same iteration and ends with the same eigenpairs. It stops early once the top ``k`` Ritz
  pairs have converged: the residual ``||F y - theta y|| = beta_m |s_m|`` (free from the tridiagonal) of each is
  below ``tol`` times the largest Ritz value (default ``eps^(2/3)`` of the dtype: about 2e-5 in float32, 4e-11 in
  float64; the eigenvalue's error is of order the residual squared over the gap). Memory ``d * steps``. With a
  callable ``Rows`` each step is one pass over the gradients.

``method="auto"`` picks ``"eigh"`` when ``d <= DENSE_MAX_WIDTH`` (``FACTORED_DENSE_MAX_WIDTH`` for Linear factors,
whose Lanczos products cost ``4 N d`` without forming a row, against ``N d^2`` to accumulate ``F``; above it,
factors always take ``"lanczos"``); else ``"gram"`` when ``k <= N < d`` and
``N d <= GRAM_MAX_ENTRIES``; else ``"lanczos"``. With a callable ``Rows``, every method first counts the rows (one
pass). Eigenvalues come in descending order; each eigenvector's sign is fixed so that its largest-magnitude entry
is positive, so that the routes (and the ranks) agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distkfac.comm import Communicator, resolve_communicator
from distkfac.diagnostics.factored import FactoredRows
from distkfac.diagnostics.gather import Shard, allreduce_sum, gather_rows, shard_of
from distkfac.diagnostics.rows import Rows, chunks_of, count_and_width, matrix_of

METHODS = ("auto", "eigh", "gram", "lanczos")
DENSE_MAX_WIDTH = 2048
FACTORED_DENSE_MAX_WIDTH = 128
GRAM_MAX_ENTRIES = 2**25


@dataclass(frozen=True)
class Eigenpairs:
    """``values[j]`` (descending) and ``vectors[:, j]`` (unit norm) of ``F``, from ``count`` examples by ``method``."""

    values: torch.Tensor
    vectors: torch.Tensor
    count: int
    method: str


def choose_method(count: int, width: int, k: int, factored: bool = False) -> str:
    """The route ``method="auto"`` takes for ``count`` examples (global) of ``width`` columns and ``k`` pairs
    (``factored``: the rows are Linear layers' factors)."""
    if width <= (FACTORED_DENSE_MAX_WIDTH if factored else DENSE_MAX_WIDTH):
        return "eigh"
    if factored:
        return "lanczos"  # the Gram route would form and gather every row
    if k <= count < width and count * width <= GRAM_MAX_ENTRIES:
        return "gram"
    return "lanczos"


def top_eigenpairs(
    rows: Rows,
    k: int = 1,
    method: str = "auto",
    comm: Communicator | None = None,
    steps: int | None = None,
    seed: int = 0,
    tol: float | None = None,
) -> Eigenpairs:
    """The top ``k`` eigenpairs of ``F = (1/N) J^T J`` over every rank's rows (collective when distributed).

    ``steps``: at most this many Lanczos steps (default ``max(2 k + 40, 60)``, never more than ``d``); ``seed``: its
    start vector's; ``tol``: its convergence threshold (relative residual; default ``eps^(2/3)``, 0 = every step).
    ``comm``: as for the preconditioner (None: the initialised torch.distributed or Horovod one, else a single
    process); each rank passes its own shard of the examples.
    """
    if k < 1:
        raise ValueError(f"distkfac.diagnostics: k (the number of eigenpairs) must be at least 1, got {k}")
    if method not in METHODS:
        raise ValueError(f"distkfac.diagnostics: method must be one of {METHODS}, got {method!r}")
    comm = resolve_communicator(comm)
    count, width, dtype, device = count_and_width(rows)
    shard = shard_of(count, comm, width)
    if k > shard.width:
        raise ValueError(f"distkfac.diagnostics: k = {k} eigenpairs asked of a {shard.width}-dimensional Fisher")
    factored = isinstance(rows, FactoredRows)
    chosen = choose_method(shard.total, shard.width, k, factored) if method == "auto" else method
    if chosen == "eigh":
        values, vectors = _dense(rows, shard, dtype, device, comm, k)
    elif chosen == "gram":
        if k > shard.total:
            raise ValueError(f"distkfac.diagnostics: the Gram route gives at most N = {shard.total} pairs, not {k}")
        values, vectors = _gram(rows, shard, dtype, device, comm, k)
    else:
        values, vectors = _lanczos_top(rows, shard, dtype, device, comm, k, steps, seed, tol)
    return Eigenpairs(values=values, vectors=_fix_signs(vectors), count=shard.total, method=chosen)


def fisher_product(rows: Rows, vector: torch.Tensor, total: int, comm: Communicator) -> torch.Tensor:
    """``F v = J^T (J v) / N`` over every rank's rows, chunk by chunk, without forming ``F`` (collective)."""
    if isinstance(rows, FactoredRows):
        product = rows.rmatvec(rows.matvec(vector))
    else:
        product = torch.zeros_like(vector)
        for chunk in chunks_of(rows):
            product += chunk.T @ (chunk @ vector)
    return allreduce_sum(product, comm) / total


def _dense(
    rows: Rows, shard: Shard, dtype: torch.dtype, device: torch.device, comm: Communicator, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    fisher = torch.zeros(shard.width, shard.width, dtype=dtype, device=device)
    for chunk in chunks_of(rows):
        fisher += chunk.T @ chunk
    allreduce_sum(fisher, comm)
    values, vectors = torch.linalg.eigh(fisher / shard.total)
    return values.flip(0)[:k], vectors.flip(1)[:, :k]


def _gram(
    rows: Rows, shard: Shard, dtype: torch.dtype, device: torch.device, comm: Communicator, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    local = matrix_of(rows) if shard.local else torch.zeros(0, shard.width, dtype=dtype, device=device)
    everything = gather_rows(local, shard, comm)
    values, u = torch.linalg.eigh(everything @ everything.T / shard.total)
    values, u = values.flip(0)[:k], u.flip(1)[:, :k]
    # v = J^T u / sqrt(N lambda) has unit norm in exact arithmetic; normalising again also covers lambda ~ 0.
    vectors = everything.T @ u / (shard.total * values.clamp_min(torch.finfo(values.dtype).tiny)).sqrt()
    return values, vectors / vectors.norm(dim=0, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


@dataclass(frozen=True)
class _LanczosPlan:
    width: int
    total: int
    dtype: torch.dtype
    device: torch.device
    k: int  # the pairs whose convergence ends the iteration early
    steps: int
    seed: int
    tol: float


def _lanczos_top(
    rows: Rows,
    shard: Shard,
    dtype: torch.dtype,
    device: torch.device,
    comm: Communicator,
    k: int,
    steps: int | None,
    seed: int,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    steps = min(shard.width, steps or max(2 * k + 40, 60))
    if steps < k:
        raise ValueError(f"distkfac.diagnostics: {steps} Lanczos steps cannot give k = {k} eigenpairs")
    if tol is not None and not tol >= 0:
        raise ValueError(f"distkfac.diagnostics: tol must be >= 0 (0 = every step), got {tol}")
    tol = torch.finfo(dtype).eps ** (2 / 3) if tol is None else tol
    plan = _LanczosPlan(shard.width, shard.total, dtype, device, k, steps, seed, tol)
    values, vectors = _lanczos(rows, plan, comm)
    if len(values) < k:
        raise ValueError(
            f"distkfac.diagnostics: Lanczos found an invariant subspace after {len(values)} steps, fewer than "
            f"k = {k}: F has fewer distinct eigenvalues than that (e.g. N < k); use method='eigh'"
        )
    return values[:k], vectors[:, :k]


def _ritz(alphas: list[float], betas: list[float], plan: _LanczosPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the tridiagonal (descending)."""
    off = torch.tensor(betas, dtype=plan.dtype, device=plan.device)
    diagonal = torch.tensor(alphas, dtype=plan.dtype, device=plan.device)
    values, s = torch.linalg.eigh(torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1))
    return values.flip(0), s.flip(1)


def _converged(alphas: list[float], betas: list[float], beta: float, plan: _LanczosPlan) -> bool:
    """Whether the top ``k`` Ritz pairs' residuals ``beta |s_last|`` are all below ``tol`` times the largest value."""
    if not plan.tol or len(alphas) < plan.k:
        return False
    values, s = _ritz(alphas, betas, plan)
    residuals = beta * s[-1, : plan.k].abs()
    return bool((residuals <= plan.tol * values[0].abs()).all())


def _lanczos(rows: Rows, plan: _LanczosPlan, comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (descending) and vectors after at most ``steps`` steps; it stops early at an invariant subspace
    (``beta`` below a rounding-level threshold, e.g. after ``N`` steps when ``N < d``) or once converged."""
    start = torch.randn(plan.width, generator=torch.Generator().manual_seed(plan.seed), dtype=plan.dtype)
    basis = [start.to(plan.device) / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for _ in range(plan.steps):
        w = fisher_product(rows, basis[-1], plan.total, comm)
        alphas.append(float(basis[-1] @ w))
        q = torch.stack(basis, dim=1)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w -= q @ (q.T @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alphas[-1]), beta)
        if len(alphas) == plan.steps or beta <= 100 * torch.finfo(plan.dtype).eps * scale:
            break
        if _converged(alphas, betas, beta, plan):
            break
        betas.append(beta)
        basis.append(w / beta)
    values, s = _ritz(alphas, betas, plan)
    return values, torch.stack(basis[: len(alphas)], dim=1) @ s


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, largest.unsqueeze(0)))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
