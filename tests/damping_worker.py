"""One rank of the adaptive-damping test, started by torchrun from tests/test_damping.py (or run in one process).

    python -m tests.damping_worker --out DIR

Each rank trains ``STEPS`` steps on its equal shard of every batch with ``LevenbergMarquardt(interval=1)``, adapting
after every step (lr 0.2: two good steps, then two far too long ones), and writes each step's measurement to
``DIR/<config>.rank<r>.json``. The test compares the ranks with each other and with :func:`train` run in one process
on the whole batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner, LevenbergMarquardt
from distkfac.comm import leave
from distkfac.damping import measure_and_adapt

STEPS = 4
BATCH = 32
CONFIGS = ("plain", "ddp")  # the preconditioner averages the gradients, or DDP does


def make_model() -> nn.Module:
    torch.manual_seed(0)
    f64 = torch.float64  # explicitly: the test process runs with float64 as the default dtype, torchrun's ranks not
    return nn.Sequential(
        nn.Linear(8, 16, dtype=f64), nn.Tanh(), nn.Linear(16, 16, dtype=f64), nn.Tanh(), nn.Linear(16, 4, dtype=f64)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(BATCH, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (BATCH,), generator=gen))
        for _ in range(STEPS)
    ]


def train(config: str, rank: int, world: int, comm: Any) -> list[dict[str, float]]:
    """``STEPS`` steps of K-FAC + SGD, rank ``rank`` of ``world`` on its shard; each step's Adaptation as a dict."""
    model = make_model()
    trained: nn.Module = nn.parallel.DistributedDataParallel(model) if config == "ddp" and world > 1 else model
    damping = LevenbergMarquardt(initial=1e-2, interval=1)
    precond = KFACPreconditioner(trained, damping=damping, lr=0.2, kl_clip=None, inv_update_steps=1, comm=comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    records = []
    for x, y in batches():
        shard = BATCH // world
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        optimizer.zero_grad()
        loss = F.cross_entropy(trained(x), y)
        loss.backward()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        grad = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        precond.step()
        optimizer.step()
        adaptation = measure_and_adapt(precond, model, x, partial(F.cross_entropy, target=y), loss, before, grad)
        records.append(dataclasses.asdict(adaptation))
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    from distkfac.comm.torch_dist import TorchDistCommunicator

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchDistCommunicator(timeout=timedelta(seconds=60))
    args.out.mkdir(parents=True, exist_ok=True)
    for config in CONFIGS:
        (args.out / f"{config}.rank{rank}.json").write_text(json.dumps(train(config, rank, world, comm)))
    leave(0)


if __name__ == "__main__":
    main()
