"""Per-layer maths: one helper per supported layer type.

A helper turns what a layer sees in the forward and backward pass into its two Kronecker factors, and moves the
layer's gradient in and out of the matrix form ``grad = [dL/dW, dL/db]`` (shape ``g_dim x a_dim``) that the
preconditioning methods work on. Helpers hold no state of their own beyond the module and the factor conventions:

- ``g_scale="example"``: ``g = N * grad_output``, the per-example gradient of a mean-reduced loss over N examples;
  ``"batch"``: ``g = grad_output`` as autograd gives it (G is N^2 times smaller).
- ``conv_factors`` (Conv2d only, T output positions per example): ``"mean"`` averages both factors over the N*T
  rows; ``"kfc"`` (Grosse & Martens 2016) sums A over the positions and averages over the examples,
  ``A = (1/N) sum_{i,t} a a^T`` (T times ``"mean"``'s), and keeps G as ``"mean"`` has it.
- ``weight_sharing`` (Linear over a sequence, input ``N x T x d``): ``"expand"`` keeps one row per position and
  averages over the N*T rows; ``"reduce"`` (Eschenhagen et al., NeurIPS 2023, K-FAC-reduce) takes per example
  ``a_i = mean_t a_it`` and ``g_i = sum_t g_it`` and averages ``a a^T`` and ``g g^T`` over the N examples.

The first input dimension is the batch. Embedding and normalisation layers store factors of other structures
(``distkfac.factors.Structure``): Embedding's A is diagonal, and LayerNorm/BatchNorm have one factor of unit-wise
``2 x 2`` blocks (docs/kfac.md, "Layers").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from distkfac.factors import FactorShape, Structure

ConvFactors = Literal["mean", "kfc"]
GScale = Literal["example", "batch"]
WeightSharing = Literal["expand", "reduce"]
CONV_FACTORS: tuple[str, ...] = ("mean", "kfc")
G_SCALES: tuple[str, ...] = ("example", "batch")
WEIGHT_SHARINGS: tuple[str, ...] = ("expand", "reduce")
# Conv2dHelper.a_factor on the CPU: weight gradients from this many input channels on. Measured at batch 256: 2.1-2.6x
# faster than the columns' product with 16 to 64 channels, 1.8-2.3x slower with 3 (an image's: the columns are
# small).
WEIGHT_GRAD_MIN_CHANNELS = 8
# Conv2dHelper.a_sum_by_weight_grads sums its products in chunks of about this many output positions (16 examples of
# 32 x 32): measured, the most accurate and among the fastest (docs/benchmarks.md, "Conv input factors").
WEIGHT_GRAD_POSITIONS = 16384


class LayerHelper(ABC):
    """The maths of one layer type. ``a_dim`` includes the bias column; ``g_dim`` is the number of outputs."""

    def __init__(self, module: nn.Module, *, g_scale: GScale = "example") -> None:
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None
        self.g_scale = g_scale

    @property
    @abstractmethod
    def a_dim(self) -> int: ...

    @property
    @abstractmethod
    def g_dim(self) -> int: ...

    @property
    def weight(self) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        assert bias is None or isinstance(bias, torch.Tensor)
        return bias

    @property
    def a_shape(self) -> FactorShape:
        """A's structure and side (dense ``a_dim x a_dim`` unless the helper says otherwise)."""
        return FactorShape.dense(self.a_dim)

    @property
    def g_shape(self) -> FactorShape:
        return FactorShape.dense(self.g_dim)

    def example_scale(self, batch_size: int) -> int:
        """G's multiplier: the per-example gradient is N times the mean loss's, so G gains N^2 (``"example"``)."""
        return batch_size * batch_size if self.g_scale == "example" else 1

    @abstractmethod
    def a_factor(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """This pass's A from the layer's input ``x`` (None where the layer has no A)."""

    # Whether g_factor needs the layer's input. Only then does the backward hook keep it: holding every layer's
    # input until its G is made raised a ViT step's memory peak enough to slow the model's own products by a third.
    needs_input = False

    @abstractmethod
    def g_factor(
        self,
        grad_output: torch.Tensor,
        batch_size: int,
        x: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """This pass's G from autograd's gradient at the layer's output, for a pass of ``batch_size`` examples
        (and the layer's input ``x`` where ``needs_input``)."""

    def has_grad(self) -> bool:
        return self.weight.grad is not None and (self.bias is None or self.bias.grad is not None)

    def read_grad(self, out: torch.Tensor) -> None:
        """Copy ``[dL/dW, dL/db]`` into ``out`` (``g_dim x a_dim``, any float dtype)."""
        assert self.weight.grad is not None
        weight_cols = self.a_dim - int(self.has_bias)
        out[:, :weight_cols].copy_(self.weight.grad.reshape(self.g_dim, weight_cols))
        if self.bias is not None:
            assert self.bias.grad is not None
            out[:, weight_cols].copy_(self.bias.grad.reshape(-1))

    def write_grad(self, matrix: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Set the gradients from ``matrix`` (``g_dim x a_dim``), times ``scale`` when given, in place."""
        weight_cols = self.a_dim - int(self.has_bias)
        targets = [(self.weight.grad, matrix[:, :weight_cols])]
        if self.bias is not None:
            targets.append((self.bias.grad, matrix[:, weight_cols]))
        for grad, value in targets:
            assert grad is not None
            flat = grad.view(value.shape)
            if scale is None:
                flat.copy_(value)
            elif flat.dtype == value.dtype:
                torch.mul(value, scale, out=flat)  # straight into the gradient's storage, no temporary
            else:
                flat.copy_(value * scale)


class ColumnHelper(LayerHelper):
    """Layers whose G is the mean of ``g g^T`` over columns of output gradients: Linear and Conv2d."""

    @abstractmethod
    def g_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Autograd's gradient at the layer's output as columns: ``g_dim x rows`` (not yet scaled by N)."""

    def g_factor(
        self,
        grad_output: torch.Tensor,
        batch_size: int,
        x: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``G_b = (1/rows) sum g g^T``, ``g = N * grad_output`` (``g_scale="example"``) or ``grad_output``."""
        g = self.g_columns(grad_output).to(dtype or grad_output.dtype)
        return torch.mm(g, g.t()).mul_(self.example_scale(batch_size) / g.shape[1])


class LinearHelper(ColumnHelper):
    """``nn.Linear``: one column per example; extra leading input dimensions (a sequence) give one per position
    (``weight_sharing="expand"``) or one per example, from the mean input and the summed output gradient
    (``"reduce"``)."""

    module: nn.Linear

    def __init__(
        self, module: nn.Linear, *, g_scale: GScale = "example", weight_sharing: WeightSharing = "expand"
    ) -> None:
        super().__init__(module, g_scale=g_scale)
        self.weight_sharing = weight_sharing

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as ``rows x in_features``: one row per position, or per example under "reduce"."""
        if self.weight_sharing == "reduce" and x.dim() > 2:
            x = x.reshape(x.shape[0], -1, self.module.in_features).mean(1)
        return x.reshape(-1, self.module.in_features)

    def a_factor(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A_b`` without building ``[x, 1]``: the bias column's block is the column sums of x and the row count.

        Concatenating a column of ones copies the whole input (N*T rows for a sequence), which cost a ViT step
        more than its factors' products; the blocks cost one ``in x in`` copy and a column sum.
        """
        rows = self._rows(x).to(dtype or x.dtype)
        count, d = rows.shape
        if not self.has_bias:
            return torch.mm(rows.t(), rows).div_(count)
        out = rows.new_empty(d + 1, d + 1)
        out[:d, :d] = torch.mm(rows.t(), rows)
        sums = rows.sum(0)
        out[:d, d] = sums
        out[d, :d] = sums
        out[d, d] = count
        return out.div_(count)

    def g_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        if self.weight_sharing == "reduce" and grad_output.dim() > 2:
            grad_output = grad_output.reshape(grad_output.shape[0], -1, self.module.out_features).sum(1)
        return grad_output.reshape(-1, self.module.out_features).t()


class Conv2dHelper(ColumnHelper):
    """``nn.Conv2d`` with ``groups=1``: one column per example and output position (im2col)."""

    module: nn.Conv2d

    def __init__(self, module: nn.Conv2d, *, g_scale: GScale = "example", conv_factors: ConvFactors = "mean") -> None:
        super().__init__(module, g_scale=g_scale)
        self.conv_factors = conv_factors

    def a_factor(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A_b = (1/rows) sum a a^T`` over the im2col columns (``"kfc"``: ``1/N``), in ``dtype`` (default: x's).

        On the CPU, for kernels above 1x1 with WEIGHT_GRAD_MIN_CHANNELS input channels or more, from oneDNN's
        weight-gradient kernels (:meth:`a_sum_by_weight_grads`: 1.1-2.8x faster on the CIFAR models' convolutions,
        docs/benchmarks.md, "Conv input factors"); otherwise from the im2col columns' product
        (:meth:`a_sum_by_columns`, as kfac-pytorch; the other way is not measured on GPUs).
        """
        x = x.to(dtype or x.dtype)
        # A 1x1 kernel's columns are its input, not kh*kw copies of it: nothing to save (measured 0.6-0.9x).
        by_weight_grads = (
            x.device.type == "cpu"
            and self.module.in_channels >= WEIGHT_GRAD_MIN_CHANNELS
            and self.module.kernel_size != (1, 1)
        )
        total = self.a_sum_by_weight_grads(x) if by_weight_grads else self.a_sum_by_columns(x)
        # KFC's Omega sums over the T positions of an example and averages over examples: (1/N), not (1/NT).
        rows = x.shape[0] if self.conv_factors == "kfc" else x.shape[0] * self._out_positions(x)
        return total.div_(rows)

    def a_sum_by_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``sum a a^T`` as the product of the im2col columns with themselves."""
        a = self.a_columns(x)
        return torch.mm(a, a.t())

    def a_sum_by_weight_grads(self, x: torch.Tensor) -> torch.Tensor:
        """``sum a a^T`` without the im2col columns: the block of kernel offset (i, j) against all offsets is the
        weight gradient of this convolution (without padding, on the padded input) whose output gradient is the
        input seen at offset (i, j): ``sum_{n,y,x} x[n, c', s*y + d*i, s*x + d*j] * x[n, c, s*y + d*k, s*x + d*l]``.
        The same products as the columns', in kernels that read the input in place instead of copying it kh*kw
        times; the bias column's sums are the offsets' views summed.

        In chunks of about WEIGHT_GRAD_POSITIONS output positions, summed: oneDNN accumulates a weight gradient
        serially, and over a whole batch its error grew with the batch (5e-4 of the largest entry for a 3-channel
        layer at batch 2048, against 2e-6 for the columns' product); in chunks it is at most the columns' error,
        and the chunks stay in cache (docs/benchmarks.md, "Conv input factors")."""
        padded = self._padded(x).contiguous(memory_format=torch.channels_last)
        out_h, out_w = self._out_size(*padded.shape[-2:])
        chunk = max(1, WEIGHT_GRAD_POSITIONS // (out_h * out_w))
        blocks, sums = self._offset_products(padded[:chunk], out_h, out_w)
        for part in padded[chunk:].split(chunk):
            more_blocks, more_sums = self._offset_products(part, out_h, out_w)
            blocks.add_(more_blocks)
            sums.add_(more_sums)
        d = sums.numel()
        if not self.has_bias:
            return blocks.view(d, d)
        out = padded.new_empty(d + 1, d + 1)
        out[:d, :d] = blocks.view(d, d)
        out[:d, d] = out[d, :d] = sums.view(d)
        out[d, d] = x.shape[0] * out_h * out_w
        return out

    def _offset_products(self, padded: torch.Tensor, out_h: int, out_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the padded input: each kernel offset's products with all offsets ``(C, kh, kw, C, kh, kw)`` and the
        input's sums at each offset ``(C, kh, kw)``."""
        m = self.module
        c, (kh, kw), (sh, sw), (dh, dw) = padded.shape[1], m.kernel_size, m.stride, m.dilation
        blocks = padded.new_empty(c, kh, kw, c, kh, kw)
        sums = padded.new_empty(c, kh, kw)
        summed = padded.sum(0)  # over the examples first: strided sums over the whole chunk cost 20% of a K-FAC step
        for i in range(kh):
            for j in range(kw):
                seen = padded[:, :, dh * i :: sh, dw * j :: sw][:, :, :out_h, :out_w]
                blocks[:, i, j] = conv2d_weight(padded, (c, c, kh, kw), seen, stride=(sh, sw), dilation=(dh, dw))
                sums[:, i, j] = summed[:, dh * i :: sh, dw * j :: sw][:, :out_h, :out_w].sum(dim=(1, 2))
        return blocks, sums

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.dim() != 4:
            raise ValueError(f"distkfac: Conv2d expects batched 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        if any(m._reversed_padding_repeated_twice):
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        return x

    def _out_size(self, padded_h: int, padded_w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.module.kernel_size, self.module.stride, self.module.dilation
        return (padded_h - dh * (kh - 1) - 1) // sh + 1, (padded_w - dw * (kw - 1) - 1) // sw + 1

    def _out_positions(self, x: torch.Tensor) -> int:
        """Output positions per example, from the input's shape and the padding (no padded copy is made)."""
        left, right, top, bottom = self.module._reversed_padding_repeated_twice
        out_h, out_w = self._out_size(x.shape[-2] + top + bottom, x.shape[-1] + left + right)
        return out_h * out_w

    @property
    def a_dim(self) -> int:
        m = self.module
        kh, kw = m.kernel_size
        return m.in_channels * kh * kw + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def a_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The im2col columns, ``a_dim x (N * out_h * out_w)``."""
        m = self.module
        x = self._padded(x).contiguous()
        n, c = x.shape[:2]
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        out_h, out_w = self._out_size(*x.shape[-2:])
        stride_n, stride_c, stride_h, stride_w = x.stride()
        # im2col as a strided view (C, kh, kw, N, H_out, W_out) and one copy into the columns. This order keeps the
        # innermost copy loop on image rows (long contiguous runs); rows-first layouts copy 3-5 floats at a time.
        patches = x.as_strided(
            (c, kh, kw, n, out_h, out_w),
            (stride_c, stride_h * dh, stride_w * dw, stride_n, stride_h * sh, stride_w * sw),
        )
        columns = x.new_empty(self.a_dim, n * out_h * out_w)
        columns[: c * kh * kw].view(c, kh, kw, n, out_h, out_w).copy_(patches)
        if self.has_bias:
            columns[-1].fill_(1.0)
        return columns

    def g_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (C, N*H*W): one copy whose inner loop runs over whole feature maps.
        return grad_output.transpose(0, 1).reshape(self.module.out_channels, -1)


class EmbeddingHelper(LayerHelper):
    """``nn.Embedding``: the input is a one-hot row, so A is diagonal, the token frequencies, kept as a vector.

    Gradient matrix ``dL/dW^T`` (``embedding_dim x num_embeddings``). Positions holding ``padding_idx`` take no
    gradient: they add nothing to either factor (as an all-zero input row would) but still count among the N*T
    rows averaged over, so that equal shards of a batch average to the whole batch's factors.
    """

    module: nn.Embedding
    needs_input = True  # the padding positions

    def __init__(self, module: nn.Embedding, *, g_scale: GScale = "example") -> None:
        if module.sparse:
            raise ValueError(
                "nn.Embedding with sparse=True gives sparse gradients, which K-FAC does not precondition; build it "
                "with sparse=False, or list it in skip_layers to keep its plain sparse gradient"
            )
        super().__init__(module, g_scale=g_scale)

    @property
    def a_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.module.embedding_dim

    @property
    def a_shape(self) -> FactorShape:
        return FactorShape(Structure.DIAGONAL, self.a_dim)

    def _kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which positions count (None: all of them): those that do not hold ``padding_idx``."""
        pad = self.module.padding_idx
        return None if pad is None else x.reshape(-1) != pad

    def a_factor(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        tokens, kept = x.reshape(-1), self._kept(x)
        if kept is not None:
            tokens = tokens[kept]
        counts = torch.bincount(tokens, minlength=self.a_dim).to(dtype or self.weight.dtype)
        return counts.div_(max(x.numel(), 1))

    def g_factor(
        self,
        grad_output: torch.Tensor,
        batch_size: int,
        x: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        assert x is not None
        g, kept = grad_output.reshape(-1, self.g_dim).to(dtype or grad_output.dtype), self._kept(x)
        if kept is not None:
            g = g[kept]
        return torch.mm(g.t(), g).mul_(self.example_scale(batch_size) / max(x.numel(), 1))

    def read_grad(self, out: torch.Tensor) -> None:
        assert self.weight.grad is not None
        out.copy_(self.weight.grad.t())

    def write_grad(self, matrix: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        grad = self.weight.grad
        assert grad is not None
        grad.copy_((matrix if scale is None else matrix * scale).t())


class NormHelper(LayerHelper):
    """``nn.LayerNorm`` and ``nn.BatchNorm*d`` with a weight and a bias: the unit-wise Fisher.

    Each unit u (a normalised feature or channel) has the ``2 x 2`` block ``F_u = (1/N) sum_i v_iu v_iu^T`` of
    the per-example gradients ``v_iu = N (sum_p g_ipu xhat_ipu, sum_p g_ipu)`` of its (weight, bias), summed over
    the example's positions p; ``xhat`` is the normalised input (BatchNorm: with the batch's statistics, whose
    coupling of the examples is ignored). The blocks are stored as the G factor; there is no A. After Osawa et al.
    (CVPR 2019), who precondition BatchNorm unit-wise in their distributed K-FAC.
    """

    module: nn.LayerNorm | nn.modules.batchnorm._BatchNorm
    needs_input = True  # the normalised input, beside the gradient

    @property
    def a_dim(self) -> int:
        return 2

    @property
    def g_dim(self) -> int:
        return self.weight.numel()

    @property
    def a_shape(self) -> FactorShape:
        return FactorShape(Structure.NONE, 2)

    @property
    def g_shape(self) -> FactorShape:
        return FactorShape(Structure.BLOCKS, self.g_dim)

    def a_factor(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        return None

    def _per_unit(self, t: torch.Tensor) -> torch.Tensor:
        """``N x positions x units``: LayerNorm's units are its last dimensions, BatchNorm's are dimension 1."""
        if isinstance(self.module, nn.LayerNorm):
            return t.reshape(t.shape[0], -1, self.g_dim)
        return t.reshape(t.shape[0], self.g_dim, -1).transpose(1, 2)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            dims = tuple(range(x.dim() - len(m.normalized_shape), x.dim()))
            mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
            return (x - mean) / torch.sqrt(var + m.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if m.training or m.running_mean is None or m.running_var is None:
            dims = (0, *range(2, x.dim()))
            mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        else:
            mean, var = m.running_mean.view(shape), m.running_var.view(shape)
        return (x - mean) / torch.sqrt(var + m.eps)

    def g_factor(
        self,
        grad_output: torch.Tensor,
        batch_size: int,
        x: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        assert x is not None
        dtype = dtype or grad_output.dtype
        xhat = self._per_unit(self._normalised(x.to(dtype)))
        g = self._per_unit(grad_output.to(dtype))
        per_example = torch.stack([(g * xhat).sum(1), g.sum(1)], dim=-1)  # N x units x 2
        blocks = torch.einsum("nui,nuj->uij", per_example, per_example)
        return blocks.mul_(self.example_scale(batch_size) / batch_size)


NORM_LAYERS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def helper_for(
    module: nn.Module,
    *,
    conv_factors: ConvFactors = "mean",
    g_scale: GScale = "example",
    weight_sharing: WeightSharing = "expand",
) -> LayerHelper | None:
    """The helper for a supported layer, or None for layers that keep their plain gradients.

    ``conv_factors`` concerns Conv2d only, ``weight_sharing`` Linear only (Embedding always expands: its A stays
    diagonal only so). Normalisation layers need both a weight and a bias. Raises ValueError for a supported type
    in a form K-FAC cannot take (an Embedding with ``sparse=True``).
    """
    if isinstance(module, nn.Linear):
        return LinearHelper(module, g_scale=g_scale, weight_sharing=weight_sharing)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return Conv2dHelper(module, g_scale=g_scale, conv_factors=conv_factors)
    if isinstance(module, nn.Embedding):
        return EmbeddingHelper(module, g_scale=g_scale)
    if isinstance(module, NORM_LAYERS) and module.weight is not None and module.bias is not None:
        return NormHelper(module, g_scale=g_scale)
    return None
