"""The models the studies train: an MLP of any depth and width, LeNet-5, a CIFAR ResNet (6n + 2 layers) and a small
Vision Transformer.

:func:`build_model` makes one from a :class:`~jobs.config.ModelConfig`, the input shape of one example and the
number of classes. The parameters are drawn from the global torch RNG: seed it first for reproducible weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from jobs.config import ACTIVATIONS, MODEL_NAMES, ModelConfig

__all__ = [
    "MLP", "Attention", "BasicBlock", "CifarResNet", "ConvNet", "LeNet5", "ResidualLinear", "SigmoidResNet",
    "TransformerBlock", "VisionTransformer", "activation_layer", "build_model", "cpu_channels_last",
    "set_channels_last",
]  # fmt: skip


def activation_layer(name: str) -> nn.Module:
    """``relu``, ``tanh``, or ``none`` (identity: a linear network)."""
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def cpu_channels_last(x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """A batch of images in channels-last memory order on the CPU (the values unchanged), as is on other devices or
    when not ``enabled`` (the conv models' ``channels_last`` attribute: :func:`set_channels_last`).

    oneDNN's CPU convolutions, pools and ReLUs run faster on channels-last activations: an SGD step 1.34x (the
    CIFAR-10 study's ConvNet, batch 256, one thread), 1.37x (ResNet-20), 1.09x (LeNet-5); an evaluation forward
    2.12x (ConvNet); a K-FAC step 1.02-1.10x, as its factors' products dominate (docs/benchmarks.md,
    "Channels-last"). The weights
    stay contiguous, so their gradients keep the layout distkfac and DDP read. GPUs are left as they were: not
    measured here. Inside torch.func's transforms (per-example gradients: vmap) the order is left alone: vmap
    cannot change a layout.
    """
    if enabled and x.device.type == "cpu" and x.dim() == 4 and not torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class ResidualLinear(nn.Module):
    """``x + act(linear(x))`` for a square linear layer."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = activation_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MLP(nn.Sequential):
    """Flatten, then ``inputs - hidden[0] - ... - hidden[-1] - classes`` with the activation after each hidden layer.

    With ``residual``, a hidden layer whose input width equals its output width (every hidden layer after the
    first of equal widths) adds its input to its output.
    """

    def __init__(
        self,
        inputs: int,
        hidden: Sequence[int],
        classes: int,
        activation: str = "relu",
        residual: bool = False,
        bias: bool = True,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = inputs
        skips = 0
        for h in hidden:
            if residual and h == width:
                layers.append(ResidualLinear(h, activation))
                skips += 1
            else:
                layers += [nn.Linear(width, h, bias=bias), activation_layer(activation)]
            width = h
        if residual and skips == 0:
            raise ValueError(
                f"model.residual = true but no hidden layer has equal input and output widths (hidden = "
                f"{list(hidden)}): repeat a width, e.g. hidden = [256, 256, 256]"
            )
        layers.append(nn.Linear(width, classes, bias=bias))
        super().__init__(*layers)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with max pooling: conv 5x5 6 - pool - conv 5x5 16 - pool - 120 - 84 - classes.

    Inputs smaller than 32 x 32 (MNIST's 28 x 28) are zero-padded by 2 in the first convolution, as in the paper.
    """

    channels_last = True  # cpu_channels_last

    def __init__(self, input_shape: Sequence[int], classes: int, activation: str = "relu") -> None:
        super().__init__()
        channels, height, width = _image_shape(input_shape, "lenet5")
        pad = 2 if min(height, width) < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad),
            activation_layer(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            activation_layer(activation),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            features = self.features(torch.zeros(1, channels, height, width)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(features, 120),
            activation_layer(activation),
            nn.Linear(120, 84),
            activation_layer(activation),
            nn.Linear(84, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(cpu_channels_last(x, self.channels_last)))


class ConvNet(nn.Module):
    """Convolutions (3x3, padding 1) with the activation after each and a 2x2 max-pool after every one but the first,
    then fully connected ``hidden`` layers and the output: with ``channels = [32, 32, 64, 64]`` and ``hidden = [256,
    128]``, the 4 conv + 3 fully connected layers with three 2x2 pools of seed 003's CIFAR-10 network (whose widths
    the paper does not give: these are ours, docs/fisher.md)."""

    channels_last = True  # cpu_channels_last

    def __init__(
        self, input_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int], classes: int,
        activation: str = "relu",
    ) -> None:  # fmt: skip
        super().__init__()
        depth = _image_shape(input_shape, "convnet")[0]
        layers: list[nn.Module] = []
        for index, out in enumerate(channels):
            layers += [nn.Conv2d(depth, out, 3, padding=1), activation_layer(activation)]
            if index:
                layers.append(nn.MaxPool2d(2))
            depth = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            inputs = self.features(torch.zeros(1, *_image_shape(input_shape, "convnet"))).shape[1]
        self.classifier = MLP(inputs, hidden, classes, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(cpu_channels_last(x, self.channels_last)))


class SigmoidResNet(nn.Module):
    """Seed 001's L-layer residual sigmoid network (its eqs. 10 and 11, Figure 2), L = 2n + 3.

    Layer 2 and the odd layers 3, 5, ..., L: ``z^l = f(W^{l-1} z^{l-1} + b^l)`` with ``f(s) = 1/(1 + exp(-slope s))``;
    the even layers 4, 6, ..., L-1: ``z^l = W^{l-1} z^{l-1} + z^{l-2}`` (identity, no bias, the shortcut from
    ``l - 2``). Every hidden layer has ``width`` units; every weight and bias is drawn uniformly from
    ``[-init, init]``. Weights: ``(inputs + 1) width + n (2 width^2 + width) + (width + 1) outputs``.
    """

    def __init__(
        self, inputs: int, depth: int, width: int, outputs: int, slope: float = 2.5, init: float = 0.05
    ) -> None:
        super().__init__()
        if depth < 5 or (depth - 3) % 2:
            raise ValueError(f"model.depth = {depth}: this residual network has L = 2n + 3 layers (5, 7, ..., 1001)")
        blocks = (depth - 3) // 2
        self.slope = slope
        self.first = nn.Linear(inputs, width)
        self.odd = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.even = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.last = nn.Linear(width, outputs)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -init, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = torch.sigmoid(self.slope * self.first(x.flatten(1) if x.dim() > 1 else x))  # z^2
        for odd, even in zip(self.odd, self.even, strict=True):
            before = even(torch.sigmoid(self.slope * odd(before))) + before  # z^{l+1} from z^l and z^{l-1}
        return torch.sigmoid(self.slope * self.last(before))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; a 1x1 convolution on the shortcut when the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): a 3x3 stem, three stages of n blocks (width, 2 width, 4 width
    channels; stride 2 at the start of stages 2 and 3), global average pooling, one linear layer. depth = 6n + 2.
    """

    channels_last = True  # cpu_channels_last

    def __init__(self, input_shape: Sequence[int], classes: int, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        channels, _, _ = _image_shape(input_shape, "resnet")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet depth {depth}: must be 6n + 2 (8, 14, 20, 32, 44, 56, 110)")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        inputs = width
        for stage in range(3):
            outputs = width * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(inputs, outputs, stride))
                inputs = outputs
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(inputs, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(cpu_channels_last(x, self.channels_last)))))


class Attention(nn.Module):
    """Multi-head self-attention with its four projections as plain ``nn.Linear`` layers (``q``, ``k``, ``v``,
    ``out``), applied to every token: the forward hooks of a K-FAC preconditioner see each of them as a Linear layer
    over a sequence (``nn.MultiheadAttention`` calls its projections' weights directly, which no hook sees)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"vit: model.width = {width} must be a multiple of model.heads = {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, width / heads)
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        mixed = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, width))


class TransformerBlock(nn.Module):
    """A pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class VisionTransformer(nn.Module):
    """A small ViT (Dosovitskiy et al. 2021): the image cut into ``patch x patch`` patches, each flattened and mapped
    by one ``nn.Linear`` (``embed``, shared by every patch), a learned position embedding, ``depth`` pre-LN
    transformer blocks, a final LayerNorm, **mean pooling** over the tokens (no class token), a Linear ``head``.

    28 x 28 Fashion-MNIST with patch 7 gives 16 tokens of 49 pixels. The position embedding starts from
    N(0, 0.02^2); the Linear and LayerNorm layers keep torch's own initialisation.
    """

    def __init__(
        self, input_shape: Sequence[int], classes: int, width: int = 64, depth: int = 2, heads: int = 4,
        patch: int = 7, mlp_ratio: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        channels, height, image_width = _image_shape(input_shape, "vit")
        if height % patch or image_width % patch:
            raise ValueError(
                f"vit: model.patch = {patch} does not divide the {height} x {image_width} images: choose a divisor "
                f"of both (7 or 14 for 28 x 28, 4 or 8 for 32 x 32)"
            )
        self.patch = patch
        tokens = (height // patch) * (image_width // patch)
        self.embed = nn.Linear(channels * patch * patch, width)
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, mlp_ratio * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, height, width) -> (batch, tokens, channels * patch * patch), row-major patches."""
        p = self.patch
        batch, channels, height, width = x.shape
        x = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(batch, (height // p) * (width // p), channels * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.patches(x)) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def _image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape[1:]) < 8:
        raise ValueError(
            f"model {model} needs images (channels x height x width, at least 8 x 8); the data has examples of "
            f"shape {tuple(input_shape)} (for synthetic data set data.synthetic_shape, e.g. [1, 28, 28])"
        )
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


def build_model(config: ModelConfig, input_shape: Sequence[int], classes: int) -> nn.Module:
    """The model named by ``config.name`` for examples of ``input_shape`` and ``classes`` outputs; with
    ``config.init_scale > 0``, its Linear and Conv2d weights drawn from N(0, init_scale^2) and their biases 0."""
    model = _named_model(config, input_shape, classes)
    if config.init_scale > 0:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.weight.normal_(0.0, config.init_scale)
                    if module.bias is not None:
                        module.bias.zero_()
    if channels_last_faults(model):
        set_channels_last(model, False)
    return model


def channels_last_faults(model: nn.Module) -> list[str]:
    """The convolutions of ``model`` whose weight gradient torch 2.13's CPU kernels get wrong on channels-last
    input: 1x1 kernels with a stride above 1 and 2 to 7 input channels (a ResNet's shortcut at width 2 to 7). Found
    on 2026-12-03: wrong by far more than rounding at 2 threads, and a corrupted heap at 1 (``free(): invalid size``);
    3x3 kernels, stride 1 and 1 or 8 to 16 input channels were right (tests/test_train.py). A model with one runs
    NCHW (:func:`build_model`)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8
    ]


def _named_model(config: ModelConfig, input_shape: Sequence[int], classes: int) -> nn.Module:
    if config.name == "mlp":
        inputs = 1
        for size in input_shape:
            inputs *= int(size)
        return MLP(inputs, config.hidden, classes, config.activation, config.residual, config.bias)
    if config.name == "lenet5":
        return LeNet5(input_shape, classes, config.activation)
    if config.name == "convnet":
        return ConvNet(input_shape, config.channels, config.hidden, classes, config.activation)
    if config.name == "sigmoid_resnet":
        inputs = 1
        for size in input_shape:
            inputs *= int(size)
        return SigmoidResNet(inputs, config.depth, config.width, classes, config.slope, config.init)
    if config.name == "resnet":
        return CifarResNet(input_shape, classes, config.depth, config.width)
    if config.name == "vit":
        return VisionTransformer(
            input_shape, classes, config.width, config.depth, config.heads, config.patch, config.mlp_ratio
        )
    raise ValueError(f"unknown model {config.name!r}; choose one of {', '.join(MODEL_NAMES)} (model.name)")


def set_channels_last(model: nn.Module, enabled: bool) -> None:
    """Turns the CPU channels-last order (:func:`cpu_channels_last`) of the conv models in ``model`` on or off; on
    is refused for a model with a convolution that order gets wrong (:func:`channels_last_faults`)."""
    faults = channels_last_faults(model) if enabled else []
    if faults:
        raise ValueError(
            f"channels-last on the CPU gives wrong weight gradients for the 1x1 strided convolution(s) "
            f"{', '.join(faults)} with fewer than 8 input channels (torch 2.13): keep this model NCHW"
        )
    for module in model.modules():
        if isinstance(module, LeNet5 | ConvNet | CifarResNet):
            module.channels_last = enabled
