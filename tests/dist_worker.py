"""One rank of a distributed K-FAC test run, started by torchrun, mpirun or the tests directly.

    python -m tests.dist_worker --backend torch|horovod|mpi --out DIR --scenario equivalence|die|hang|mismatch

``equivalence`` trains every configuration of ``CONFIGS`` for a few steps on real Fashion-MNIST images, each rank on
its shard of every batch, and saves each rank's final parameters; the test compares them with ``train(..., world=1)``
run in one process on the full batches. The other scenarios make one rank fail on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distkfac import KFACPreconditioner
from distkfac.comm import leave
from jobs.data import FASHION_MNIST_ROOT, load_mnist_like
from tests.kfac_reference import SequenceClassifier

STEPS = 4
# What every configuration gets unless CONFIGS says otherwise.
KFAC_DEFAULTS: dict[str, Any] = {"lr": 0.1, "damping": 1e-2, "inv_update_steps": 2, "kl_clip": 1e-2}
BATCH = 48  # divisible by 2, 4, and by 2 passes of each
CONFIGS: dict[str, dict[str, Any]] = {
    "comm-opt": {"strategy": "comm-opt", "ddp": True},
    "mem-opt": {"strategy": "mem-opt", "compute_method": "inverse"},
    "hybrid": {"strategy": "hybrid", "grad_worker_fraction": 0.5, "ddp": True},
    # Two passes per step, tiny buckets (several reductions in flight), no DDP: the preconditioner averages gradients.
    "comm-opt-accumulate": {"strategy": "comm-opt", "passes": 2, "bucket_cap_mb": 0.01},
    # Factors travel in float16: not equivalent to float64, but every rank must still apply the same update.
    "mem-opt-fp16-comm": {"strategy": "mem-opt", "comm_dtype": torch.float16, "ddp": True},
    # factored-pi shifts each factor by the other's trace; comm-opt puts some layer's A and G on different ranks.
    "comm-opt-inverse-factored-pi": {
        "strategy": "comm-opt",
        "compute_method": "inverse",
        "damping_form": "factored-pi",
    },
    # Embedding (diagonal A), LayerNorm (unit-wise blocks, no A) and a Linear over the sequence, on tokens made
    # from the images' rows: vector factors and blocks travel, balance and are decomposed in every strategy.
    "sequence-comm-opt": {"strategy": "comm-opt", "model": "sequence", "ddp": True},
    "sequence-mem-opt-reduce": {
        "strategy": "mem-opt",
        "model": "sequence",
        "compute_method": "inverse",
        "weight_sharing": "reduce",
    },
    "sequence-hybrid-factored-pi": {
        "strategy": "hybrid",
        "grad_worker_fraction": 0.5,
        "model": "sequence",
        "damping_form": "factored-pi",
        "passes": 2,
    },
    # The 145 x 145 A of the first Linear split into 4 diagonal blocks owned by 4 ranks (2 at P = 2), decomposed in
    # the background and shipped one interval late (every step here, so shipping happens at steps 2 and 3).
    "comm-opt-split-async": {
        "strategy": "comm-opt",
        "split_factors_above": 40,
        "async_decompositions": True,
        "inv_update_steps": 1,
    },
    # Blocks spread over a worker group of 2 at P = 4; factored-pi sums a split factor's trace over its block owners.
    "hybrid-split-inverse-factored-pi": {
        "strategy": "hybrid",
        "grad_worker_fraction": 0.5,
        "split_factors_above": 40,
        "compute_method": "inverse",
        "damping_form": "factored-pi",
    },
    # The KAISA-like baseline of the benchmark: full factors allreduced to every rank.
    "hybrid-allreduce-baseline": {
        "strategy": "hybrid",
        "grad_worker_fraction": 0.5,
        "factor_reduction": "allreduce",
        "pack_factors": False,
        "overlap_comm": False,
    },
}
EXACT = [
    "comm-opt",
    "mem-opt",
    "hybrid",
    "comm-opt-accumulate",
    "hybrid-allreduce-baseline",
    "comm-opt-inverse-factored-pi",
    "sequence-comm-opt",
    "sequence-mem-opt-reduce",
    "sequence-hybrid-factored-pi",
    "comm-opt-split-async",
    "hybrid-split-inverse-factored-pi",
]
HOROVOD_CONFIGS = [
    "comm-opt",
    "mem-opt",
    "hybrid",
    "comm-opt-accumulate",
    "mem-opt-fp16-comm",
    "sequence-mem-opt-reduce",
    "comm-opt-split-async",
]


def make_model(name: str = "cnn") -> nn.Module:
    torch.manual_seed(0)
    if name == "sequence":
        return SequenceClassifier(vocab=16, dim=8, hidden=8, classes=10).double()
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(144, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).double()


def image_rows_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """Each image row's mean brightness as one of 16 tokens; blank rows become token 0, the padding index."""
    return (x.reshape(x.shape[0], 28, 28).mean(2) * 40).ceil().clamp(max=15).long()


def load_batches(model: str = "cnn") -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = load_mnist_like(FASHION_MNIST_ROOT, "train")
    x = images[: STEPS * BATCH].double().reshape(-1, 1, 28, 28) / 255.0
    if model == "sequence":
        x = image_rows_as_tokens(x)
    y = labels[: STEPS * BATCH].long()
    return [(x[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH]) for k in range(STEPS)]


IN_FLIGHT_AFTER_BACKWARD: list[int] = []  # factor reductions already started when backward returned, per step


def train(config: dict[str, Any], rank: int, world: int, comm: Any, die_at: int | None = None) -> nn.Module:
    """Train ``STEPS`` steps; rank ``rank`` of ``world`` sees its equal shard of every batch."""
    IN_FLIGHT_AFTER_BACKWARD.clear()
    settings = {k: v for k, v in config.items() if k not in ("ddp", "passes", "model")}
    model = make_model(config.get("model", "cnn"))
    trained: nn.Module = model
    if config.get("ddp") and world > 1 and torch.distributed.is_initialized():  # Horovod runs use plain models
        trained = nn.parallel.DistributedDataParallel(model)
    precond = KFACPreconditioner(trained, comm=comm, **{**KFAC_DEFAULTS, **settings})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    passes = config.get("passes", 1)
    for step, (x, y) in enumerate(load_batches(config.get("model", "cnn"))):
        shard = BATCH // world
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        optimizer.zero_grad()
        part = shard // passes
        for p in range(passes):
            logits = trained(x[p * part : (p + 1) * part])
            F.cross_entropy(logits, y[p * part : (p + 1) * part]).backward()
        IN_FLIGHT_AFTER_BACKWARD.append(len(precond._factor_exchange._inflight))  # white-box: is there overlap?
        if die_at is not None and step == die_at:
            if rank == 1:
                os._exit(3)
            time.sleep(0.5)  # let rank 1 go first, so that the others meet a dead peer in step()
        precond.step()
        optimizer.step()
    return model


def init_comm(backend: str, timeout: float, owner_reduction: str) -> tuple[Any, int, int, list[str]]:
    """The communicator of one backend, this rank, the world size and the configurations it runs."""
    if backend == "torch":
        import torch.distributed as dist

        from distkfac.comm.torch_dist import TorchDistCommunicator

        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        torch_comm = TorchDistCommunicator(timeout=timedelta(seconds=timeout), owner_reduction=owner_reduction)
        return torch_comm, dist.get_rank(), dist.get_world_size(), list(CONFIGS)
    if backend == "mpi":
        from distkfac.comm.mpi import MPICommunicator

        mpi_comm = MPICommunicator(timeout=timedelta(seconds=timeout))
        return mpi_comm, mpi_comm.rank, mpi_comm.world_size, list(CONFIGS)
    import horovod.torch as hvd

    from distkfac.comm.horovod import HorovodCommunicator

    hvd.init(process_sets="dynamic")
    return HorovodCommunicator(), hvd.rank(), hvd.size(), HOROVOD_CONFIGS


def run_equivalence(comm: Any, rank: int, world: int, names: list[str], out: Path) -> None:
    """Train every configuration; save each rank's model, traffic and the constructor's errors."""
    for name in names:
        comm.stats.reset()
        model = train(CONFIGS[name], rank, world, comm)
        torch.save(model.state_dict(), out / f"{name}.rank{rank}.pt")
        stats = {
            "bytes": dict(comm.stats.bytes_sent),
            "calls": dict(comm.stats.calls),
            "in_flight_after_backward": IN_FLIGHT_AFTER_BACKWARD,
        }
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(stats))
    errors = {}
    try:  # a fraction that leaves no whole number of gradient workers
        KFACPreconditioner(make_model(), comm=comm, strategy="hybrid", grad_worker_fraction=0.3)
    except ValueError as error:
        errors["fraction"] = str(error)
    (out / f"errors.rank{rank}.json").write_text(json.dumps(errors))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["torch", "horovod", "mpi"], required=True)
    parser.add_argument("--scenario", choices=["equivalence", "die", "hang", "mismatch"], default="equivalence")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--owner-reduction", choices=["scatter", "each"], default="scatter", help="torch only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    comm, rank, world, names = init_comm(args.backend, args.timeout, args.owner_reduction)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.scenario == "equivalence":
        run_equivalence(comm, rank, world, names, args.out)
    elif args.scenario == "mismatch":
        model = make_model()
        if rank == 1:  # rank 1 builds another model
            model = nn.Sequential(*list(model.children())[:8], nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)).double()
        try:
            KFACPreconditioner(model, comm=comm)
        except ValueError as error:
            print(f"rank {rank}: ValueError: {error}", file=sys.stderr, flush=True)
            os._exit(2)  # skip interpreter teardown: gloo may abort when its group is torn down mid-exit
    elif args.scenario == "die":
        train(CONFIGS["comm-opt"], rank, world, comm, die_at=2)
    elif args.scenario == "hang":
        config = CONFIGS["mem-opt"]
        model = make_model()
        precond = KFACPreconditioner(model, comm=comm, strategy=config["strategy"])
        x, y = load_batches()[0]
        F.cross_entropy(model(x[:8]), y[:8]).backward()
        if rank == 1:
            time.sleep(3600)  # alive but stuck: the others must give up after the timeout
        precond.step()
    # gloo can abort at exit even after barrier + destroy_process_group (torch 2.13): leave skips that teardown.
    leave(0)


if __name__ == "__main__":
    main()
