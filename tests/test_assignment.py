"""Work assignment, packing and communicator selection: the parts of data-parallel K-FAC that need no second process."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from benchmarks.distributed import resnet32_dims, resnet50_dims
from distkfac import KFACPreconditioner, SingleProcessCommunicator
from distkfac.assignment import assign_work, decomposition_cost, grad_workers_for
from distkfac.comm import resolve_communicator
from distkfac.exchange import SymmetricPacking, packed_size


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2)])
def test_groups_tile_the_ranks(world: int, workers: int) -> None:
    work = assign_work(resnet32_dims(), world, workers)
    flat = sorted(itertools.chain.from_iterable(work.worker_groups))
    assert flat == list(range(world)) and all(len(g) == workers for g in work.worker_groups)
    for receivers in work.receiver_groups:
        # one member of every worker group in every receiver group: each rank gets each layer from exactly one source
        assert sorted(sum(1 for r in receivers if r in g) for g in work.worker_groups) == [1] * len(work.worker_groups)
    for index, layer in enumerate(work.layers):
        assert layer.a_owner in layer.grad_workers and layer.g_owner in layer.grad_workers
        for rank in range(world):
            assert work.grad_source(index, rank) in layer.grad_workers
            if rank in layer.grad_workers:
                assert work.grad_source(index, rank) == rank


def test_loads_add_up_and_greedy_puts_the_largest_factors_apart() -> None:
    dims = resnet50_dims()
    work = assign_work(dims, 4, 4)
    assert sum(work.loads) == pytest.approx(sum(decomposition_cost(n) for pair in dims for n in pair))
    biggest = [(i, k) for i, pair in enumerate(dims) for k, n in enumerate(pair) if n == 4608]
    owners = {work.layers[i].a_owner if k == 0 else work.layers[i].g_owner for i, k in biggest}
    assert len(owners) == len(biggest) == 3


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("workers", ["all", "one", "half"])
def test_resnet50_decompositions_balance_within_15_percent(world: int, workers: str) -> None:
    g = {"all": world, "one": 1, "half": world // 2}[workers]
    assert assign_work(resnet50_dims(), world, g).balance() <= 1.15


def test_grad_worker_fraction_errors_name_the_valid_choices() -> None:
    assert grad_workers_for("comm-opt", None, 4) == 4
    assert grad_workers_for("mem-opt", None, 4) == 1
    assert grad_workers_for("hybrid", 0.5, 4) == 2
    with pytest.raises(ValueError, match=r"0\.75 gives 3 gradient workers.*use one of \['1/4', '2/4', '4/4'\]"):
        grad_workers_for("hybrid", 0.75, 4)
    with pytest.raises(ValueError, match="needs grad_worker_fraction"):
        grad_workers_for("hybrid", None, 4)
    with pytest.raises(ValueError, match="fixes grad_worker_fraction at 1"):
        grad_workers_for("comm-opt", 0.5, 4)
    with pytest.raises(ValueError, match="strategy must be one of"):
        grad_workers_for("kaisa", None, 4)


@pytest.mark.parametrize("pack", [True, False])
def test_pack_round_trip(pack: bool) -> None:
    packing = SymmetricPacking(pack)
    for n, numel in ((7, 28 if pack else 49), (3, 6 if pack else 9)):  # one packing, several sizes
        x = torch.randn(n, 20, dtype=torch.float64)
        factor = x @ x.T
        factor = (factor + factor.T) / 2  # exactly symmetric, as an averaged factor is up to rounding
        flat = packing.pack(factor)
        assert flat.numel() == packed_size(n, pack) == packing.size(n) == numel
        torch.testing.assert_close(packing.unpack(flat.clone(), n, torch.float64), factor, rtol=0, atol=0)


def test_one_process_needs_no_process_group_and_bad_comm_is_refused() -> None:
    assert isinstance(resolve_communicator(None), SingleProcessCommunicator)
    with pytest.raises(ValueError, match="comm must be 'single', 'torch', 'horovod'"):
        resolve_communicator("nccl")
    with pytest.raises(RuntimeError, match="init_process_group"):
        resolve_communicator("torch")


def test_checkpoint_from_another_world_size_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    precond = KFACPreconditioner(model)
    state = precond.state_dict()
    state["world_size"], state["rank"], state["grad_workers"] = 4, 2, 4
    with pytest.raises(ValueError, match="holds rank 2's part of a run with 4 ranks"):
        precond.load_state_dict(state)
