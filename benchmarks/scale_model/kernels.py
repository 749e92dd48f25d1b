"""Kernel times measured on the local device (GEMM, eigh, Cholesky inverse, unfold, copy), interpolated log-log."""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.scale_model.constants import RUNS

GEMM_SHAPES = (
    *((n, n, n) for n in (16, 32, 64, 128, 256, 512, 1024, 2048)),
    (8192, 64, 64),
    (256, 8192, 256),
    (32768, 256, 256),
    (1024, 16384, 1024),
    (16384, 1024, 1024),
)
DECOMPOSITION_SIZES = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048)
UNFOLD_INPUTS = ((2, 16, 28, 28), (8, 256, 14, 14), (8, 64, 56, 56))  # N, C, H, W; 3 x 3 kernels, padding 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """The best per-call time of ``fn`` after a warm-up; short calls are repeated so that the clock's resolution and
    Python's overhead do not count."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    repeats = max(1, min(50, int(0.02 / max(once, 1e-7))))
    best = once
    for _ in range(3 if once < 0.1 else 1):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _spd(n: int, device: torch.device) -> torch.Tensor:
    root = torch.randn(n, n, device=device) / math.sqrt(n)
    return root @ root.T + torch.eye(n, device=device)


def _monotone(points: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Points sorted by size, one per size, with times made non-decreasing (shapes of equal flops differ a little)."""
    out: list[tuple[float, float]] = []
    for x, t in sorted(points):
        if out and x == out[-1][0]:
            out[-1] = (x, max(t, out[-1][1]))
        else:
            out.append((x, max(t, out[-1][1]) if out else t))
    return tuple(out)


KERNEL_TABLES = ("gemm", "eigh", "inverse", "unfold")


@dataclass(frozen=True)
class Kernels:
    """Measured kernel times on one device, as ``(size, seconds)`` points interpolated log-log."""

    device: str
    threads: int
    gemm: tuple[tuple[float, float], ...]  # (flops, s)
    eigh: tuple[tuple[float, float], ...]  # (n, s)
    inverse: tuple[tuple[float, float], ...]  # (n, s): cholesky + cholesky_inverse
    unfold: tuple[tuple[float, float], ...]  # (output elements, s)
    copy_bytes_per_s: float  # bytes read + written per second by a large copy

    def scaled(self, factor: float) -> Kernels:
        """Every kernel ``factor`` times slower (a device shared with other processes)."""
        slower: dict[str, Any] = {
            name: tuple((x, t * factor) for x, t in getattr(self, name)) for name in KERNEL_TABLES
        }
        return replace(self, **slower, copy_bytes_per_s=self.copy_bytes_per_s / factor)

    def gemm_s(self, m: int, k: int, n: int) -> float:
        return _loglog(self.gemm, 2.0 * m * k * n, 1.0)

    def decompose_s(self, n: int, method: str) -> float:
        return _loglog(self.eigh if method == "eigen" else self.inverse, float(n), 3.0)

    def unfold_s(self, elements: int) -> float:
        return _loglog(self.unfold, float(elements), 1.0) if elements else 0.0

    def elementwise_s(self, nbytes: float) -> float:
        return nbytes / self.copy_bytes_per_s


def _loglog(points: Sequence[tuple[float, float]], x: float, power: float) -> float:
    """Piecewise-linear in log-log between the points; the smallest time below them (a fixed overhead), and
    ``t ~ x^(power/3 for n, 1 for flops)`` above them."""
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        top, t = points[-1]
        return t * (x / top) ** power
    for (x0, t0), (x1, t1) in itertools.pairwise(points):
        if x <= x1:
            share = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(t0) + share * math.log(t1 / t0))
    raise AssertionError("unreachable")


def _cholesky_inverse(spd: torch.Tensor) -> torch.Tensor:
    """What the inverse method does per factor (``distkfac.methods.InverseMethod``)."""
    return torch.cholesky_inverse(torch.linalg.cholesky(spd))


def measure_kernels(device: torch.device, threads: int, max_decomposition: int = 2048) -> Kernels:
    """Time the table's kernels on ``device`` with ``threads`` CPU threads (about a minute on 2 CPU cores)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gemm = []
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        gemm.append((2.0 * m * k * n, _seconds(functools.partial(torch.mm, a, b), device)))
    eigh, inverse = [], []
    for n in (s for s in DECOMPOSITION_SIZES if s <= max_decomposition):
        spd = _spd(n, device)
        eigh.append((float(n), _seconds(functools.partial(torch.linalg.eigh, spd), device)))
        inverse.append((float(n), _seconds(functools.partial(_cholesky_inverse, spd), device)))
    unfold = []
    for shape in UNFOLD_INPUTS:
        x = torch.randn(*shape, device=device)
        elements = shape[0] * shape[1] * 9 * shape[2] * shape[3]
        unfold.append((float(elements), _seconds(functools.partial(F.unfold, x, 3, padding=1), device)))
    big = torch.randn(2**22, device=device)  # 16 MiB: factors and gradients of a few MiB each
    copy_s = _seconds(big.clone, device)
    return Kernels(
        str(device),
        threads,
        _monotone(gemm),
        _monotone(eigh),
        _monotone(inverse),
        _monotone(unfold),
        8 * 2**22 / copy_s,
    )


def kernels_for(device: str, threads: int, path: Path | None, remeasure: bool) -> Kernels:
    """The cached table for this device and thread count, measured (and cached) when missing or asked for."""
    path = path or RUNS / f"scale_model_kernels-{device}-{threads}t.json"
    if path.exists() and not remeasure:
        saved = json.loads(path.read_text())
        lists: dict[str, Any] = {k: tuple(map(tuple, v)) if isinstance(v, list) else v for k, v in saved.items()}
        return Kernels(**lists)
    kernels = measure_kernels(torch.device(device), threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kernels.__dict__, indent=1))
    return kernels
