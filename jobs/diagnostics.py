"""The Fisher-spectrum and gradient-outlier diagnostics of a run, every ``run.fisher_every`` steps (docs/fisher.md).

One pass over the first ``run.fisher_examples`` training examples (all when 0), each rank taking an equal share,
through :mod:`distkfac.diagnostics` and the run's communicator: the top eigenvalue of the empirical Fisher of the
training loss (of ``run.fisher_layer``'s parameters, or of the whole model), that eigenvalue without the
``run.fisher_trim`` fraction of examples with the largest projections on its eigenvector (both readings: the
eigenvector kept, and recomputed), and the median absolute deviation of the per-example gradient norms with the
counts of outliers at ``run.outlier_k`` MAD. The model is evaluated in eval mode, K-FAC's statistics are paused and no
random state is drawn: the training that follows is the same as without the diagnostics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from distkfac import KFACPreconditioner
from distkfac.diagnostics import (
    Rows,
    gradient_norms,
    mad_outliers,
    parameter_names,
    per_example_gradients,
    top_eigenpairs,
    trimmed_top_eigenvalue,
)
from jobs.config import Config, ConfigError
from jobs.datasets import Dataset
from jobs.parallel import Context

__all__ = ["check_fisher_layer", "fisher_record"]

CHUNK = 256  # examples per chunk of per-example gradients
IN_MEMORY_BYTES = 256 * 2**20  # below this, one pass of per-example gradients serves every statistic


def check_fisher_layer(model: nn.Module, config: Config) -> None:
    """A ``run.fisher_layer`` that is not a module of the model is refused before training."""
    layer = config.run.fisher_layer
    names = [name for name, module in model.named_modules() if name and any(True for _ in module.parameters())]
    if config.run.fisher_every and layer and layer not in names:
        raise ConfigError(f"run.fisher_layer = {layer!r} is not a layer of the model: choose one of {names}")


def _my_indices(data: Dataset, config: Config, context: Context) -> torch.Tensor:
    count = min(config.run.fisher_examples or len(data.train_x), len(data.train_x))
    return torch.tensor_split(torch.arange(count), context.world_size)[context.rank]


def _my_batches(data: Dataset, config: Config, context: Context) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    mine = _my_indices(data, config, context)
    for start in range(0, len(mine), CHUNK):
        idx = mine[start : start + CHUNK]
        yield data.prepare(data.train_x[idx], context.device), data.train_y[idx].to(context.device)


def _rows(model: nn.Module, data: Dataset, config: Config, context: Context) -> Rows:
    """This rank's per-example gradients: computed once and kept when they fit in ``IN_MEMORY_BYTES`` (every
    statistic then reads the same tensor), else recomputed chunk by chunk on each pass (memory bounded by a chunk)."""
    layer = config.run.fisher_layer or None

    def chunks() -> Iterator[torch.Tensor]:
        return per_example_gradients(model, _my_batches(data, config, context), layer, CHUNK)

    names = set(parameter_names(model, layer))
    width = sum(p.numel() for name, p in model.named_parameters() if name in names)
    count = len(_my_indices(data, config, context))
    fits = count * width * next(model.parameters()).element_size() <= IN_MEMORY_BYTES
    return torch.cat(list(chunks())) if fits else chunks


def fisher_record(
    model: nn.Module, data: Dataset, config: Config, context: Context, precond: KFACPreconditioner | None
) -> dict[str, Any]:
    """The ``"fisher"`` record's fields at this point of training. Collective: every rank calls it."""
    run = config.run
    was_training = model.training
    model.eval()
    pause = precond.paused() if precond is not None else contextlib.nullcontext()
    try:
        with pause:
            rows = _rows(model, data, config, context)
            top = top_eigenpairs(rows, 1, comm=context.comm)
            trimmed = trimmed_top_eigenvalue(rows, run.fisher_trim, context.comm, top=top)
            outliers = mad_outliers(gradient_norms(rows), run.outlier_k, context.comm)
    finally:
        model.train(was_training)
    return {
        "fisher_top": trimmed.full,
        "fisher_trimmed_fixed": trimmed.fixed,
        "fisher_trimmed_recomputed": trimmed.recomputed,
        "fisher_examples": trimmed.count,
        "fisher_method": top.method,
        "grad_norm_median": outliers.median,
        "grad_norm_mad": outliers.mad,
        "outliers_above": outliers.above,
        "outliers_deviating": outliers.deviating,
    }
