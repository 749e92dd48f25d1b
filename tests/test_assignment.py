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
from distkfac.factors import FACTOR_KINDS, FactorKey, FactorShape, Structure, block_bounds


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


@pytest.mark.parametrize("n", [1, 7, 1024, 1025, 4608])
@pytest.mark.parametrize("split_above", [1, 5, 1024])
def test_block_bounds_tile_the_factor_in_near_equal_blocks_no_larger_than_asked(n: int, split_above: int) -> None:
    bounds = block_bounds(FactorShape.dense(n), split_above)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) <= split_above or (len(sizes) == 1 and n <= split_above)
    assert max(sizes) - min(sizes) <= 1 and len(sizes) == -(-n // split_above)
    assert block_bounds(FactorShape(Structure.DIAGONAL, n), split_above) == [(0, n)]  # only dense factors split


@pytest.mark.parametrize("world", [8, 16, 32, 64])
def test_split_factors_balance_past_the_whole_factor_ceiling(world: int) -> None:
    """Whole factors cannot beat sum / max of their costs (4.63x on ResNet-50); blocks of at most 1024 reach at least
    P/2 up to P = 64, and greedy largest-first keeps every rank under mean + the largest block (Graham)."""
    dims = resnet50_dims()
    whole = assign_work(dims, world, world)
    costs = [decomposition_cost(n) for pair in dims for n in pair]
    assert whole.decomposition_speedup() <= sum(costs) / max(costs) + 1e-9
    split = assign_work(dims, world, world, split_above=1024)
    assert split.decomposition_speedup() >= world / 2
    largest = max(decomposition_cost(block.size) for block, _ in split.blocks)
    assert max(split.loads) <= sum(split.loads) / world + largest
    # Every block of every factor has one owner inside the layer's worker group, and the blocks tile the factor.
    for layer, work in enumerate(split.layers):
        for kind, n in zip(FACTOR_KINDS, dims[layer], strict=True):
            blocks = sorted(block for block, _ in split.blocks if block.key == FactorKey(layer, kind))
            assert [(b.start, b.stop) for b in blocks] == block_bounds(FactorShape.dense(n), 1024)
            assert set(split.owners(FactorKey(layer, kind))) <= set(work.grad_workers)


def test_split_blocks_stay_inside_the_worker_group_of_their_layer() -> None:
    hybrid = assign_work(resnet50_dims(), 8, 2, split_above=512)
    for block, owner in hybrid.blocks:
        assert owner in hybrid.layers[block.key.layer].grad_workers
    with pytest.raises(ValueError, match="split_factors_above must be a whole number >= 1"):
        assign_work(resnet50_dims(), 8, 2, split_above=0)
    with pytest.raises(ValueError, match=r"split_factors_above must be a whole number >= 1 \(the largest block"):
        KFACPreconditioner(nn.Linear(4, 3), split_factors_above=0)
