"""The top eigenpairs of the empirical Fisher ``F = (1/N) sum_i g_i g_i^T = (1/N) J^T J``.

``J`` (``N x d``) has the per-example gradients ``g_i`` as rows; in a data-parallel run each rank holds its shard of
the rows and ``N`` is the global count. Three routes, all giving the same eigenpairs:

- ``"eigh"``: ``F`` itself, accumulated chunk by chunk as ``sum J_c^T J_c`` (d x d), summed over the ranks, then
  ``torch.linalg.eigh``. Exact; memory ``d^2``.
- ``"gram"``: when ``N < d``, the Gram matrix ``G = J J^T / N`` (N x N) has the same non-zero eigenvalues. Its
  eigenvector ``u`` maps back to ``v = J^T u / sqrt(N lambda)`` (normalised again against rounding). Every rank's
  rows are gathered (``N d`` values), so it is for small ``N``; it needs ``k <= N``.
- ``"lanczos"``: ``steps`` Lanczos steps with full reorthogonalisation on ``v -> J^T (J v) / N``, computed chunk by
  chunk and summed over the ranks, never forming ``F``; a fixed-seed start vector, so every rank runs the same
  iteration and ends with the same eigenpairs. Memory ``d * steps``. With a callable ``Rows`` each step is one pass
  over the gradients.

``method="auto"`` picks ``"eigh"`` when ``d <= DENSE_MAX_WIDTH``; else ``"gram"`` when ``k <= N < d`` and
``N d <= GRAM_MAX_ENTRIES``; else ``"lanczos"``. With a callable ``Rows``, every method first counts the rows (one
pass). Eigenvalues come in descending order; each eigenvector's sign is fixed so that its largest-magnitude entry
is positive, so that the routes (and the ranks) agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distkfac.comm import Communicator, resolve_communicator
from distkfac.diagnostics.gather import Shard, allreduce_sum, gather_rows, shard_of
from distkfac.diagnostics.rows import Rows, chunks_of, count_and_width, matrix_of

METHODS = ("auto", "eigh", "gram", "lanczos")
DENSE_MAX_WIDTH = 2048
GRAM_MAX_ENTRIES = 2**25


@dataclass(frozen=True)
class Eigenpairs:
    """``values[j]`` (descending) and ``vectors[:, j]`` (unit norm) of ``F``, from ``count`` examples by ``method``."""

    values: torch.Tensor
    vectors: torch.Tensor
    count: int
    method: str


def choose_method(count: int, width: int, k: int) -> str:
    """The route ``method="auto"`` takes for ``count`` examples (global) of ``width`` columns and ``k`` pairs."""
    if width <= DENSE_MAX_WIDTH:
        return "eigh"
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
) -> Eigenpairs:
    """The top ``k`` eigenpairs of ``F = (1/N) J^T J`` over every rank's rows (collective when distributed).

    ``steps``: Lanczos steps (default ``max(2 k + 40, 60)``, never more than ``d``); ``seed``: its start vector's.
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
    chosen = choose_method(shard.total, shard.width, k) if method == "auto" else method
    if chosen == "eigh":
        values, vectors = _dense(rows, shard, dtype, device, comm, k)
    elif chosen == "gram":
        if k > shard.total:
            raise ValueError(f"distkfac.diagnostics: the Gram route gives at most N = {shard.total} pairs, not {k}")
        values, vectors = _gram(rows, shard, dtype, device, comm, k)
    else:
        values, vectors = _lanczos_top(rows, shard, dtype, device, comm, k, steps, seed)
    return Eigenpairs(values=values, vectors=_fix_signs(vectors), count=shard.total, method=chosen)


def fisher_product(rows: Rows, vector: torch.Tensor, total: int, comm: Communicator) -> torch.Tensor:
    """``F v = J^T (J v) / N`` over every rank's rows, chunk by chunk, without forming ``F`` (collective)."""
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


def _lanczos_top(
    rows: Rows,
    shard: Shard,
    dtype: torch.dtype,
    device: torch.device,
    comm: Communicator,
    k: int,
    steps: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    steps = min(shard.width, steps or max(2 * k + 40, 60))
    if steps < k:
        raise ValueError(f"distkfac.diagnostics: {steps} Lanczos steps cannot give k = {k} eigenpairs")
    values, vectors = _lanczos(rows, shard, dtype, device, comm, steps, seed)
    if len(values) < k:
        raise ValueError(
            f"distkfac.diagnostics: Lanczos found an invariant subspace after {len(values)} steps, fewer than "
            f"k = {k}: F has fewer distinct eigenvalues than that (e.g. N < k); use method='eigh'"
        )
    return values[:k], vectors[:, :k]


def _lanczos(
    rows: Rows,
    shard: Shard,
    dtype: torch.dtype,
    device: torch.device,
    comm: Communicator,
    steps: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (descending) and vectors after at most ``steps`` steps; it stops early at an invariant subspace
    (``beta`` below a rounding-level threshold, e.g. after ``N`` steps when ``N < d``)."""
    start = torch.randn(shard.width, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    basis = [start / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for _ in range(steps):
        w = fisher_product(rows, basis[-1], shard.total, comm)
        alphas.append(float(basis[-1] @ w))
        q = torch.stack(basis, dim=1)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w -= q @ (q.T @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alphas[-1]), beta)
        if len(alphas) == steps or beta <= 100 * torch.finfo(dtype).eps * scale:
            break
        betas.append(beta)
        basis.append(w / beta)
    off = torch.tensor(betas, dtype=dtype, device=device)
    diagonal = torch.tensor(alphas, dtype=dtype, device=device)
    tridiagonal = torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)
    values, s = torch.linalg.eigh(tridiagonal)
    return values.flip(0), torch.stack(basis[: len(alphas)], dim=1) @ s.flip(1)


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, largest.unsqueeze(0)))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
