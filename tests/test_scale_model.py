"""benchmarks/scale_model/: its byte and memory counts against a real preconditioner driven by a counting
communicator (one process, rank by rank), the alpha-beta formulas, the decomposition speed-ups and KAISA's column.

The torchrun runs of tests/test_distributed.py check the same byte counts against real gloo runs at P = 2 and 4.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F

from benchmarks import scale_model as sm
from benchmarks.distributed import resnet50_dims
from distkfac import KFACPreconditioner
from distkfac.comm.base import CommStats, Done, Pending, nbytes
from tests import dist_worker

STEPS = 4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny kernels: one thread is faster, and steadier on a shared 2-core machine (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CountingComm:
    """Rank ``rank`` of ``world_size`` in one process: counts what it hands to collectives as the real communicators
    do, and receives zeros (so that the run stays finite) without any other rank."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.stats = rank, world_size, CommStats()

    def prepare_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        return None

    def allgather_ints(self, values: Sequence[int]) -> list[list[int]]:
        return [list(values)] * self.world_size

    def allreduce_sum(self, tensor: torch.Tensor, purpose: str) -> Pending:
        self.stats.record_allreduce(purpose, nbytes(tensor), self.world_size)
        return Done()

    def reduce_to_owners(self, segments: Sequence[torch.Tensor], purpose: str) -> Pending:
        total = sum(map(nbytes, segments))
        if total:
            self.stats.record_one_way(purpose, total, self.world_size)
        return Done()

    def broadcast(self, tensor: torch.Tensor, src: int, group: tuple[int, ...], purpose: str) -> Pending:
        if len(group) > 1:
            self.stats.record_one_way(purpose, nbytes(tensor), len(group))
            if src != self.rank:
                tensor.zero_()
        return Done()


def _inputs(model: str, count: int) -> torch.Tensor:
    """A batch of ``count`` inputs of tests/dist_worker.py's ``model``: images, or the tokens made of their rows."""
    images = torch.rand(count, 1, 28, 28, dtype=torch.float64)
    return dist_worker.image_rows_as_tokens(images) if model == "sequence" else images


def _layer_set(world: int, model: str = "cnn") -> sm.LayerSet:
    example = _inputs(model, dist_worker.BATCH // world)
    return sm.layer_set_from_module(model, dist_worker.make_model(model), example)


def _counted(settings: dict, world: int, rank: int, inv_update_steps: int) -> tuple[CommStats, dict[str, int]]:
    """A real preconditioner as rank ``rank`` of ``world``: bytes counted over STEPS steps, and its K-FAC memory."""
    torch.manual_seed(0)
    model = dist_worker.make_model(settings.get("model", "cnn"))
    comm = CountingComm(rank, world)
    kwargs = {k: v for k, v in settings.items() if k not in ("ddp", "passes", "model")}
    kwargs.setdefault("inv_update_steps", inv_update_steps)
    precond = KFACPreconditioner(model, comm=comm, allreduce_grads=not settings.get("ddp", False), **kwargs)
    passes = settings.get("passes", 1)
    shard = dist_worker.BATCH // world
    for _ in range(STEPS):
        model.zero_grad()
        for _ in range(passes):
            x = _inputs(settings.get("model", "cnn"), shard // passes)
            F.cross_entropy(model(x), torch.randint(0, 10, (shard // passes,))).backward()
        precond.step()
    return comm.stats, precond.memory_bytes()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(dist_worker.CONFIGS))
def test_bytes_calls_and_memory_are_what_a_real_preconditioner_counts(name: str, world: int) -> None:
    settings = dist_worker.CONFIGS[name]
    config = sm.Config.from_settings(settings)
    schedule = sm.Config.schedule_from(settings, sm.Schedule(inv_update_steps=2))
    layer_set = _layer_set(world, settings.get("model", "cnn"))
    memory = sm.memory_per_rank(layer_set, config, world)
    for rank in range(world):
        counted, kept = _counted(settings, world, rank, schedule.inv_update_steps)
        traffic = sm.traffic(layer_set, config, world, rank)
        modelled = sm.run_stats(traffic, STEPS, schedule, config.passes, config.asynchronous)
        assert dict(modelled.bytes_sent) == pytest.approx(dict(counted.bytes_sent), rel=1e-12), (name, rank)
        assert dict(modelled.calls) == dict(counted.calls), (name, rank)
        assert memory[rank] == kept["factors"] + kept["decompositions"], (name, rank)


def test_per_owner_reductions_send_the_same_bytes_in_more_calls() -> None:
    layer_set = _layer_set(4)
    scatter = sm.traffic(layer_set, sm.Config("comm-opt"), 4, 0)
    each = sm.traffic(layer_set, sm.Config("comm-opt", per_owner=True), 4, 0)
    assert sm.bytes_per_step(scatter, 2, 1) == pytest.approx(sm.bytes_per_step(each, 2, 1))
    assert len(each.factor_calls()) > len(scatter.factor_calls()) == len(scatter.buckets)


@pytest.mark.parametrize(("name", "world"), [("hybrid", 4), ("hybrid", 8), ("comm-opt", 8), ("mem-opt", 8)])
def test_the_busiest_rank_sends_the_most(name: str, world: int) -> None:
    layer_set = sm.resnet50(batch=1)
    config = sm.STRATEGY_CONFIGS[name]
    sent = [sm.bytes_per_step(sm.traffic(layer_set, config, world, rank), 10, 1) for rank in range(world)]
    assert sent[sm.busiest_rank(layer_set, config, world)] == pytest.approx(max(sent), rel=1e-12)


def test_collectives_on_one_rank_cost_nothing_and_the_cheaper_algorithm_is_taken() -> None:
    alpha, beta = 5e-6, 1 / 24e9
    network = sm.Network("test", alpha, beta, frozenset({"allreduce"}))
    for op in ("allreduce", "reduce_scatter", "reduce", "broadcast"):
        assert network.seconds(op, 1e6, 1) == 0.0
    big = 1e9  # bandwidth-bound, 2 ranks: the ring moves 2 (p-1)/p n = n, the tree 2 n
    assert network.seconds("allreduce", big, 2) == pytest.approx(2 * alpha + big * beta)
    # latency-bound, 1024 ranks: the tree's 2 log2(p) steps beat the ring's 2 (p - 1)
    assert network.seconds("allreduce", 8, 1024) == pytest.approx(2 * 10 * alpha + 2 * 8 * beta)
    assert network.seconds("broadcast", 8, 1024) == pytest.approx(1023 * alpha + 8 * beta)  # ring only, as NCCL
    everything = sm.Network("test", alpha, beta, frozenset({"allreduce", "reduce", "broadcast"}))
    assert everything.seconds("broadcast", 8, 1024) == pytest.approx(10 * alpha + 8 * beta)
    assert everything.seconds("reduce_scatter", 8, 1024) == pytest.approx(1023 * alpha + 1023 / 1024 * 8 * beta)


def _synthetic_kernels() -> sm.Kernels:
    """A device with GEMMs at 1 TFLOP/s and decompositions exactly n^3 ns, for tests that need no measurement."""
    cubic = tuple((float(n), n**3 * 1e-9) for n in (16, 256, 4096))
    return sm.Kernels("test", 1, ((2.0, 2e-12), (2e12, 2.0)), cubic, cubic, ((1.0, 1e-9), (1e9, 1.0)), 1e10)


def test_kernel_interpolation_hits_the_points_and_extrapolates() -> None:
    kernels = _synthetic_kernels()
    assert kernels.decompose_s(256, "eigen") == pytest.approx(256**3 * 1e-9)
    assert kernels.decompose_s(1024, "eigen") == pytest.approx(1024**3 * 1e-9)  # log-log between cubic points
    assert kernels.decompose_s(8192, "eigen") == pytest.approx(8192**3 * 1e-9)  # n^3 above the largest
    assert kernels.decompose_s(4, "eigen") == pytest.approx(16**3 * 1e-9)  # the smallest measured: an overhead
    assert kernels.gemm_s(1000, 1000, 1000) == pytest.approx(2e9 / 1e12)
    shared = kernels.scaled(2.0)
    assert shared.gemm_s(1000, 1000, 1000) == pytest.approx(2 * kernels.gemm_s(1000, 1000, 1000))
    assert shared.elementwise_s(1e9) == pytest.approx(2 * kernels.elementwise_s(1e9))


def test_resnet50_decomposition_speedup_reaches_half_of_p_up_to_64_only_with_split() -> None:
    layer_set, kernels = sm.resnet50(), _synthetic_kernels()
    costs = [float(n) ** 3 for pair in resnet50_dims() for n in pair]
    ceiling = sum(costs) / max(costs)  # whole factors cannot beat the largest one
    assert ceiling == pytest.approx(4.63, abs=0.005)
    for world in (8, 16, 32, 64):
        today = sm.speedups(layer_set, world, world, None, kernels)
        split = sm.speedups(layer_set, world, world, 1024, kernels)
        assert today["model"] <= ceiling + 1e-9
        assert today["model"] < world / 2 or world == 8  # 4.63 >= 8 / 2: whole factors fall short from P = 16 on
        assert split["model"] >= world / 2, world
        assert split["model vs today"] > split["model"]  # the block-diagonal approximation also removes work
        assert split["measured"] == pytest.approx(split["model"], rel=1e-6)  # measured "eigh" is exactly n^3 here
    assert sm.speedups(layer_set, 1, 1, 1024, kernels)["work"] == pytest.approx(0.121, abs=0.001)


def test_kaisa_column_without_kfac_pytorch_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kfac.assignment", None)  # import raises ImportError
    value = sm.kaisa_speedup(sm.resnet50(), 8, 1.0, True)
    assert isinstance(value, str) and value.startswith("n/a")


def test_busiest_rank_speedup_is_the_total_over_the_busiest_ranks_work() -> None:
    # The arithmetic of the KAISA columns, which compare kfac-pytorch's assignment (build/peers, not on PyPI, so
    # that comparison runs on demand in benchmarks/, never in CI) with ours on the same costs.
    work = {"l0": {"A": 8.0, "G": 1.0}, "l1": {"A": 1.0, "G": 2.0}}
    by_factor = {"A": 0, "G": 1}
    assert sm.busiest_rank_speedup(work, lambda layer, factor: by_factor[factor], 2) == pytest.approx(12 / 9)
    assert sm.busiest_rank_speedup(work, lambda layer, factor: 0, 4) == 1.0
    resnet = sm.decomposition_work(sm.resnet50())
    slots = {key: i for i, key in enumerate((name, factor) for name in resnet for factor in resnet[name])}
    alone = sm.busiest_rank_speedup(resnet, lambda layer, factor: slots[layer, factor], len(slots))
    assert alone == pytest.approx(4.63, abs=0.005)  # one factor per rank: the largest factor bounds it


def test_async_hides_decompositions_and_split_shrinks_them() -> None:
    layer_set, kernels = sm.resnet50(), _synthetic_kernels()
    network, schedule = sm.infiniband_hdr(), sm.Schedule()
    steps = [
        sm.project(layer_set, sm.Config("comm-opt", **s), 64, kernels, network, schedule) for _, s in sm.stages(1024)
    ]
    today, scatter, asynchronous, split = steps
    assert asynchronous.slowest_s <= scatter.slowest_s and asynchronous.mean_s <= scatter.mean_s
    assert split.parts["decompose"] < asynchronous.parts["decompose"] / 5
    assert asynchronous.parts["shown"] < scatter.parts["shown"]
    assert split.bytes_rank0 < today.bytes_rank0  # blocks send less than whole factors
    assert today.bytes_rank0 == pytest.approx(scatter.bytes_rank0)


def test_layer_sets_are_derived_as_distkfac_sees_them() -> None:
    layer_set = _layer_set(2)
    model = dist_worker.make_model("cnn")
    precond = KFACPreconditioner(model, comm="single")
    assert layer_set.dims == [(x.helper.a_shape, x.helper.g_shape) for x in precond._layers]
    assert layer_set.params == sum(p.numel() for p in model.parameters())
    conv, *linears = layer_set.layers
    assert conv.rows == 24 * 12 * 12 and conv.unfold == conv.rows * 26 and conv.spatial  # 28 -> 12, kernel 5
    assert all(layer.rows == 24 and layer.unfold == 0 for layer in linears)
    resnet = sm.resnet50(batch=1)
    macs = sum(x.rows * x.a.dim * x.g.dim for x in resnet.layers)
    assert macs == pytest.approx(4.09e9, rel=0.01)  # ResNet-50's well-known 4.09 GMACs per 224 x 224 image
    bert = sm.bert_large(batch=1, seq=512)
    per_token = sum(x.a.dim * x.g.dim for x in bert.layers)
    assert per_token == pytest.approx(24 * 12 * 1024**2, rel=0.01)  # 12 h^2 weights per encoder layer
    assert bert.params == pytest.approx(334e6, rel=0.02)  # BERT-Large without pooler and heads


def test_benchmark_output_is_parsed() -> None:
    text = "\n".join(
        [
            "model mlp, global batch 512, 30 timed steps, 1 thread per rank",
            "| P | comm | strategy | bytes/step/rank | vs baseline | factor reductions/step | factor MiB/rank | "
            "decomp. MiB/rank | step ms | vs P=1 | vs gloo |",
            "| 1 | gloo | comm-opt | 0.0 KiB | - | 0.0 | 3.86 | 5.14 | 35.5 | 1.00 | - |",
            "| 2 | MPI | comm-opt | 1.0 KiB | - | 0.0 | 3.86 | 5.14 | 41.0 | 1.00 | - |",
            "| 4 | gloo | hybrid baseline | 8641.4 KiB | 1.00 | 1.0 | 3.86 | 3.37 | 61.8 | - | - |",
        ]
    )
    batch, steps = sm.parse_benchmark(text)
    assert batch == 512
    assert steps == {(1, "comm-opt"): pytest.approx(0.0355), (4, "hybrid baseline"): pytest.approx(0.0618)}
    assert not math.isnan(steps[(1, "comm-opt")])
