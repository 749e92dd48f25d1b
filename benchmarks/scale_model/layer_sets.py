"""Layer sets: the K-FAC layers of a model per rank and step (ResNet-50, BERT-Large, any module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.distributed import resnet50_dims
from distkfac.factors import FactorShape
from distkfac.layers import helper_for


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
