"""What travels between ranks in a K-FAC step, and when. Each exchange is a plan fixed at construction (identical
on every rank) plus explicit collectives through the communicator.

- ``FactorExchange``: each pass's batch factors are packed (upper triangles of the symmetric matrices) into static
  buckets in backward order. A bucket is launched as soon as its last layer's G is captured, so reductions overlap
  the rest of the backward pass; buckets launch strictly in order, like DDP's, so every rank issues the same
  collectives in the same order. Each factor is reduced only to the rank that decomposes it, so a rank keeps the
  running averages of its own factors only (about 1/P of them). A factor split into diagonal blocks
  (``split_factors_above``) travels as its blocks, each to its own owner; the entries outside the blocks never travel.
- ``DecompositionExchange``: the owner of a factor (or of a block) broadcasts its decomposition to the other gradient
  workers of the layer (all ranks for comm-opt, nobody for mem-opt).
- ``GradientExchange``: each gradient worker broadcasts the preconditioned gradients it computed to its receiver group
  (everyone for mem-opt, nobody for comm-opt), with each layer's ``<V, grad>`` for the KL clip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from distkfac.assignment import WorkAssignment
from distkfac.comm.base import Communicator, Pending
from distkfac.factors import FACTOR_KINDS, FactorBlock, FactorKey, FactorKind, FactorShape, Structure, of_kind

__all__ = [
    "DecompositionExchange",
    "FactorExchange",
    "GradientExchange",
    "Shipment",
    "SymmetricPacking",
    "packed_size",
]


def packed_size(n: int, pack: bool) -> int:
    return n * (n + 1) // 2 if pack else n * n


class SymmetricPacking:
    """Factors as flat vectors and back: symmetric matrices (and unit-wise blocks) as their upper triangles, row by
    row (or whole, when ``packed`` is off); diagonal factors as they are.

    The index tensors are made once per size and device and kept here, by the exchange that packs.
    """

    def __init__(self, packed: bool = True) -> None:
        self.packed = packed
        self._indices: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def size(self, n: int) -> int:
        """How many numbers an ``n x n`` matrix takes."""
        return packed_size(n, self.packed)

    def _triangle(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions of the upper triangle of an ``n x n`` matrix, row by row, and of its mirror image."""
        key = (n, device)
        if key not in self._indices:
            rows, cols = torch.triu_indices(n, n, device=device)
            self._indices[key] = (rows * n + cols, cols * n + rows)
        return self._indices[key]

    def pack_factor(self, factor: torch.Tensor, shape: FactorShape) -> torch.Tensor:
        """Any structure's factor as a flat vector of ``shape.numel(packed)`` numbers."""
        if shape.structure is Structure.DENSE:
            return self.pack(factor)
        if shape.structure is Structure.BLOCKS and self.packed:
            return torch.stack([factor[:, 0, 0], factor[:, 0, 1], factor[:, 1, 1]], 1).reshape(-1)
        return factor.reshape(-1)

    def unpack_factor(self, flat: torch.Tensor, shape: FactorShape, dtype: torch.dtype) -> torch.Tensor:
        if shape.structure is Structure.DENSE:
            return self.unpack(flat, shape.dim, dtype)
        values = flat.to(dtype)
        if shape.structure is Structure.BLOCKS and self.packed:
            upper = values.view(shape.dim, 3)
            return torch.stack([upper[:, :2], upper[:, 1:]], 1)
        return values.view(shape.tensor_shape).clone()

    def pack(self, matrix: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return matrix.reshape(-1)
        upper, _ = self._triangle(matrix.shape[0], matrix.device)
        # 1-D index_select/index_copy_ are several times faster than 2-D advanced indexing on CPU.
        return matrix.reshape(-1).index_select(0, upper)

    def unpack(self, flat: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.packed:
            return flat.view(n, n).to(dtype)
        upper, lower = self._triangle(n, flat.device)
        values = flat.to(dtype)
        out = torch.empty(n * n, dtype=dtype, device=flat.device)
        out.index_copy_(0, upper, values)
        out.index_copy_(0, lower, values)
        return out.view(n, n)


class FactorExchange:
    """Averages batch factors over ranks and passes; each rank gets the factors it owns (all of them in one process)."""

    def __init__(
        self,
        comm: Communicator,
        assignment: WorkAssignment,
        dims: Sequence[tuple[FactorShape, FactorShape]],
        *,
        comm_dtype: torch.dtype | None,
        bucket_bytes: int,
        reduction: Literal["owner", "allreduce"] = "owner",
        pack: bool = True,
    ) -> None:
        self.comm = comm
        self.dims = list(dims)
        self.comm_dtype = comm_dtype
        self.reduction = reduction
        self.packing = SymmetricPacking(pack)
        self.distributed = comm.world_size > 1
        everything = reduction == "allreduce" or not self.distributed
        # What travels, and to whom: each block to its owner; whole factors when every rank gets everything.
        self.units: dict[FactorKey, list[tuple[FactorBlock, int]]] = {}
        for block, rank in assignment.blocks:
            whole = FactorBlock(block.key, 0, of_kind(block.key.kind, self.dims[block.key.layer]).dim)
            if not everything:
                self.units.setdefault(block.key, []).append((block, rank))
            elif block.start == 0:
                self.units[block.key] = [(whole, rank)]
        self.owned: set[FactorKey] = {
            key for key, units in self.units.items() if everything or any(rank == comm.rank for _, rank in units)
        }
        # A factor this rank owns in part is kept as its own blocks side by side (a smaller block-diagonal matrix),
        # not as the whole n x n: where each of its blocks starts there, and the side of that matrix.
        self._offsets: dict[FactorBlock, int] = {}
        self._stored_sides: dict[FactorKey, int] = {}
        for key, units in self.units.items():
            mine = [block for block, rank in units if rank == comm.rank]
            if len(units) > 1 and mine:
                for block in mine:
                    self._offsets[block] = self._stored_sides.get(key, 0)
                    self._stored_sides[key] = self._offsets[block] + block.size

        # Static buckets in backward order (last layer first), closed when they pass bucket_bytes.
        element = torch.tensor([], dtype=comm_dtype or torch.float32).element_size()
        self.buckets: list[list[int]] = [[]]
        size = 0
        for index in reversed(range(len(dims))):
            if self.buckets[-1] and size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(index)
            size += element * sum(shape.numel(pack) for shape in dims[index])
        self.bucket_of = {index: b for b, members in enumerate(self.buckets) for index in members}

        self._staged: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._next_bucket = 0
        self._inflight: list[tuple[list[FactorBlock], list[torch.Tensor], Pending]] = []
        self._sums: dict[FactorKey, torch.Tensor] = {}
        self._passes: dict[int, int] = {}
        self._dtypes: dict[FactorKey, torch.dtype] = {}

    def stored_at(self, block: FactorBlock) -> int:
        """Where ``block`` starts in the factor this rank keeps (its own start when the factor is kept whole)."""
        return self._offsets.get(block, block.start)

    def stored_shape(self, key: FactorKey, factor: FactorShape) -> tuple[int, ...]:
        """The shape of the running factor this rank keeps for ``key``."""
        side = self._stored_sides.get(key)
        return factor.tensor_shape if side is None else (side, side)

    @property
    def handed_off(self) -> set[int]:
        """Layers with at least one pass handed off since the last ``finish()``."""
        return set(self._passes)

    def hand_off(self, layer: int, a_batch: torch.Tensor | None, g_batch: torch.Tensor, *, launch: bool) -> None:
        """One pass's batch factors of ``layer`` (no A for a layer without one). With ``launch``, complete buckets
        start reducing right away."""
        self._passes[layer] = self._passes.get(layer, 0) + 1
        if not self.distributed:
            for kind in self._kinds(layer):
                key, batch = FactorKey(layer, kind), of_kind(kind, (a_batch, g_batch))
                assert batch is not None
                self._sums[key] = batch if key not in self._sums else self._sums[key].add_(batch)
            return
        for kind in self._kinds(layer):
            batch = of_kind(kind, (a_batch, g_batch))
            assert batch is not None
            self._dtypes[FactorKey(layer, kind)] = batch.dtype
        self._staged[layer] = (a_batch, g_batch)
        if launch:
            while self._next_bucket < len(self.buckets) and all(
                index in self._staged for index in self.buckets[self._next_bucket]
            ):
                self._launch(self.buckets[self._next_bucket])
                self._next_bucket += 1
            if self._next_bucket == len(self.buckets):
                self._next_bucket = 0  # the next pass (gradient accumulation) starts over

    def _kinds(self, layer: int) -> list[FactorKind]:
        """The factors ``layer`` has (a normalisation layer has no A)."""
        return [kind for kind in FACTOR_KINDS if of_kind(kind, self.dims[layer]).present]

    def _launch(self, members: list[int]) -> None:
        staged = [index for index in members if index in self._staged]
        if not staged:
            return
        blocks_by_rank: list[list[FactorBlock]] = [[] for _ in range(self.comm.world_size)]
        for index in staged:
            for kind in self._kinds(index):
                for block, owner in self.units[FactorKey(index, kind)]:
                    blocks_by_rank[0 if self.reduction == "allreduce" else owner].append(block)
        first = self._staged[staged[0]][1]
        dtype = self.comm_dtype or first.dtype
        parts = [[self._packed(block).to(dtype) for block in blocks] for blocks in blocks_by_rank]
        # One buffer, owner after owner: a communicator may hand it to a single reduce-scatter without a copy.
        every = [part for owned in parts for part in owned]
        flat = torch.cat(every) if every else torch.empty(0, dtype=dtype, device=first.device)
        segments = list(flat.split([sum(part.numel() for part in owned) for owned in parts]))
        for index in staged:
            del self._staged[index]
        if self.reduction == "allreduce":
            pending = self.comm.allreduce_sum(segments[0], "factors")
            self._inflight.append((blocks_by_rank[0], [segments[0]], pending))
        else:
            pending = self.comm.reduce_to_owners(segments, "factors")
            self._inflight.append((blocks_by_rank[self.comm.rank], [segments[self.comm.rank]], pending))

    def _packed(self, block: FactorBlock) -> torch.Tensor:
        batch = of_kind(block.key.kind, self._staged[block.key.layer])
        assert batch is not None
        factor = of_kind(block.key.kind, self.dims[block.key.layer])
        if block.shape(factor) != factor:  # a diagonal block of a split (dense) factor
            batch = batch[block.start : block.stop, block.start : block.stop]
        return self.packing.pack_factor(batch, block.shape(factor))

    def _accumulate(self, block: FactorBlock, factor: FactorShape, flat: torch.Tensor) -> None:
        """Add one received block to its factor's sum; a split factor's sum holds this rank's blocks only."""
        key = block.key
        dtype = self._dtypes[key]
        accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        value = self.packing.unpack_factor(flat, block.shape(factor), accumulate)
        if block.shape(factor) == factor:
            self._sums[key] = value if key not in self._sums else self._sums[key].add_(value)
            return
        if key not in self._sums:
            self._sums[key] = torch.zeros(self.stored_shape(key, factor), dtype=accumulate, device=value.device)
        at = self.stored_at(block)
        self._sums[key][at : at + block.size, at : at + block.size].add_(value)

    def finish(self) -> dict[FactorKey, torch.Tensor]:
        """Wait for every reduction; the mean batch factor of each owned factor, over ranks and passes."""
        for members in self.buckets:  # buckets the backward pass did not complete (unused layers, no overlap)
            self._launch(members)
        self._next_bucket = 0
        for blocks, (segment,), pending in self._inflight:
            pending.wait()
            offset = 0
            for block in blocks:
                factor = of_kind(block.key.kind, self.dims[block.key.layer])
                length = block.shape(factor).numel(self.packing.packed)
                self._accumulate(block, factor, segment[offset : offset + length])
                offset += length
        self._inflight = []
        result = {}
        for key, total in self._sums.items():
            count = self._passes[key.layer] * self.comm.world_size
            result[key] = total.div_(count) if count > 1 else total
        self._sums = {}
        self._passes = {}
        return result


class DecompositionExchange:
    """Owners broadcast their decompositions to the other gradient workers of each layer."""

    def __init__(
        self,
        comm: Communicator,
        assignment: WorkAssignment,
        dims: Sequence[tuple[FactorShape, FactorShape]],
        state_shapes: Callable[[FactorShape], list[tuple[int, ...]]],
    ) -> None:
        self.comm = comm
        self.dims = list(dims)
        self.state_shapes = state_shapes
        # (group, source rank, blocks that source decomposes for the group's layers), in a fixed order.
        self.plan: list[tuple[tuple[int, ...], int, list[FactorBlock]]] = []
        for group in assignment.worker_groups:
            if comm.rank not in group or len(group) == 1:
                continue
            layers = {index for index, work in enumerate(assignment.layers) if work.grad_workers == group}
            for src in group:
                blocks = [block for block, owner in assignment.blocks if owner == src and block.key.layer in layers]
                if blocks:
                    self.plan.append((group, src, blocks))

    def _shapes(self, block: FactorBlock) -> list[tuple[int, ...]]:
        return self.state_shapes(block.shape(of_kind(block.key.kind, self.dims[block.key.layer])))

    def share(
        self,
        mine: dict[FactorBlock, list[torch.Tensor]],
        ready: set[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[FactorBlock, list[torch.Tensor]]:
        """Send ``mine`` (this rank's decompositions) and return the ones other ranks sent, for ``ready`` layers."""
        return self.start(mine, ready, dtype, device).finish()

    def start(
        self,
        mine: dict[FactorBlock, list[torch.Tensor]],
        ready: set[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Shipment:
        """``share`` without waiting: the broadcasts are launched, ``finish()`` waits and returns what arrived."""
        received: list[tuple[list[FactorBlock], torch.Tensor, Pending]] = []
        for group, src, all_blocks in self.plan:
            blocks = [block for block in all_blocks if block.key.layer in ready]
            if not blocks:
                continue
            if src == self.comm.rank:
                buffer = torch.cat([t.reshape(-1).to(dtype) for block in blocks for t in mine[block]])
            else:
                numel = sum(int(torch.Size(shape).numel()) for block in blocks for shape in self._shapes(block))
                buffer = torch.empty(numel, dtype=dtype, device=device)
            pending = self.comm.broadcast(buffer, src, group, "decompositions")
            received.append((blocks if src != self.comm.rank else [], buffer, pending))
        return Shipment(received, self._shapes)


class Shipment:
    """Decomposition broadcasts in flight (``DecompositionExchange.start``)."""

    def __init__(
        self,
        received: list[tuple[list[FactorBlock], torch.Tensor, Pending]],
        shapes: Callable[[FactorBlock], list[tuple[int, ...]]],
    ) -> None:
        self._received = received
        self._shapes = shapes

    def finish(self) -> dict[FactorBlock, list[torch.Tensor]]:
        """Wait for every broadcast; the decompositions other ranks sent, block by block."""
        out: dict[FactorBlock, list[torch.Tensor]] = {}
        for blocks, buffer, pending in self._received:
            pending.wait()
            offset = 0
            for block in blocks:
                tensors = []
                for shape in self._shapes(block):
                    numel = int(torch.Size(shape).numel())
                    tensors.append(buffer[offset : offset + numel].view(shape))
                    offset += numel
                out[block] = tensors
        return out


class GradientExchange:
    """Gradient workers broadcast preconditioned gradients, and each layer's ``<V, grad>``, to their receivers."""

    def __init__(
        self, comm: Communicator, assignment: WorkAssignment, dims: Sequence[tuple[FactorShape, FactorShape]]
    ) -> None:
        self.comm = comm
        self.shapes = [(g.dim, a.dim) for a, g in dims]
        self.receivers = assignment.receiver_group_of(comm.rank)
        # For each member of this rank's receiver group: the layers it preconditions (it serves the whole group).
        self.plan: list[tuple[int, list[int]]] = []
        if len(self.receivers) > 1:
            for src in self.receivers:
                layers = [index for index, work in enumerate(assignment.layers) if src in work.grad_workers]
                if layers:
                    self.plan.append((src, layers))

    def share(self, mine: dict[int, torch.Tensor], vg: torch.Tensor, active: set[int]) -> dict[int, torch.Tensor]:
        """Send ``mine`` (layer -> V); return the V of ``active`` layers from other ranks, filling their ``vg``."""
        received: list[tuple[list[int], torch.Tensor, Pending]] = []
        for src, all_layers in self.plan:
            layers = [index for index in all_layers if index in active]
            if not layers:
                continue
            numel = sum(self.shapes[i][0] * self.shapes[i][1] for i in layers) + len(layers)
            index_tensor = torch.tensor(layers, device=vg.device)
            if src == self.comm.rank:
                buffer = torch.cat([*(mine[i].reshape(-1) for i in layers), vg[index_tensor]])
            else:
                buffer = torch.empty(numel, dtype=vg.dtype, device=vg.device)
            pending = self.comm.broadcast(buffer, src, self.receivers, "gradients")
            received.append((layers if src != self.comm.rank else [], buffer, pending))
        out: dict[int, torch.Tensor] = {}
        for layers, buffer, pending in received:
            pending.wait()
            if not layers:
                continue
            offset = 0
            for index in layers:
                rows, cols = self.shapes[index]
                out[index] = buffer[offset : offset + rows * cols].view(rows, cols)
                offset += rows * cols
            vg[torch.tensor(layers, device=vg.device)] = buffer[offset:]
        return out
