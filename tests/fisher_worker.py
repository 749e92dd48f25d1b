"""One rank of a ``distkfac.diagnostics`` run over gloo, started by ``tests/test_fisher_diagnostics.py`` (one process
per rank, as in tests/comm_ops_worker.py).

    python -m tests.fisher_worker --out DIR

Each rank takes its shard of ``examples()`` (rank 0 the first ``SPLIT``, rank 1 the rest), computes the diagnostics
through a TorchDistCommunicator and saves them to ``DIR/fisher.rank{rank}.pt``; the test compares them with one
process holding every example.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distkfac.comm import Communicator, leave
from distkfac.comm.torch_dist import TorchDistCommunicator
from distkfac.diagnostics import (
    gradient_norms,
    mad_outliers,
    per_example_gradients,
    top_eigenpairs,
    trimmed_top_eigenvalue,
)
from distkfac.diagnostics.per_example import linear_factors

TIMEOUT = timedelta(seconds=60)
COUNT, SPLIT = 40, 23  # uneven shards, so that offsets matter


def model() -> nn.Module:
    """The same weights whatever the default dtype (the tests run in float64, the workers in float32)."""
    torch.manual_seed(0)
    single = torch.float32
    return nn.Sequential(nn.Linear(5, 8, dtype=single), nn.Tanh(), nn.Linear(8, 3, dtype=single)).double()


def examples() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(COUNT, 5, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (COUNT,), generator=generator)


def shard(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = examples()
    if world_size == 1:
        return x, y
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, COUNT)
    return x[part], y[part]


def diagnostics(comm: Communicator) -> dict[str, Any]:
    """What the test compares: Lanczos, Gram and dense pairs, the trimmed eigenvalue and MAD counts."""
    net = model()
    data = shard(comm.rank, comm.world_size)

    def rows() -> Any:  # recomputed on every pass: the chunked route, as on a cluster
        return per_example_gradients(net, data, chunk_size=7)

    first_layer = torch.cat(list(per_example_gradients(net, data, layer="0")))  # d = 48 > N = 40
    results: dict[str, Any] = {
        "lanczos": top_eigenpairs(rows, 3, "lanczos", comm),
        "eigh": top_eigenpairs(rows, 3, "eigh", comm),
        "gram": top_eigenpairs(first_layer, 2, "gram", comm),
        "trimmed": trimmed_top_eigenvalue(rows, 0.1, comm, method="lanczos"),
        "mad": mad_outliers(gradient_norms(rows), 2.0, comm),
        "mad_7": mad_outliers(gradient_norms(rows), 7.0, comm),  # a k where some x_i > k MAD and some not
        "factored": top_eigenpairs(linear_factors(net, data), 3, "lanczos", comm),  # the Linear layers' factors
        "factored_trimmed": trimmed_top_eigenvalue(linear_factors(net, data), 0.1, comm, method="lanczos"),
    }
    return {name: asdict(result) for name, result in results.items()}  # plain data: torch.load's weights_only


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    comm = TorchDistCommunicator(timeout=TIMEOUT)
    torch.save(diagnostics(comm), args.out / f"fisher.rank{comm.rank}.pt")
    leave(0)


if __name__ == "__main__":
    main()
