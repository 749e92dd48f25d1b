"""The g-EHF update's cost against the number of weights (``python -m benchmarks.hinf_update``).

For seed 001's residual network at several depths: the time of one pattern's ``distkfac.hinf.ehf_update`` (P's
product and its rank-1 update; the Jacobian is not included), its FLOP count, and, in the same run on a matrix of the
same size, the machine's own rates: ``torch.mv`` (GEMV, one read of ``n^2`` values), ``torch.addr_`` in place (GER,
one read and one write) and a plain ``copy_`` of one ``n x n`` matrix into another (the streaming memory bandwidth).
Every matrix is written before it is timed (untouched zero pages would read from the cache). The update
touches P's upper half three times (the product reads it; the rank-1 update reads and writes it), so its memory
traffic is ``3 n^2 / 2`` values, and its floor is that traffic at the streaming bandwidth.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from distkfac.hinf import ehf_update
from jobs.models import SigmoidResNet


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm the caches and the allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(depth: int, repeats: int) -> dict[str, float]:
    n = sum(p.numel() for p in SigmoidResNet(2, depth, 5, 1).parameters())
    g = torch.Generator().manual_seed(depth)
    # P_0 = 10 I in the upper triangle; random values below it, which the update must never read
    upper = (
        torch.rand(n, n, generator=g, dtype=torch.float64).tril_(-1).add_(torch.eye(n, dtype=torch.float64), alpha=10)
    )
    w, h = torch.zeros(n, dtype=torch.float64), 1e-3 * torch.randn(1, n, generator=g, dtype=torch.float64)
    e = torch.ones(1, dtype=torch.float64)
    update = _best(lambda: ehf_update(upper, w, h, e, 1.7), repeats)
    other = torch.rand(n, n, generator=g, dtype=torch.float64)
    x = h[0].clone()
    gemv = _best(lambda: torch.mv(upper, x), repeats)
    ger = _best(lambda: other.addr_(x, x, alpha=-1.0), repeats)
    stream = _best(lambda: other.copy_(upper), repeats)  # reads one matrix, writes one
    values = n * n
    return {
        "depth": depth, "n": n, "update_s": update, "gflops": 3 * values / update / 1e9,
        "gemv_gbs": 8 * values / gemv / 1e9, "ger_gbs": 16 * values / ger / 1e9,
        "stream_gbs": 16 * values / stream / 1e9,
        "update_gbs": 12 * values / update / 1e9, "ideal_ratio": (gemv + ger) / 2 / update,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", default="101,201,401,801,1001")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print("| L | n | P (GiB) | update (s) | GFLOP/s | update GB/s | GEMV GB/s | GER GB/s | stream GB/s | "
          "(GEMV+GER)/2 / update |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for depth in (int(d) for d in args.depths.split(",")):
        r = measure(depth, args.repeats)
        print(f"| {depth} | {r['n']:,} | {8 * r['n'] ** 2 / 2**30:.2f} | {r['update_s']:.4f} | {r['gflops']:.2f} | "
              f"{r['update_gbs']:.1f} | {r['gemv_gbs']:.1f} | {r['ger_gbs']:.1f} | {r['stream_gbs']:.1f} | "
              f"{r['ideal_ratio']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
