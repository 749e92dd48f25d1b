"""H-infinity learning: the g-EHF update of seed 001 (Nishiyama), a filter over the weights that needs only first
derivatives (docs/hinf.md).

For each training pattern, with ``h(w)`` the network's ``m`` outputs, ``y`` the targets, ``H = dh/dw`` (``m x n``, all
weights) and ``P`` the ``n x n`` Riccati matrix (``P_0 = eps0 I``):

- gain (eq. 3): ``K = P H^T (H P H^T + I_m)^-1``;
- weights (eq. 3): ``w <- w + K (y - h(w))``;
- Riccati (eqs. 4 and 6, with ``R = diag(I_m, -gamma_f^2 I_m)`` and the observation ``[H; H]``): in information form
  ``P^-1 <- P^-1 + (1 - gamma_f^-2) H^T H`` (eq. 7), so by the Woodbury identity
  ``P <- P - U (c^-1 I_m + H U)^-1 U^T`` with ``U = P H^T`` and ``c = 1 - gamma_f^-2`` (``gamma_f > 1``).

The paper gives the single-output case (``m = 1``, scalar inverses); the ``m x m`` inverses above are our
generalisation, which its closing section proposes: the information form adds ``c H^T H`` whatever ``m`` is.
``steepest=True`` keeps ``P = P_0`` (the paper's steepest-descent comparison): :func:`steepest_update`, which never
forms ``P`` and takes a leading batch dimension (many networks at once).

``P`` is kept as its upper block triangle (row blocks of ``BLOCK``, each from its diagonal block to the last column):
the product ``P H^T`` and the rank-``m`` update ``P -= V V^T`` read and write only that half, in place, with
temporaries of one block row at most. That halves the memory traffic of a full GEMV and GER (the update is
memory-bound), and ``P`` is exactly symmetric by construction: the lower half is never read. Memory is quadratic in
the number of weights: ``n^2`` values of ``dtype`` (float64 by default; the unused lower half included);
:func:`riccati_bytes` estimates it, and the constructor refuses a network whose ``P`` would not fit before allocating
anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["BLOCK", "HInfinity", "ehf_update", "full_matrix", "riccati_bytes", "steepest_update", "symmetric_matmul"]

# Rows per block of P's upper block triangle: a block row of 64 stays in cache between the two products that read it
# in symmetric_matmul (benchmarks/hinf_update.py; 512 was 1.5 times slower at n = 27,466).
BLOCK = 64


def riccati_bytes(weights: int, dtype: torch.dtype = torch.float64) -> int:
    """The bytes of ``P`` for ``weights`` weights (``n^2`` values)."""
    return weights * weights * torch.empty((), dtype=dtype).element_size()


def _available_bytes() -> int:
    """Physical memory not in use (Linux's MemAvailable), or a large number where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def symmetric_matmul(upper: torch.Tensor, x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``P x`` (``x``: ``n x m``) from ``P``'s upper block triangle; the part below the diagonal blocks, and the lower
    half of each diagonal block, are never read."""
    out = torch.zeros_like(x)
    n = len(upper)
    for start, stop in _blocks(n, block):
        diagonal = upper[start:stop, start:stop].triu()
        out[start:stop] += diagonal @ x[start:stop] + diagonal.triu(1).T @ x[start:stop]
        if stop < n:
            rest = upper[start:stop, stop:]
            out[start:stop] += rest @ x[stop:]
            out[stop:] += rest.T @ x[start:stop]
    return out


def full_matrix(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric ``P`` from its upper triangle (a new ``n x n`` tensor: for tests and small networks)."""
    return upper.triu() + upper.triu(1).T


def ehf_update(
    upper: torch.Tensor,
    w: torch.Tensor,
    jacobian: torch.Tensor,
    error: torch.Tensor,
    gamma_f: float,
    block: int = BLOCK,
) -> None:
    """One g-EHF step in place: ``w`` (``n``) by the gain, then ``P`` (its upper block triangle ``upper``, ``n x n``)
    by the Riccati update, from the outputs' ``jacobian`` (``m x n``) and ``error = y - h(w)`` (``m``), both at the
    weights before this step."""
    u = symmetric_matmul(upper, jacobian.T, block)  # P H^T, n x m
    s = jacobian @ u  # H P H^T, m x m
    eye = torch.eye(len(s), dtype=s.dtype, device=s.device)
    w += u @ torch.linalg.solve(s + eye, error)
    c = 1.0 - gamma_f**-2
    # (c^-1 I + S)^-1 = L^-T L^-1 with L the Cholesky factor of c^-1 I + S (positive definite: P is, and c > 0).
    factor = torch.linalg.cholesky((s + s.T) / 2 + eye / c)
    v = torch.linalg.solve_triangular(factor, u.T, upper=False).T  # U L^-T: P -= V V^T
    n = len(upper)
    for start, stop in _blocks(n, block):
        if v.shape[1] == 1:  # GER: 3 times faster than a GEMM with an inner dimension of 1 (benchmarks/hinf_update.py)
            upper[start:stop, start:].addr_(v[start:stop, 0], v[start:, 0], alpha=-1.0)
        else:
            upper[start:stop, start:].addmm_(v[start:stop], v[start:].T, alpha=-1.0)


def steepest_update(w: torch.Tensor, jacobian: torch.Tensor, error: torch.Tensor, eps0: float) -> None:
    """The gain step with ``P`` held at ``P_0 = eps0 I``, in place: ``w += eps0 H^T (eps0 H H^T + I_m)^-1 e``.

    ``w``: ``(..., n)``; ``jacobian``: ``(..., m, n)``; ``error``: ``(..., m)``; leading dimensions are independent
    networks (the study trains many seeds at once this way)."""
    u = eps0 * jacobian.transpose(-1, -2)  # P_0 H^T, (..., n, m)
    s = jacobian @ u  # (..., m, m)
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    w += (u @ torch.linalg.solve(s + eye, error.unsqueeze(-1))).squeeze(-1)


class HInfinity(torch.optim.Optimizer):
    """g-EHF H-infinity learning over ``params`` (all of them form the one weight vector ``w`` of the filter).

    ``step(closure)``: ``closure()`` evaluates the model on one pattern and returns ``(output, target)`` with
    ``output`` the ``m`` outputs (any shape, flattened) carrying the graph; the step takes ``H`` from ``m`` backward
    passes (one when ``m = 1``), updates the weights and ``P``, and returns the squared error ``|y - h|^2`` before the
    step. ``P`` is :attr:`riccati` (in the first parameter's state, so ``state_dict()`` carries it; ``dtype``,
    float64 by default; the weights keep theirs). ``steepest=True`` never allocates ``P`` (it stays ``P_0``).
    ``memory_fraction``: the share of the available memory ``P`` may take (refused above it, before allocating).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        gamma_f: float = 1.7,
        eps0: float = 1.0,
        steepest: bool = False,
        dtype: torch.dtype = torch.float64,
        memory_fraction: float = 0.8,
    ) -> None:
        if not gamma_f > 1 or not math.isfinite(gamma_f):
            raise ValueError(f"HInfinity: gamma_f must be a finite number above 1 (the paper uses 1.7), got {gamma_f}")
        if not eps0 > 0 or not math.isfinite(eps0):
            raise ValueError(f"HInfinity: eps0 (P_0 = eps0 I) must be a positive finite number, got {eps0}")
        super().__init__(params, {"gamma_f": gamma_f, "eps0": eps0, "steepest": steepest})
        if len(self.param_groups) > 1:
            raise ValueError("HInfinity: one parameter group (the filter has one weight vector and one P)")
        params_list = self.param_groups[0]["params"]
        self._dtype = dtype
        if steepest:
            return
        n = sum(p.numel() for p in params_list)
        need, available = riccati_bytes(n, dtype), _available_bytes()
        if need > memory_fraction * available:
            raise MemoryError(
                f"HInfinity: P for {n:,} weights needs {need / 2**30:.1f} GiB ({n}^2 values of {dtype}), more than "
                f"{memory_fraction:.0%} of the {available / 2**30:.1f} GiB available: use a smaller network, float32 "
                "(dtype=torch.float32 halves it), or steepest=True (P fixed at P_0, never stored)"
            )
        device = params_list[0].device
        # The joint P, kept in the first parameter's state so that state_dict() carries it.
        self.state[params_list[0]]["riccati"] = torch.eye(n, dtype=dtype, device=device).mul_(eps0)

    @property
    def riccati(self) -> torch.Tensor:
        """``P``'s storage (``n x n``): its upper block triangle is ``P``'s (:func:`full_matrix` makes ``P``)."""
        return self.state[self.param_groups[0]["params"][0]]["riccati"]

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).to(self._dtype) for p in self.param_groups[0]["params"]])

    def _jacobian(self, output: torch.Tensor) -> torch.Tensor:
        params = self.param_groups[0]["params"]
        rows = []
        for index in range(len(output)):
            grads = torch.autograd.grad(output[index], params, retain_graph=index + 1 < len(output), allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params, strict=True)]))  # fmt: skip
        return torch.stack(rows).to(self._dtype)

    def step(self, closure: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> float:  # type: ignore[override]
        """One pattern's update; returns ``|y - h(w)|^2`` at the weights before it."""
        with torch.enable_grad():
            output, target = closure()
        output = output.reshape(-1)
        error = target.reshape(-1).to(self._dtype) - output.detach().to(self._dtype)
        jacobian = self._jacobian(output)
        group = self.param_groups[0]
        w = self._flat()
        if group["steepest"]:
            steepest_update(w, jacobian, error, group["eps0"])
        else:
            ehf_update(self.riccati, w, jacobian, error, group["gamma_f"])
        with torch.no_grad():
            offset = 0
            for p in group["params"]:
                p.copy_(w[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return float(error @ error)
