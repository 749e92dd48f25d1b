"""Per-layer maths: one helper per supported layer type.

A helper turns what a layer sees in the forward and backward pass into its two Kronecker factors, and moves the
layer's gradient in and out of the matrix form ``grad = [dL/dW, dL/db]`` (shape ``g_dim x a_dim``) that the
preconditioning methods work on. Helpers hold no state of their own beyond the module and the factor conventions:

- ``g_scale="example"``: ``g = N * grad_output``, the per-example gradient of a mean-reduced loss over N examples;
  ``"batch"``: ``g = grad_output`` as autograd gives it (G is N^2 times smaller).
- ``conv_factors`` (Conv2d only, T output positions per example): ``"mean"`` averages both factors over the N*T
  rows; ``"kfc"`` (Grosse & Martens 2016) sums A over the positions and averages over the examples,
  ``A = (1/N) sum_{i,t} a a^T`` (T times ``"mean"``'s), and keeps G as ``"mean"`` has it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ConvFactors = Literal["mean", "kfc"]
GScale = Literal["example", "batch"]
CONV_FACTORS: tuple[str, ...] = ("mean", "kfc")
G_SCALES: tuple[str, ...] = ("example", "batch")


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
        bias = self.module.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return bias

    @abstractmethod
    def a_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's inputs as columns ``a`` (with a 1 last when the layer has a bias): ``a_dim x rows``."""

    @abstractmethod
    def g_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Autograd's gradient at the layer's output as columns: ``g_dim x rows`` (not yet scaled by N)."""

    def a_factor(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A_b = (1/rows) sum a a^T`` over every row of the batch, computed in ``dtype`` (default: x's)."""
        a = self.a_columns(x).to(dtype or x.dtype)
        return torch.mm(a, a.t()).mul_(self._a_weight(x.shape[0], a.shape[1]))

    def _a_weight(self, batch_size: int, rows: int) -> float:
        """The weight of each row's ``a a^T`` in ``A_b``: a mean over the rows."""
        return 1.0 / rows

    def g_factor(self, grad_output: torch.Tensor, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``G_b = (1/rows) sum g g^T``, ``g = N * grad_output`` (``g_scale="example"``) or ``grad_output``."""
        g = self.g_columns(grad_output).to(dtype or grad_output.dtype)
        # One multiplier for both scalings: the per-example gradient is N times the mean loss's, so G gains N^2.
        example = batch_size * batch_size if self.g_scale == "example" else 1
        return torch.mm(g, g.t()).mul_(example / g.shape[1])

    def has_grad(self) -> bool:
        return self.weight.grad is not None and (self.bias is None or self.bias.grad is not None)

    def read_grad(self, out: torch.Tensor) -> None:
        """Copy ``[dL/dW, dL/db]`` into ``out`` (``g_dim x a_dim``, any float dtype)."""
        assert self.weight.grad is not None
        weight_cols = self.a_dim - int(self.has_bias)
        out[:, :weight_cols].copy_(self.weight.grad.reshape(self.g_dim, weight_cols))
        if self.bias is not None:
            assert self.bias.grad is not None
            out[:, weight_cols].copy_(self.bias.grad)

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


class LinearHelper(LayerHelper):
    """``nn.Linear``: one column per example (extra leading input dimensions give one per position)."""

    module: nn.Linear

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def a_columns(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.module.in_features)
        if self.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return x.t()  # a view: the matrix product reads it transposed, nothing is copied

    def g_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, self.module.out_features).t()


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d`` with ``groups=1``: one column per example and output position (im2col)."""

    module: nn.Conv2d

    def __init__(self, module: nn.Conv2d, *, g_scale: GScale = "example", conv_factors: ConvFactors = "mean") -> None:
        super().__init__(module, g_scale=g_scale)
        self.conv_factors = conv_factors

    def _a_weight(self, batch_size: int, rows: int) -> float:
        # KFC's Omega sums over the T positions of an example and averages over examples: (1/N), not (1/NT).
        return 1.0 / batch_size if self.conv_factors == "kfc" else 1.0 / rows

    @property
    def a_dim(self) -> int:
        m = self.module
        kh, kw = m.kernel_size
        return m.in_channels * kh * kw + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def a_columns(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.dim() != 4:
            raise ValueError(f"distkfac: Conv2d expects batched 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        if any(m._reversed_padding_repeated_twice):
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        x = x.contiguous()
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
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


def helper_for(
    module: nn.Module, *, conv_factors: ConvFactors = "mean", g_scale: GScale = "example"
) -> LayerHelper | None:
    """The helper for a supported layer, or None for layers that keep their plain gradients.

    ``conv_factors`` concerns Conv2d only: a Linear layer with extra leading input dimensions keeps one row per
    position and the mean over all rows whatever it says.
    """
    if isinstance(module, nn.Linear):
        return LinearHelper(module, g_scale=g_scale)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return Conv2dHelper(module, g_scale=g_scale, conv_factors=conv_factors)
    return None
