"""The Fisher-spectrum and gradient-outlier diagnostics of a run, every ``run.fisher_every`` steps and/or
``run.fisher_every_epochs`` epochs (docs/fisher.md).

One pass over the first ``run.fisher_examples`` training examples (all when 0), each rank taking an equal share,
through :mod:`distkfac.diagnostics` and the run's communicator: the top eigenvalue of the empirical Fisher of the
training loss (of ``run.fisher_layer``'s parameters, or of the whole model), that eigenvalue without the
``run.fisher_trim`` fraction of examples with the largest projections on its eigenvector (both readings: the
eigenvector kept, and recomputed), and the median absolute deviation of the per-example gradient norms with the
counts of outliers at ``run.outlier_k`` MAD. The model is evaluated in eval mode, K-FAC's statistics are paused and no
random state is drawn: the training that follows is the same as without the diagnostics. With ``run.fisher_save``,
rank 0 also writes every example's projection ``a_i`` and gradient norm to ``fisher/step_<N>.pt`` (the histograms
of the paper's Figures 2 to 5).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
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
    projections,
    top_eigenpairs,
    trimmed_top_eigenvalue,
)
from distkfac.diagnostics.gather import gather_rows, shard_of
from distkfac.diagnostics.per_example import factorable_layers, linear_factors
from jobs.config import Config, ConfigError
from jobs.datasets import Dataset
from jobs.files import atomic_write_bytes
from jobs.parallel import Context

__all__ = [
    "FISHER_DIR",
    "check_fisher_layer",
    "fisher_due",
    "fisher_record",
    "load_fisher_values",
    "save_fisher_values",
]

CHUNK = 256  # examples per chunk of per-example gradients
IN_MEMORY_BYTES = 256 * 2**20  # below this, one pass of per-example gradients serves every statistic
FACTORS_BYTES = 1024 * 2**20  # below this, Linear layers' per-example gradients are kept as factors
FISHER_DIR = "fisher"  # under the run's out_dir: step_<N>.pt with run.fisher_save


def fisher_due(config: Config, step: int, steps_per_epoch: int) -> bool:
    """Whether a ``"fisher"`` record falls after optimizer step ``step`` (counted from 1)."""
    run = config.run
    every_steps = bool(run.fisher_every) and step % run.fisher_every == 0
    return every_steps or (bool(run.fisher_every_epochs) and step % (run.fisher_every_epochs * steps_per_epoch) == 0)


def layer_names(model: nn.Module) -> list[str]:
    """The names ``run.fisher_layer`` may take: the model's modules that have parameters."""
    return [name for name, module in model.named_modules() if name and any(True for _ in module.parameters())]


def check_fisher_layer(model: nn.Module, config: Config) -> None:
    """A ``run.fisher_layer`` that is not a module of the model is refused before training."""
    layer, run = config.run.fisher_layer, config.run
    names = layer_names(model)
    if (run.fisher_every or run.fisher_every_epochs) and layer and layer not in names:
        raise ConfigError(f"run.fisher_layer = {layer!r} is not a layer of the model: choose one of {names}")


def _my_indices(data: Dataset, config: Config, context: Context) -> torch.Tensor:
    count = min(config.run.fisher_examples or len(data.train_x), len(data.train_x))
    return torch.tensor_split(torch.arange(count), context.world_size)[context.rank]


def _my_batches(data: Dataset, config: Config, context: Context) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    mine = _my_indices(data, config, context)
    for start in range(0, len(mine), CHUNK):
        idx = mine[start : start + CHUNK]
        yield data.prepare(data.train_x[idx], context.device), data.train_y[idx].to(context.device)


def gradient_rows(model: nn.Module, data: Dataset, config: Config, context: Context) -> Rows:
    """This rank's per-example gradients, the cheapest way that fits: Linear layers' factors (``a_i`` and ``g_i``)
    when every analysed parameter is a Linear layer's and they fit in ``FACTORS_BYTES``; else the rows computed once
    and kept when they fit in ``IN_MEMORY_BYTES`` (every statistic then reads the same tensor); else recomputed chunk
    by chunk on each pass (memory bounded by a chunk)."""
    layer = config.run.fisher_layer or None
    count = len(_my_indices(data, config, context))
    size = next(model.parameters()).element_size()
    owners = factorable_layers(model, layer)
    if owners is not None:
        linears = [dict(model.named_modules())[name] for name in owners]
        factor_width = sum(m.in_features + m.out_features for m in linears if isinstance(m, nn.Linear))
        if count * factor_width * size <= FACTORS_BYTES:
            return linear_factors(model, _my_batches(data, config, context), layer, CHUNK)

    def chunks() -> Iterator[torch.Tensor]:
        return per_example_gradients(model, _my_batches(data, config, context), layer, CHUNK)

    names = set(parameter_names(model, layer))
    width = sum(p.numel() for name, p in model.named_parameters() if name in names)
    return torch.cat(list(chunks())) if count * width * size <= IN_MEMORY_BYTES else chunks


def fisher_record(
    model: nn.Module, data: Dataset, config: Config, context: Context, precond: KFACPreconditioner | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``"fisher"`` record's fields at this point of training, and with ``run.fisher_save`` every example's
    ``projection`` on the top eigenvector and gradient ``norm`` (all ranks' examples, in order; else empty).
    Collective: every rank calls it."""
    run = config.run
    was_training = model.training
    model.eval()
    pause = precond.paused() if precond is not None else contextlib.nullcontext()
    try:
        with pause:
            rows = gradient_rows(model, data, config, context)
            top = top_eigenpairs(rows, 1, comm=context.comm)
            trimmed = trimmed_top_eigenvalue(rows, run.fisher_trim, context.comm, top=top)
            norms = gradient_norms(rows)
            outliers = mad_outliers(norms, run.outlier_k, context.comm)
            values = _every_example(rows, top.vectors[:, 0], norms, context) if run.fisher_save else {}
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
    }, values


def _every_example(rows: Rows, vector: torch.Tensor, norms: torch.Tensor, context: Context) -> dict[str, torch.Tensor]:
    """All ranks' projections on ``vector`` and gradient norms, in example order (collective)."""
    shard = shard_of(len(norms), context.comm)
    a = gather_rows(projections(rows, vector), shard, context.comm)
    return {"projection": a.float().cpu(), "norm": gather_rows(norms, shard, context.comm).float().cpu()}


def save_fisher_values(out_dir: Path, step: int, epoch: int, values: dict[str, torch.Tensor]) -> Path:
    """``fisher/step_<step>.pt`` under ``out_dir``: the record's per-example values, written atomically."""
    buffer = io.BytesIO()
    torch.save({"step": step, "epoch": epoch, **values}, buffer)
    path = out_dir / FISHER_DIR / f"step_{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_fisher_values(out_dir: Path) -> list[dict[str, Any]]:
    """Every ``fisher/step_<N>.pt`` of a run, in step order."""
    paths = sorted((out_dir / FISHER_DIR).glob("step_*.pt"))
    return [torch.load(path, weights_only=True) for path in paths]
