"""The alpha-beta network: NCCL's ring and tree formulas, the cheaper of the two per call."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    """Alpha-beta costs of NCCL-style collectives on a flat network: ``alpha`` seconds per message step, ``beta``
    seconds per byte, ``p`` ranks, ``n`` bytes. Ring: allreduce ``2(p-1) alpha + 2(p-1)/p n beta``, reduce-scatter
    ``(p-1) alpha + (p-1)/p n beta``, reduce and broadcast (a pipelined chain) ``(p-1) alpha + n beta``. Tree
    (pipelined, ``ceil(log2 p)`` levels): allreduce ``2 log2(p) alpha + 2 n beta``, reduce and broadcast
    ``log2(p) alpha + n beta``. Per call the cheaper of the two for the collectives in ``tree`` (NCCL chooses so for
    allreduce only: its reduce and broadcast are rings), the ring otherwise; reduce-scatter is always a ring."""

    name: str
    alpha: float
    beta: float
    tree: frozenset[str] = frozenset({"allreduce"})

    def seconds(self, op: str, nbytes: float, p: int) -> float:
        if p <= 1 or nbytes <= 0:
            return 0.0
        a, b, steps = self.alpha, self.beta, math.ceil(math.log2(p))
        if op == "allreduce":
            ring, tree = 2 * (p - 1) * a + 2 * (p - 1) / p * nbytes * b, 2 * steps * a + 2 * nbytes * b
        elif op == "reduce_scatter":
            ring = tree = (p - 1) * a + (p - 1) / p * nbytes * b
        elif op in ("reduce", "broadcast"):  # pipelined chain (ring) or pipelined tree
            ring, tree = (p - 1) * a + nbytes * b, steps * a + nbytes * b
        else:
            raise ValueError(f"unknown collective {op!r}")
        return min(ring, tree) if op in self.tree else ring


def infiniband_hdr(alpha_us: float = 5.0, bandwidth_gbs: float = 24.0, tree_for: str = "allreduce") -> Network:
    """Our stated assumption: one 200 Gb/s InfiniBand HDR port per GPU (25 GB/s line rate; 24 GB/s used), all ranks
    on one flat fat tree (NVLink inside a node ignored), ``alpha`` 5 us per message step: between NCCL's own
    per-step network latencies in its tuning model (src/graph/tuning.cc, hwLat NET: ring LL 2.7 us, ring Simple
    9.6 us, tree LL 5.0 us). ``tree_for="all"`` lets reduce and broadcast take a tree too."""
    tree = frozenset({"allreduce", "reduce", "broadcast"}) if tree_for == "all" else frozenset({"allreduce"})
    name = f"InfiniBand HDR 200 Gb/s, alpha {alpha_us:g} us, {bandwidth_gbs:g} GB/s"
    return Network(name, alpha_us * 1e-6, 1.0 / (bandwidth_gbs * 1e9), tree)
