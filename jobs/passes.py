"""A training step's batch in several forward/backward passes (gradient accumulation), ``run.micro_batch``.

Each pass backpropagates the mean loss of its examples, so the parameters' gradients sum k pass means; they are
divided by k before K-FAC, the gradient averaging and the optimizer read them. With k equal passes that is the
batch's mean gradient, and distkfac's factors are the mean of the passes' batch factors (docs/kfac.md, "Gradient
accumulation"), which is the batch's factor: the step is the one-pass step up to float32 rounding.

On the CPU, smaller passes keep the activations in cache. On the CIFAR-10 study's ConvNet (one thread, batches of
512, 2048 and 8192), SGD's step was 1.26-1.31x faster in passes of 64 examples, K-FAC's 1.09-1.12x, as its factor
products dominate (docs/benchmarks.md, "Micro-batches"). ``run.micro_batch = 0`` (auto) takes passes of
AUTO_PASS_EXAMPLES there: on the CPU, in a model with convolutions (whose activations, one per image position,
outgrow the caches), for a rank batch of at least AUTO_FROM_BATCH and a multiple of the pass, in a model without
batch statistics or dropout (whose steps would change, not only their rounding), and not with K-FAC's
``g_scale = "batch"`` (whose G depends on the pass's size). GPUs and models without convolutions (an MLP's
activations are a few megabytes at batch 8192) keep one pass: not measured here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from jobs.config import ConfigError
from jobs.objective import hits

__all__ = ["AUTO_PASS_EXAMPLES", "backward_in_passes", "pass_examples"]

LossOf = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Passes of 64 were the fastest of 64, 128 and 256 in 5 of the 6 measured cases, from batch 512 on, the smallest
# measured (docs/benchmarks.md, "Micro-batches").
AUTO_PASS_EXAMPLES = 64
AUTO_FROM_BATCH = 512


def pass_examples(requested: int, batch: int, model: nn.Module, device: torch.device, g_scale: str | None) -> int:
    """Examples per forward/backward pass for this rank's ``batch``: ``requested`` (``run.micro_batch``), or with 0
    the automatic choice above; ``batch`` itself for one pass. ``g_scale`` is K-FAC's, None without K-FAC."""
    if requested < 0:
        raise ConfigError(f"run.micro_batch must be >= 0 (0: chosen automatically), got {requested}")
    if requested:
        if batch % requested:
            raise ConfigError(
                f"run.micro_batch = {requested} does not divide this rank's batch of {batch} examples (unequal "
                "passes would weight their examples unequally): choose a divisor of it, or 0 to choose automatically"
            )
        if g_scale == "batch" and requested != batch:
            raise ConfigError(
                "run.micro_batch splits the batch, but kfac.g_scale = 'batch' makes G depend on the pass's size: "
                "use kfac.g_scale = 'example', or set run.micro_batch to the rank's batch"
            )
        return requested
    modules = list(model.modules())
    changes_the_step = any(isinstance(m, _BatchNorm | _DropoutNd) for m in modules) or g_scale == "batch"
    measured = device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in modules)
    if not measured or changes_the_step or batch < AUTO_FROM_BATCH or batch % AUTO_PASS_EXAMPLES:
        return batch
    return AUTO_PASS_EXAMPLES


def backward_in_passes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pass_size: int,
    loss_of: LossOf,
    before_backward: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagates the batch ``(x, y)`` in passes of ``pass_size`` examples and leaves their mean gradient in
    ``.grad``, as one pass would; returns the batch's mean loss and its hits. ``before_backward`` sees each pass's
    outputs first (K-FAC's ``mc_backward``). Under DDP, the ranks' gradients are averaged once, in the last pass."""
    passes = list(zip(x.split(pass_size), y.split(pass_size), strict=True))
    loss_sum = correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for i, (xs, ys) in enumerate(passes):
        with _sync_unless(model, later=i < len(passes) - 1):
            outputs = model(xs)
            loss = loss_of(outputs, ys)
            if before_backward is not None:
                before_backward(outputs)
            loss.backward()
        with torch.no_grad():
            loss_sum = loss_sum + loss.detach().double() * len(ys)
            correct = correct + hits(outputs, ys)
    if len(passes) == 1:
        return loss, correct
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(len(passes))
    return (loss_sum / len(y)).to(loss.dtype), correct


def _sync_unless(model: nn.Module, later: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's all-reduce left to a later pass of the step (``later``); nothing to leave otherwise."""
    if later and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
