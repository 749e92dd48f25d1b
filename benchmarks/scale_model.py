"""A model of one data-parallel K-FAC training step at scale: step time, bytes per step per rank and per-rank K-FAC
memory for each strategy at P = 8 to 4096, for ResNet-50 and BERT-Large layer sets (issue 22, item 4).

Run from the repository root::

    python -m benchmarks.scale_model                          # both layer sets, P = 8 .. 4096, kernels cached
    python -m benchmarks.scale_model --remeasure --threads 2  # measure the kernel table again
    python -m benchmarks.scale_model --device cuda            # kernel times of a GPU
    python -m benchmarks.scale_model --validate               # against benchmarks.distributed at P = 1, 2, 4

Three inputs, combined per step and rank:

1. **Kernel times measured on the local device** (``--device``): GEMM time against its flops, ``eigh`` and
   Cholesky + ``cholesky_inverse`` against the size ``n``, ``F.unfold`` (im2col) against its output elements, and a
   copy bandwidth for elementwise passes. A handful of sizes are timed and interpolated log-log (monotone); above
   the largest size GEMM and unfold scale linearly, the decompositions as ``n^3``. The table is cached as JSON
   under ``runs/`` (git-ignored); ``--remeasure`` times it again.
2. **An alpha-beta network** (``Network``): NCCL's ring and tree formulas, the cheaper of the two per call.
3. **The project's own plans and byte counters**: ``distkfac.assignment.assign_work`` says who decomposes and
   preconditions what; ``FactorExchange``, ``DecompositionExchange`` and ``GradientExchange`` are constructed with a
   stub communicator and their plans (buckets, owners, broadcast lists) give every collective of a rank; each
   collective's bytes are what ``CommStats.record_allreduce`` / ``record_one_way`` count. tests/test_distributed.py
   checks them against real torchrun runs at P = 2 and 4, tests/test_scale_model.py against a real preconditioner
   with a counting communicator: exactly, rank by rank and purpose by purpose.

The "before and after" stages of the issue, cumulative in this order: (0) today: whole factors, synchronous
decompositions, one reduce per owner and bucket; (3) one reduce-scatter per bucket; (1) asynchronous
decompositions (hidden while the busiest worker group's decompositions and their broadcasts fit in
``inv_update_steps`` steps of the rest of the step; the excess shows; the decompositions are one interval stale);
(2) dense factors larger than ``--split-above`` cut into diagonal blocks. docs/benchmarks.md ("K-FAC at scale: a
model") states every assumption and what the model leaves out.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.distributed import resnet50_dims
from distkfac.assignment import WorkAssignment, assign_work, grad_workers_for
from distkfac.comm.base import CommStats, SingleProcessCommunicator
from distkfac.exchange import DecompositionExchange, FactorExchange, GradientExchange
from distkfac.factors import FACTOR_KINDS, FactorBlock, FactorKey, FactorShape, of_kind
from distkfac.layers import helper_for
from distkfac.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
PEERS_DIR = ROOT / "build" / "peers"
WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MIB = 2**20

# ------------------------------------------------------------------------------------------------ kernel times

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


# ------------------------------------------------------------------------------------------------ the network


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


# ------------------------------------------------------------------------------------------------ layer sets


@dataclass(frozen=True)
class Layer:
    """One K-FAC layer's factors and its GEMM rows per rank and step (examples x output positions)."""

    a: FactorShape
    g: FactorShape
    rows: int
    unfold: int = 0  # elements of its im2col matrix (Conv2d), 0 for Linear
    spatial: bool = False  # a conv with a kernel larger than 1 x 1: its forward and backward unfold too


@dataclass(frozen=True)
class LayerSet:
    name: str
    layers: tuple[Layer, ...]
    other_params: int  # parameters outside the K-FAC layers: averaged with the gradients, not preconditioned
    note: str
    extra_gemms: tuple[tuple[int, int, int, int], ...] = ()  # forward (count, m, k, n) outside the layers
    dtype: torch.dtype = torch.float32

    @property
    def dims(self) -> list[tuple[FactorShape, FactorShape]]:
        return [(layer.a, layer.g) for layer in self.layers]

    @property
    def params(self) -> int:
        return sum(layer.a.dim * layer.g.dim for layer in self.layers) + self.other_params


def resnet50_positions() -> list[tuple[int, int]]:
    """(output positions H x W, kernel side) of each layer of ``resnet50_dims()``, in its order, for 224 x 224
    images (torchvision's v1.5: the stride-2 conv of a stage is its first block's 3 x 3; fc has one position)."""
    out = [(112 * 112, 7)]
    side = 56
    for stage, blocks in enumerate((3, 4, 6, 3)):
        for block in range(blocks):
            half = side // 2 if block == 0 and stage > 0 else side
            out += [(side * side, 1), (half * half, 3), (half * half, 1)]
            if block == 0:
                out.append((half * half, 1))  # the projection shortcut
            side = half
    return [*out, (1, 1)]


def resnet50(batch: int = 32) -> LayerSet:
    """ResNet-50's 53 convolutions and fc (ImageNet shapes); batch norms outside K-FAC (their parameters averaged)."""
    layers = []
    for (a, g), (positions, kernel) in zip(resnet50_dims(), resnet50_positions(), strict=True):
        rows = batch * positions
        conv = positions > 1
        layers.append(Layer(FactorShape.dense(a), FactorShape.dense(g), rows, rows * a if conv else 0, kernel > 1))
    batch_norm = 2 * sum(layer.g.dim for layer in layers[:-1])
    note = f"ResNet-50, 224 x 224 images, {batch} per rank; 54 layers (53 conv + fc), batch norms not preconditioned"
    return LayerSet("ResNet-50", tuple(layers), batch_norm, note)


def bert_large(batch: int = 8, seq: int = 512) -> LayerSet:
    """BERT-Large's encoder: 24 layers of Q, K, V, output (1024+1 -> 1024) and FFN (1024+1 -> 4096, 4096+1 -> 1024);
    the attention products are counted as extra GEMMs; embeddings and LayerNorms are not preconditioned (their
    parameters are averaged with the gradients), the pooler and the pre-training heads are left out."""
    hidden, inner, heads, depth, vocab = 1024, 4096, 16, 24, 30522
    shapes = [(hidden + 1, hidden)] * 4 + [(hidden + 1, inner), (inner + 1, hidden)]
    rows = batch * seq
    layers = tuple(Layer(FactorShape.dense(a), FactorShape.dense(g), rows) for _ in range(depth) for a, g in shapes)
    attention = (depth * batch * heads * 2, seq, hidden // heads, seq)  # Q K^T and (softmax) V, per head
    other = (vocab + 512 + 2) * hidden + 2 * hidden + depth * 2 * 2 * hidden  # embeddings, their and 48 LayerNorms
    note = f"BERT-Large encoder, sequence {seq}, {batch} sequences per rank; {len(layers)} Linear layers"
    return LayerSet("BERT-Large", layers, other, note, (attention,))


def layer_set_from_module(name: str, model: nn.Module, example: torch.Tensor, note: str = "") -> LayerSet:
    """The K-FAC layers of ``model`` as distkfac sees them (``helper_for``: factor shapes), with their GEMM rows
    from one forward pass of ``example`` (the per-rank batch)."""
    rows: dict[str, tuple[int, int]] = {}
    hooks = []
    layers: list[tuple[str, Any]] = []
    for module_name, module in model.named_modules():
        helper = helper_for(module)
        if helper is None or not helper.weight.requires_grad:
            continue
        layers.append((module_name, helper))

        def hook(mod: nn.Module, inputs: Any, output: torch.Tensor, key: str = module_name) -> None:
            channels = output.shape[1] if isinstance(mod, nn.Conv2d) else output.shape[-1]
            rows[key] = (output.numel() // channels, int(isinstance(mod, nn.Conv2d)))

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(example)
    for handle in hooks:
        handle.remove()
    out = []
    for module_name, helper in layers:
        count, conv = rows[module_name]
        spatial = bool(conv) and max(getattr(helper.module, "kernel_size", (1,))) > 1
        out.append(Layer(helper.a_shape, helper.g_shape, count, count * helper.a_dim if conv else 0, spatial))
    kfac = sum(layer.a.dim * layer.g.dim for layer in out)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(model.parameters()).dtype
    return LayerSet(name, tuple(out), params - kfac, note or name, dtype=dtype)


# ------------------------------------------------------------------------------------------------ configurations


# Settings that change no buffer's size or count (the intervals go to ``Schedule``; the model to the layer set).
NO_TRAFFIC_SETTINGS = frozenset(
    {"model", "inv_update_steps", "factor_update_steps", "weight_sharing", "conv_factors", "g_scale", "fisher"}
)


@dataclass(frozen=True)
class Schedule:
    """Decompositions every ``inv_update_steps`` steps, factor updates every ``factor_update_steps``."""

    inv_update_steps: int = 10
    factor_update_steps: int = 1


@dataclass(frozen=True)
class Config:
    """What the preconditioner is asked for, and the stage of the issue (``per_owner``, ``asynchronous``,
    ``split_above``)."""

    strategy: str = "comm-opt"
    fraction: float | None = None
    compute_method: str = "eigen"
    damping_form: str | None = None
    reduction: str = "owner"
    pack: bool = True
    overlap: bool = True
    comm_dtype: torch.dtype | None = None
    bucket_cap_mb: float = 8.0
    passes: int = 1
    ddp: bool = False
    per_owner: bool = False  # one reduce per owner and bucket (before item 3), else one reduce-scatter per bucket
    asynchronous: bool = False
    split_above: int | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Config:
        """From ``KFACPreconditioner`` keyword arguments plus ``passes`` and ``ddp`` (tests/dist_worker.py's
        CONFIGS); an unknown key raises, so that a new setting is modelled rather than ignored."""
        names = {
            "strategy": "strategy",
            "grad_worker_fraction": "fraction",
            "compute_method": "compute_method",
            "damping_form": "damping_form",
            "factor_reduction": "reduction",
            "pack_factors": "pack",
            "overlap_comm": "overlap",
            "comm_dtype": "comm_dtype",
            "bucket_cap_mb": "bucket_cap_mb",
            "passes": "passes",
            "ddp": "ddp",
            "split_factors_above": "split_above",
            "async_decompositions": "asynchronous",
        }
        unknown = set(settings) - set(names) - NO_TRAFFIC_SETTINGS
        if unknown:
            raise ValueError(f"scale_model: settings {sorted(unknown)} are not modelled")
        return cls(**{names[key]: value for key, value in settings.items() if key in names})

    @staticmethod
    def schedule_from(settings: Mapping[str, Any], default: Schedule) -> Schedule:
        """The decomposition and factor intervals of ``settings``, ``default``'s where it says none."""
        return Schedule(
            settings.get("inv_update_steps", default.inv_update_steps),
            settings.get("factor_update_steps", default.factor_update_steps),
        )

    def grad_workers(self, world: int) -> int:
        return grad_workers_for(self.strategy, self.fraction, world)


STRATEGY_CONFIGS: dict[str, Config] = {
    "comm-opt": Config("comm-opt"),
    "mem-opt": Config("mem-opt"),
    "hybrid": Config("hybrid", fraction=0.5),
    "KAISA-like baseline": Config("hybrid", fraction=0.5, reduction="allreduce", pack=False, overlap=False),
}


def stages(split_above: int) -> list[tuple[str, dict[str, Any]]]:
    """The issue's stages, cumulative in this order."""
    return [
        ("(0) today", {"per_owner": True}),
        ("(3) one collective per bucket", {}),
        ("(1) + async decompositions", {"asynchronous": True}),
        (f"(2) + split above {split_above}", {"asynchronous": True, "split_above": split_above}),
    ]


@cache
def assignment_for(layer_set: LayerSet, world: int, grad_workers: int, split_above: int | None) -> WorkAssignment:
    return assign_work(layer_set.dims, world, grad_workers, split_above)


def _element(dtype: torch.dtype | None, default: torch.dtype) -> int:
    return torch.empty((), dtype=dtype or default).element_size()


def compute_dtype(layer_set: LayerSet) -> torch.dtype:
    """Decompositions run in float64 for a float64 model, float32 otherwise (``inv_dtype`` unset)."""
    return torch.float64 if layer_set.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ what travels


class PlanComm(SingleProcessCommunicator):
    """All the exchanges read when they build their plans: a rank and a world size. Nothing travels."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size


@dataclass(frozen=True)
class Call:
    """One collective as this rank sees it: its purpose, kind, buffer bytes and group size."""

    purpose: str
    op: str  # allreduce, reduce_scatter, reduce, broadcast
    nbytes: float
    ranks: int

    def record(self, stats: CommStats) -> None:
        """What the communicators count for it (distkfac/comm/base.py)."""
        if self.op == "allreduce":
            stats.record_allreduce(self.purpose, self.nbytes, self.ranks)
        else:
            stats.record_one_way(self.purpose, self.nbytes, self.ranks)


@dataclass
class Traffic:
    """Every collective of one rank, by when it happens."""

    buckets: list[tuple[list[int], list[Call]]] = field(default_factory=list)  # per factor pass, launch order
    averaging: list[Call] = field(default_factory=list)  # every step, without DDP
    gradients: list[Call] = field(default_factory=list)  # every step
    checks: list[Call] = field(default_factory=list)  # decomposition steps: finiteness flags, factor traces
    decompositions: list[Call] = field(default_factory=list)  # decomposition steps: this rank's worker group

    def factor_calls(self) -> list[Call]:
        return [call for _, calls in self.buckets for call in calls]


def _factor_of(layer_set: LayerSet, key: FactorKey) -> FactorShape:
    return of_kind(key.kind, layer_set.dims[key.layer])


def state_numel(layer_set: LayerSet, block: FactorBlock, method: str, damping_form: str | None) -> int:
    """Numbers in the decomposition of one block of a factor (the whole factor when it is not split)."""
    shape = block.shape(_factor_of(layer_set, block.key))
    return sum(math.prod(s) for s in METHODS[method](damping_form).state_shapes(shape))


def _bucket_calls(exchange: FactorExchange, layer_set: LayerSet, config: Config) -> list[tuple[list[int], list[Call]]]:
    """Each bucket's collectives (``FactorExchange.buckets``): the packed blocks of its layers, segment by owner
    (``FactorExchange.units``), reduced in one collective, in one per owner, or allreduced whole."""
    element = _element(config.comm_dtype, layer_set.dtype)
    world = exchange.comm.world_size
    out = []
    for members in exchange.buckets:
        by_owner: dict[int, int] = {}
        for index in members:
            for kind in FACTOR_KINDS:
                for block, owner in exchange.units.get(FactorKey(index, kind), []):
                    numel = block.shape(_factor_of(layer_set, block.key)).numel(config.pack)
                    by_owner[owner] = by_owner.get(owner, 0) + numel
        total = sum(by_owner.values())
        if config.reduction == "allreduce":
            calls = [Call("factors", "allreduce", total * element, world)]
        elif config.per_owner:
            calls = [Call("factors", "reduce", by_owner[r] * element, world) for r in sorted(by_owner) if by_owner[r]]
        else:
            calls = [Call("factors", "reduce_scatter", total * element, world)] if total else []
        out.append((list(members), calls))
    return out


def decomposition_calls(layer_set: LayerSet, config: Config, world: int, rank: int) -> list[Call]:
    """The broadcasts of decompositions that ``rank`` takes part in (``DecompositionExchange.plan``)."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    method = METHODS[config.compute_method](config.damping_form)
    exchange = DecompositionExchange(PlanComm(rank, world), assignment, layer_set.dims, method.state_shapes)
    element = _element(compute_dtype(layer_set), layer_set.dtype)
    calls = []
    for group, _, blocks in exchange.plan:
        numel = sum(state_numel(layer_set, block, config.compute_method, config.damping_form) for block in blocks)
        calls.append(Call("decompositions", "broadcast", numel * element, len(group)))
    return calls


def traffic(layer_set: LayerSet, config: Config, world: int, rank: int) -> Traffic:
    """Every collective ``rank`` of ``world`` takes part in, from the exchanges' plans."""
    if world == 1:
        return Traffic()
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    comm = PlanComm(rank, world)
    factors = FactorExchange(
        comm,
        assignment,
        layer_set.dims,
        comm_dtype=config.comm_dtype,
        bucket_bytes=int(config.bucket_cap_mb * MIB),
        reduction="allreduce" if config.reduction == "allreduce" else "owner",
        pack=config.pack,
    )
    gradients = GradientExchange(comm, assignment, layer_set.dims)
    element = _element(compute_dtype(layer_set), layer_set.dtype)
    shapes = [(layer.g.dim, layer.a.dim) for layer in layer_set.layers]
    out = Traffic(buckets=_bucket_calls(factors, layer_set, config))
    for _, layers in gradients.plan:
        numel = sum(shapes[i][0] * shapes[i][1] for i in layers) + len(layers)  # V and one <V, grad> per layer
        out.gradients.append(Call("gradients", "broadcast", numel * element, len(gradients.receivers)))
    if not config.ddp:
        out.averaging.append(
            Call("gradient averaging", "allreduce", layer_set.params * layer_set.dtype.itemsize, world)
        )
    flags = 2 * len(layer_set.layers)
    out.checks.append(Call("finiteness check", "allreduce", flags * 4, world))  # int32 flags
    method = METHODS[config.compute_method](config.damping_form)
    if method.shifts_at_decomposition and method.damping_form == "factored-pi":
        out.checks.append(Call("factor traces", "allreduce", flags * 8, world))  # float64 tr F / dim F
    out.decompositions = decomposition_calls(layer_set, config, world, rank)
    return out


def run_stats(
    traffic: Traffic, steps: int, schedule: Schedule, passes: int = 1, asynchronous: bool = False
) -> CommStats:
    """What a rank's communicator counts over ``steps`` steps of ``KFACPreconditioner.step()``. Asynchronously, the
    first decompositions are shared at once and later ones one interval late, so the second decomposition step
    shares nothing."""
    stats = CommStats()
    decomposition_steps = [s for s in range(steps) if s % schedule.inv_update_steps == 0]
    for step in range(steps):
        calls = list(traffic.averaging)
        if step % schedule.factor_update_steps == 0:
            calls += traffic.factor_calls() * passes  # each pass launches every bucket
        if step in decomposition_steps:
            calls += traffic.checks
            if not (asynchronous and decomposition_steps.index(step) == 1):
                calls += traffic.decompositions
        for call in calls + traffic.gradients:
            call.record(stats)
    return stats


def bytes_per_step(traffic: Traffic, inv_update_steps: int, factor_update_steps: int) -> float:
    """Bytes a rank sends per step, on average (CommStats' counting)."""

    def total(calls: Iterable[Call]) -> float:
        stats = CommStats()
        for call in calls:
            call.record(stats)
        return stats.total_bytes()

    return (
        total(traffic.averaging + traffic.gradients)
        + total(traffic.factor_calls()) / factor_update_steps
        + total(traffic.checks + traffic.decompositions) / inv_update_steps
    )


def busiest_rank(layer_set: LayerSet, config: Config, world: int) -> int:
    """The first member of the worker group with the largest decomposition broadcasts. Ranks differ in nothing else:
    factor reductions, gradient averaging and the checks span the world, and every receiver group holds one member of
    each worker group, so the gradient broadcasts have the same sizes in every receiver group."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    per_group: dict[tuple[int, ...], float] = {}
    for block, _ in assignment.blocks:
        group = assignment.layers[block.key.layer].grad_workers
        if len(group) > 1:
            numel = state_numel(layer_set, block, config.compute_method, config.damping_form)
            per_group[group] = per_group.get(group, 0.0) + numel
    return max(per_group, key=lambda g: (per_group[g], -g[0]))[0] if per_group else 0


def memory_per_rank(layer_set: LayerSet, config: Config, world: int) -> list[float]:
    """K-FAC bytes each rank keeps, as ``KFACPreconditioner.memory_bytes`` counts them: running factors (whole on
    their owner, or everywhere when allreduced; a split factor as the owned blocks side by side, an ``m x m`` matrix
    with ``m`` their summed sides) and, on a layer's gradient workers, the decompositions (whole-sized: a split
    factor's blocks fill their diagonal blocks) and the gradient."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    factor_element, state_element = layer_set.dtype.itemsize, compute_dtype(layer_set).itemsize
    method = METHODS[config.compute_method](config.damping_form)
    sides: dict[FactorKey, dict[int, int]] = {}  # factor -> owner -> summed side of its blocks
    for block, owner in assignment.blocks:
        owned = sides.setdefault(block.key, {})
        owned[owner] = owned.get(owner, 0) + block.size
    out = [0.0] * world
    for key, owned in sides.items():
        whole = math.prod(_factor_of(layer_set, key).tensor_shape) * factor_element
        if config.reduction == "allreduce" or world == 1:
            for rank in range(world):
                out[rank] += whole
            continue
        for rank, side in owned.items():
            out[rank] += (
                whole if len(owned) == 1 and side == _factor_of(layer_set, key).dim else side * side * factor_element
            )
    group_bytes: dict[tuple[int, ...], float] = {}
    for layer, work in zip(layer_set.layers, assignment.layers, strict=True):
        states = sum(math.prod(s) for shape in (layer.a, layer.g) for s in method.state_shapes(shape))
        stacked = float(states + layer.a.dim * layer.g.dim) * state_element
        group_bytes[work.grad_workers] = group_bytes.get(work.grad_workers, 0.0) + stacked
    for group, kept in group_bytes.items():
        for rank in group:
            out[rank] += kept
    return out


# ------------------------------------------------------------------------------------------------ step time


@dataclass(frozen=True)
class LayerTimes:
    """Seconds of one layer's kernels per rank and step."""

    forward: float
    backward: float
    a_factor: float  # on factor-update steps, in the forward hook
    g_factor: float  # on factor-update steps, in the backward hook


def layer_times(layer: Layer, kernels: Kernels) -> LayerTimes:
    """Forward ``rows x a x g``, backward ``rows x g x a`` and ``a x rows x g``, factors ``a x rows x a`` and
    ``g x rows x g``; a conv's im2col (``F.unfold``) once for A, and in forward and backward for kernels > 1 x 1."""
    m, a, g = layer.rows, layer.a.dim, layer.g.dim
    unfold = kernels.unfold_s(layer.unfold)
    conv = unfold if layer.spatial else 0.0
    return LayerTimes(
        forward=kernels.gemm_s(m, a, g) + conv,
        backward=kernels.gemm_s(m, g, a) + kernels.gemm_s(a, m, g) + conv,
        a_factor=kernels.gemm_s(a, m, a) + unfold,
        g_factor=kernels.gemm_s(g, m, g),
    )


def precondition_s(layer: Layer, kernels: Kernels, method: str) -> float:
    """``Q_G^T grad Q_A`` and back (eigen: two GEMM pairs; inverse: one). Whole-sized for split factors too: their
    blocks are stored in whole ``n x n`` bases (zero outside the blocks), so the products are dense."""
    pairs = 2 if method == "eigen" else 1
    a, g = layer.a.dim, layer.g.dim
    return pairs * (kernels.gemm_s(g, g, a) + kernels.gemm_s(g, a, a))


def _network_s(network: Network, calls: Iterable[Call]) -> float:
    return sum(network.seconds(call.op, call.nbytes, call.ranks) for call in calls)


def exposed_factor_s(
    buckets: Sequence[tuple[list[int], list[Call]]], backward: Sequence[float], forward_s: float, network: Network,
    overlap: bool,
) -> float:  # fmt: skip
    """Seconds the factor reductions add after the backward pass. A bucket starts once the backward pass has passed
    all its layers (they run last to first), one bucket at a time on the network; without overlap all start after."""
    done: dict[int, float] = {}
    clock = forward_s
    for index in reversed(range(len(backward))):
        clock += backward[index]
        done[index] = clock
    free = 0.0
    for layers, calls in buckets:
        start = max(max(done[i] for i in layers) if overlap else clock, free)
        free = start + _network_s(network, calls)
    return max(0.0, free - clock)


@dataclass(frozen=True)
class Projection:
    """One configuration at one world size: step times (s), bytes per step, memory, and where the time goes."""

    normal_s: float  # a step without decompositions (mean over factor- and other steps)
    slowest_s: float  # a decomposition step
    mean_s: float
    bytes_rank0: float
    bytes_busiest: float
    busiest: int
    memory_bytes: float  # the fullest rank's K-FAC memory
    parts: dict[str, float]


def _compute_parts(layer_set: LayerSet, config: Config, world: int, kernels: Kernels) -> dict[str, Any]:
    """Forward/backward/factor seconds, per-group preconditioning and per-rank decomposition seconds."""
    assignment = assignment_for(layer_set, world, config.grad_workers(world), config.split_above)
    times = [layer_times(layer, kernels) for layer in layer_set.layers]
    extra = sum(count * kernels.gemm_s(m, k, n) for count, m, k, n in layer_set.extra_gemms)
    decompose = [0.0] * world
    for block, owner in assignment.blocks:
        decompose[owner] += kernels.decompose_s(block.size, config.compute_method)
    precondition: dict[tuple[int, ...], float] = {}
    for layer, work in zip(layer_set.layers, assignment.layers, strict=True):
        seconds = precondition_s(layer, kernels, config.compute_method)
        precondition[work.grad_workers] = precondition.get(work.grad_workers, 0.0) + seconds
    return {
        "assignment": assignment,
        "forward": sum(t.forward for t in times) + extra,
        "backward": [t.backward for t in times],
        "extra_backward": 2 * extra,
        "a_factors": sum(t.a_factor for t in times),
        "g_factors": [t.g_factor for t in times],
        "precondition": precondition,
        "decompose": decompose,
    }


def _elementwise_s(layer_set: LayerSet, config: Config, world: int, kernels: Kernels) -> tuple[float, float]:
    """(every step, factor steps) seconds of elementwise passes: optimizer and gradient copies (5 passes over the
    parameters, 3 more when averaging), preconditioning's copies and divide (8 over each gradient), the running
    average (3 over the fullest rank's factors) and packing for the exchange (4 over every factor sent)."""
    element = layer_set.dtype.itemsize
    passes = 5 + (3 if world > 1 and not config.ddp else 0)
    every = passes * layer_set.params * element + 8 * sum(x.a.dim * x.g.dim for x in layer_set.layers) * element
    factors = sum(x.a.dim**2 + x.g.dim**2 for x in layer_set.layers) * element
    owned = factors if config.reduction == "allreduce" or world == 1 else max(factors / world, 0.0)
    factor_steps = 3 * owned + (4 * factors if world > 1 else 0.0)
    return kernels.elementwise_s(every), kernels.elementwise_s(factor_steps)


def project(
    layer_set: LayerSet, config: Config, world: int, kernels: Kernels, network: Network, schedule: Schedule
) -> Projection:
    """The projected step of ``config`` at ``world`` ranks (weak scaling: ``layer_set`` holds one rank's batch).

    A factor step: forward (with A), backward (with G) while the factor buckets reduce, the exposed rest of the
    reductions, gradient averaging, preconditioning (the slowest worker group), the gradient broadcasts and the
    elementwise passes. A decomposition step adds the checks and the slowest worker group's decompositions and
    broadcasts (asynchronously, only what does not fit in ``inv_update_steps`` steps)."""
    parts = _compute_parts(layer_set, config, world, kernels)
    busiest = busiest_rank(layer_set, config, world)
    mine, theirs = traffic(layer_set, config, world, 0), traffic(layer_set, config, world, busiest)
    every_s, factor_elementwise_s = _elementwise_s(layer_set, config, world, kernels)
    backward = [b + g for b, g in zip(parts["backward"], parts["g_factors"], strict=True)]
    forward = parts["forward"] + parts["a_factors"]
    shown = {
        "compute": forward + sum(backward) + parts["extra_backward"],
        "factor comm": exposed_factor_s(mine.buckets, backward, forward, network, config.overlap),
        "averaging": _network_s(network, mine.averaging),
        "precondition": max(parts["precondition"].values(), default=0.0),
        "gradient comm": _network_s(network, mine.gradients),
        "elementwise": every_s + factor_elementwise_s,
    }
    factor_step = sum(shown.values())
    plain_step = parts["forward"] + sum(parts["backward"]) + parts["extra_backward"] + every_s  # no factors
    plain_step += shown["averaging"] + shown["precondition"] + shown["gradient comm"]
    fus, inv = schedule.factor_update_steps, schedule.inv_update_steps
    normal = ((fus - 1) * plain_step + factor_step) / fus
    decompose, broadcasts = _decomposition_s(layer_set, config, world, parts, network)
    checks = _network_s(network, mine.checks)
    late = max(0.0, decompose + broadcasts - inv * normal) if config.asynchronous else decompose + broadcasts
    shown.update({"decompose": decompose, "decomposition comm": broadcasts, "checks": checks, "shown": late})
    return Projection(
        normal_s=normal,
        slowest_s=factor_step + checks + late,
        mean_s=normal + (checks + late) / inv,
        bytes_rank0=bytes_per_step(mine, inv, fus),
        bytes_busiest=bytes_per_step(theirs, inv, fus),
        busiest=busiest,
        memory_bytes=max(memory_per_rank(layer_set, config, world)),
        parts=shown,
    )


def _decomposition_s(
    layer_set: LayerSet, config: Config, world: int, parts: Mapping[str, Any], network: Network
) -> tuple[float, float]:
    """(decompositions, broadcasts) seconds of the slowest worker group: its busiest member's decompositions, then
    the group's broadcasts one after the other."""
    assignment: WorkAssignment = parts["assignment"]
    decompose: list[float] = parts["decompose"]
    slowest = (0.0, 0.0)
    for group in assignment.worker_groups:
        calls = decomposition_calls(layer_set, config, world, group[0]) if len(group) > 1 else []
        candidate = (max(decompose[r] for r in group), _network_s(network, calls))
        slowest = max(slowest, candidate, key=sum)
    return slowest


# ------------------------------------------------------------------------------------------ decomposition speed-up


def speedups(layer_set: LayerSet, world: int, grad_workers: int, split_above: int | None, kernels: Kernels) -> dict:
    """Decomposition speed-up over one rank: all the work over the busiest rank's, under the ``n^3`` model and with
    the measured eigh times; for split factors also against today's unsplit work at one rank."""
    today = assignment_for(layer_set, 1, 1, None)
    work = assignment_for(layer_set, world, grad_workers, split_above)
    measured = [0.0] * world
    for block, owner in work.blocks:
        measured[owner] += kernels.decompose_s(block.size, "eigen")
    whole_s = sum(kernels.decompose_s(block.size, "eigen") for block, _ in today.blocks)
    return {
        "model": work.decomposition_speedup(),
        "model vs today": sum(today.loads) / max(work.loads),
        "measured": sum(measured) / max(measured),
        "measured vs today": whole_s / max(measured),
        "work": sum(work.loads) / sum(today.loads),
    }


def kaisa_speedup(layer_set: LayerSet, world: int, fraction: float, colocate: bool) -> float | str:
    """kfac-pytorch's ``KAISAAssignment`` on the same layers and ``n^3`` costs: sum of costs over the busiest rank's;
    a short reason instead where kfac-pytorch (build/peers) cannot be imported."""
    if str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))  # last: its "examples" package must not shadow anything
    warnings.filterwarnings("ignore", message="NVIDIA Apex is not installed", category=UserWarning)
    try:
        from kfac.assignment import KAISAAssignment
    except Exception as error:  # ImportError, or anything its import runs into
        return f"n/a ({type(error).__name__}: kfac-pytorch not importable from {PEERS_DIR})"
    work = decomposition_work(layer_set)
    assignment = KAISAAssignment(
        work,
        local_rank=0,
        world_size=world,
        grad_worker_fraction=fraction,
        group_func=lambda ranks: None,
        colocate_factors=colocate,
    )
    return busiest_rank_speedup(work, assignment.inv_worker, world)


def decomposition_work(layer_set: LayerSet) -> dict[str, dict[str, float]]:
    """Each layer's ``A`` and ``G`` decomposition costs (``n^3``), keyed as kfac-pytorch's assignments take them."""
    return {f"layer{i}": {"A": float(x.a.dim) ** 3, "G": float(x.g.dim) ** 3} for i, x in enumerate(layer_set.layers)}


def busiest_rank_speedup(work: dict[str, dict[str, float]], owner: Callable[[str, str], int], world: int) -> float:
    """The sum of all costs over the busiest rank's, where ``owner(layer, factor)`` is the rank that decomposes it."""
    loads = [0.0] * world
    for layer, factors in work.items():
        for factor, cost in factors.items():
            loads[owner(layer, factor)] += cost
    return sum(loads) / max(loads)


def _cell(value: float | str, digits: int = 2) -> str:
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def speedup_table(
    layer_set: LayerSet, worlds: Sequence[int], split_above: int, fraction: float, kernels: Kernels
) -> list[str]:
    rows = [
        f"Decomposition speed-up over one rank (sum of costs / busiest rank's), split above {split_above} where "
        f"said; split work at one rank = {speedups(layer_set, 1, 1, split_above, kernels)['work']:.1%} of the "
        "unsplit (n^3):",
        "",
        "| P | P/2 | comm-opt today, n^3 | comm-opt split, n^3 (vs split at 1 rank) | vs today at 1 rank | "
        "comm-opt today, eigh | split, eigh | split, eigh vs today at 1 rank | hybrid today / split, n^3 | "
        "mem-opt today / split, n^3 | KAISA comm-opt, colocated (default) | KAISA comm-opt, per factor | "
        "KAISA hybrid, colocated |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world in worlds:
        today, split = (
            speedups(layer_set, world, world, None, kernels),
            speedups(layer_set, world, world, split_above, kernels),
        )
        hybrid = [speedups(layer_set, world, round(world * fraction), s, kernels)["model"] for s in (None, split_above)]
        memopt = [speedups(layer_set, world, 1, s, kernels)["model"] for s in (None, split_above)]
        kaisa = [kaisa_speedup(layer_set, world, f, c) for f, c in ((1.0, True), (1.0, False), (fraction, True))]
        mark = " (>= P/2)" if split["model"] >= world / 2 else ""
        rows.append(
            f"| {world} | {world / 2:g} | {today['model']:.2f} | {split['model']:.2f}{mark} | "
            f"{split['model vs today']:.1f} | {today['measured']:.2f} | {split['measured']:.2f} | "
            f"{split['measured vs today']:.1f} | {hybrid[0]:.2f} / {hybrid[1]:.2f} | "
            f"{memopt[0]:.2f} / {memopt[1]:.2f} | " + " | ".join(_cell(k) for k in kaisa) + " |"
        )
    return rows


# ------------------------------------------------------------------------------------------------ step tables


def step_table(
    layer_set: LayerSet,
    worlds: Sequence[int],
    kernels: Kernels,
    network: Network,
    schedule: Schedule,
    split_above: int,
    fraction: float,
) -> list[str]:
    """Per P and strategy: slowest / mean step at each stage, bytes per step per rank, K-FAC memory per rank."""
    stage_list = stages(split_above)
    rows = [
        "Step time in ms, slowest (a decomposition step) / mean, at each stage (cumulative, left to right); bytes per "
        "step per rank (rank 0 / busiest rank) and the fullest rank's K-FAC memory, today and split:",
        "",
        "| P | strategy | " + " | ".join(name for name, _ in stage_list) + " | MiB/step/rank today (0 / busiest) | "
        "MiB/step/rank split | K-FAC MiB/rank today | split |",
        "|---:|---|" + "---:|" * (len(stage_list) + 4),
    ]
    configs = dict(STRATEGY_CONFIGS)
    configs["hybrid"] = replace(configs["hybrid"], fraction=fraction)
    configs["KAISA-like baseline"] = replace(configs["KAISA-like baseline"], fraction=fraction)
    for world in worlds:
        for name, base in configs.items():
            baseline = base.reduction == "allreduce"
            steps = [project(layer_set, replace(base, **s), world, kernels, network, schedule) for _, s in stage_list]
            if baseline:  # no stages: full factors allreduced, synchronous, whole
                steps = [project(layer_set, base, world, kernels, network, schedule)] * len(stage_list)
            cells = [f"{p.slowest_s * 1e3:.0f} / {p.mean_s * 1e3:.0f}" for p in steps]
            today, split = steps[0], steps[-1]
            rows.append(
                f"| {world} | {name} | " + " | ".join(cells) + f" | {today.bytes_rank0 / MIB:.1f} / "
                f"{today.bytes_busiest / MIB:.1f} (rank {today.busiest}) | {split.bytes_rank0 / MIB:.1f} / "
                f"{split.bytes_busiest / MIB:.1f} | {today.memory_bytes / MIB:.0f} | {split.memory_bytes / MIB:.0f} |"
            )
    return rows


BREAKDOWN = (
    ("compute", "forward + backward + factors"),
    ("factor comm", "factor reductions, exposed"),
    ("averaging", "gradient averaging"),
    ("precondition", "preconditioning"),
    ("gradient comm", "gradient broadcasts"),
    ("elementwise", "elementwise"),
    ("checks", "checks"),
    ("decompose", "decompositions"),
    ("decomposition comm", "their broadcasts"),
    ("shown", "decompositions shown"),
)


def breakdown_table(
    layer_set: LayerSet,
    worlds: Sequence[int],
    kernels: Kernels,
    network: Network,
    schedule: Schedule,
    split_above: int,
    fraction: float,
) -> list[str]:
    """Where a decomposition step's time goes (ms), today and with every stage, for a few world sizes."""
    rows = [
        "Where a decomposition step's time goes, in ms (the slowest worker group's decompositions and broadcasts; "
        "'shown' is what the step waits for):",
        "",
        "| P | strategy | stage | " + " | ".join(title for _, title in BREAKDOWN) + " |",
        "|---:|---|---|" + "---:|" * len(BREAKDOWN),
    ]
    first, *_, last = stages(split_above)
    for world in worlds:
        for name, base in STRATEGY_CONFIGS.items():
            base = replace(base, fraction=fraction) if base.fraction is not None else base
            chosen = [first] if base.reduction == "allreduce" else [first, last]
            for stage, settings in chosen:
                parts = project(layer_set, replace(base, **settings), world, kernels, network, schedule).parts
                cells = " | ".join(f"{parts[key] * 1e3:.1f}" for key, _ in BREAKDOWN)
                rows.append(f"| {world} | {name} | {stage.split(' ')[0]} | {cells} |")
    return rows


# ------------------------------------------------------------------------------------------------ validation


def loopback_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of ``world`` gloo ranks timing allreduces of 4 B to 4 MiB over loopback (rank 0 writes the medians)."""
    import torch.distributed as dist

    from distkfac.comm import leave

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    medians = {}
    for numel in (1, 1024, 16384, 262144, 1048576):
        buffer = torch.zeros(numel)
        for _ in range(3):
            dist.all_reduce(buffer)
        times = []
        for _ in range(15):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - start)
        medians[4 * numel] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(medians))
    leave(0)  # gloo can abort at exit in torch 2.13 (distkfac.comm.leave)


def measure_loopback(world: int, out: Path) -> Network:
    """alpha and beta of gloo over loopback at ``world`` ranks, from an allreduce sweep read as a ring's
    ``2(p-1) alpha + 2(p-1)/p n beta``: the smallest message gives alpha, the slope beta."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from benchmarks.scale_model import loopback_worker as w; w(int(sys.argv[1]), {}, {}, {!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code.format(world, port, str(out))]
    procs = [subprocess.Popen([*command, str(rank)], cwd=ROOT, env=env) for rank in range(world)]
    if any(proc.wait(timeout=300) for proc in procs):
        raise SystemExit("scale_model: the gloo loopback measurement failed")
    points = sorted((float(n), t) for n, t in json.loads(out.read_text()).items())
    (small, t_small), (large, t_large) = points[0], points[-1]
    steps = 2 * (world - 1)
    beta = max(t_large - t_small, 0.0) / (large - small) / (steps / world)
    name = f"gloo over loopback, {world} ranks (allreduce of {small:.0f} B to {large:.0f} B)"
    return Network(name, t_small / steps, beta, frozenset())


SHARED_GEMM = """
import sys, time, torch
torch.set_num_threads(1)
a, b = torch.randn(384, 384), torch.randn(384, 384)
start = float(sys.argv[1])
while time.time() < start:
    a @ b
count, began = 0, time.perf_counter()
while time.perf_counter() - began < 2.0:
    a @ b
    count += 1
print((time.perf_counter() - began) / count)
"""


def measure_sharing(worlds: Iterable[int]) -> dict[int, float]:
    """How many times slower a 1-thread GEMM runs while ``P`` processes run it at once, for each ``P``: the ranks of
    a loopback run share this machine's cores, caches and memory bandwidth (and whatever else runs on it)."""
    per_call = {}
    for world in sorted({1, *worlds}):
        start = str(time.time() + 4.0)  # every process imports torch first, then all start together
        command = [sys.executable, "-c", SHARED_GEMM, start]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(world)]
        per_call[world] = statistics.mean(float(proc.communicate(timeout=120)[0]) for proc in procs)
    return {world: seconds / per_call[1] for world, seconds in per_call.items()}


def parse_benchmark(text: str) -> tuple[int, dict[tuple[int, str], float]]:
    """benchmarks.distributed's printout: the global batch, and the median step seconds of its gloo rows."""
    found = re.search(r"global batch (\d+)", text)
    if not found:
        raise ValueError("scale_model: no 'global batch' in the benchmark's output")
    steps = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0].isdigit() and cells[1] == "gloo":
            steps[(int(cells[0]), cells[2])] = float(cells[8]) / 1e3
    return int(found.group(1)), steps


def validate(measured: Path | None, remeasure: bool) -> list[str]:
    """The model against ``python -m benchmarks.distributed --worlds 1,2,4 --skip-balance`` (run here unless
    ``measured`` holds its output): the benchmark's MLP, 1 thread per rank, loopback gloo; the benchmark reports the
    median step, a step without decompositions (9 in 10 steps), so that is what is compared."""
    from benchmarks.distributed import BASELINE, STRATEGIES
    from benchmarks.step_time import build_model

    RUNS.mkdir(exist_ok=True)
    if measured is None:
        measured = RUNS / "scale_model_validation_benchmark.txt"
        command = [sys.executable, "-m", "benchmarks.distributed", "--worlds", "1,2,4", "--skip-balance"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
        if result.returncode:
            raise SystemExit(f"scale_model: the benchmark failed:\n{result.stderr[-3000:]}")
        measured.write_text(result.stdout)
    batch, steps = parse_benchmark(measured.read_text())
    kernels = kernels_for("cpu", 1, None, remeasure)
    worlds = sorted({world for world, _ in steps})
    networks = {w: measure_loopback(w, RUNS / f"scale_model_loopback-{w}.json") for w in worlds if w > 1}
    sharing = measure_sharing(worlds)
    rows = [
        f"Validation against {measured.relative_to(ROOT) if measured.is_relative_to(ROOT) else measured} (benchmark "
        f"MLP, global batch {batch}, 1 thread per rank, {os.cpu_count()} cores). The P ranks share this machine: "
        "every kernel time is multiplied by how much slower a 1-thread GEMM runs while P processes run it at once ("
        + ", ".join(f"P = {w}: {sharing[w]:.2f}" for w in worlds)
        + "). Loopback gloo, ring formulas, measured at each P: "
        + "; ".join(f"P = {w}: alpha {n.alpha * 1e6:.1f} us, {1e-9 / n.beta:.2f} GB/s" for w, n in networks.items())
        + ".",
        "",
        "| P | strategy | measured median step ms | model ms | model / measured - 1 |",
        "|---:|---|---:|---:|---:|",
    ]
    for (world, name), seconds in sorted(steps.items()):
        baseline = name.endswith(" baseline")
        config = Config.from_settings({**STRATEGIES[name.removesuffix(" baseline")], **(BASELINE if baseline else {})})
        layer_set = layer_set_from_module("MLP", build_model("mlp"), torch.zeros(batch // world, 784))
        network = networks.get(world, Network("none", 0.0, 0.0))
        projected = project(layer_set, config, world, kernels.scaled(sharing[world]), network, Schedule(10, 1))
        predicted = projected.normal_s
        rows.append(
            f"| {world} | {name} | {seconds * 1e3:.1f} | {predicted * 1e3:.1f} | {predicted / seconds - 1:+.1%} |"
        )
    return rows


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="resnet50,bert-large", help="comma-separated: resnet50, bert-large")
    parser.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="world sizes P")
    parser.add_argument("--device", default="cpu", help="where the kernels are timed: cpu, cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for the kernels")
    parser.add_argument("--kernels", type=Path, help="kernel table JSON (default runs/scale_model_kernels-...)")
    parser.add_argument("--remeasure", action="store_true", help="time the kernels again (else the cached table)")
    parser.add_argument("--alpha-us", type=float, default=5.0, help="network latency per message step (us)")
    parser.add_argument("--bandwidth-gbs", type=float, default=24.0, help="per-rank network bandwidth (GB/s)")
    parser.add_argument(
        "--tree", choices=["allreduce", "all"], default="allreduce",
        help="collectives that may take a tree: allreduce only (NCCL: reduce and broadcast are rings), or all "
        "(reduce and broadcast too, as MPI libraries do)",
    )  # fmt: skip
    parser.add_argument("--breakdown-worlds", default="64,4096", help="world sizes of the time breakdown ('' none)")
    parser.add_argument("--inv-update-steps", type=int, default=10)
    parser.add_argument("--factor-update-steps", type=int, default=1)
    parser.add_argument("--split-above", type=int, default=1024, help="stage (2): split dense factors above this")
    parser.add_argument("--hybrid-fraction", type=float, default=0.5, help="gradient workers per layer / P")
    parser.add_argument("--resnet-batch", type=int, default=32, help="images per rank")
    parser.add_argument("--bert-batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--bert-seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--validate", action="store_true", help="compare with benchmarks.distributed at P = 1, 2, 4")
    parser.add_argument("--measured", type=Path, help="with --validate: that benchmark's saved output, not a new run")
    return parser.parse_args(argv)


def _header(args: argparse.Namespace, kernels: Kernels, network: Network) -> list[str]:
    from benchmarks.step_time import cpu_model

    peak = max(flops / seconds for flops, seconds in kernels.gemm) / 1e9
    eigh = ", ".join(f"{n:.0f}: {s * 1e3:.1f} ms" for n, s in kernels.eigh if n >= 256)
    return [
        f"command: python -m benchmarks.scale_model {shlex.join(sys.argv[1:])}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}",
        f"kernels: {kernels.device}, {kernels.threads} threads, float32: best GEMM {peak:.0f} GFLOP/s, eigh {eigh}, "
        f"copy {kernels.copy_bytes_per_s / 1e9:.1f} GB/s",
        f"network (our assumption): {network.name}; beta = 1 / bandwidth; per call the cheaper of ring and tree "
        f"(tree for: {', '.join(sorted(network.tree))}; reduce-scatter ring only)",
        f"schedule: factors every {args.factor_update_steps} step(s), decompositions every {args.inv_update_steps} "
        "steps; eigen; float32 model, factors, decompositions and communication; 8 MiB buckets; no DDP (the "
        "preconditioner averages the gradients); hybrid and the KAISA-like baseline with "
        f"grad_worker_fraction {args.hybrid_fraction:g}",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.validate:
        print(f"command: python -m benchmarks.scale_model {shlex.join(sys.argv[1:])}\n")
        print("\n".join(validate(args.measured, args.remeasure)))
        return
    kernels = kernels_for(args.device, args.threads, args.kernels, args.remeasure)
    network = infiniband_hdr(args.alpha_us, args.bandwidth_gbs, args.tree)
    schedule = Schedule(args.inv_update_steps, args.factor_update_steps)
    worlds = [int(w) for w in args.worlds.split(",")]
    makers = {
        "resnet50": lambda: resnet50(args.resnet_batch),
        "bert-large": lambda: bert_large(args.bert_batch, args.bert_seq),
    }
    print("\n".join(_header(args, kernels, network)))
    for name in args.sets.split(","):
        layer_set = makers[name]()
        print(f"\n### {layer_set.note}\n")
        print("\n".join(speedup_table(layer_set, worlds, args.split_above, args.hybrid_fraction, kernels)))
        print()
        common = (kernels, network, schedule, args.split_above, args.hybrid_fraction)
        print("\n".join(step_table(layer_set, worlds, *common)))
        breakdown = [int(w) for w in args.breakdown_worlds.split(",") if w]
        if breakdown:
            print("\n" + "\n".join(breakdown_table(layer_set, breakdown, *common)), flush=True)


if __name__ == "__main__":
    main()
