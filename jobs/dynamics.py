"""Saddle-to-saddle instruments of a run (seed 004, docs/saddle.md).

Every ``run.dynamics_every`` steps, before that step's update, a ``"dynamics"`` record of the step's batch (the
whole training set with ``data.batch_size = 0``): the loss; the singular values and effective rank
(``run.rank_threshold``) of every Linear layer's weight; those of the product of the weights when the network is
linear (``W2 W1`` for two layers); and for ``W2 sigma(W1 x)`` the units' alignment ``|(I - P_1) w_i| / |P_1 w_i|``
with the top direction of Lemma 1 (median and largest over the units) and its ``s_1``. At the end, a ``"phases"``
record: the plateaus and drops of the recorded losses (``run.phase_tolerance``, ``run.phase_min_steps``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distkfac.saddle import (
    alignment,
    detect_phases,
    effective_rank,
    sigma_slopes,
    top_unit_directions,
    unit_matrices,
    units,
)
from jobs.config import Config
from jobs.metrics import read_metrics
from jobs.objective import batch_loss

__all__ = ["dynamics_due", "dynamics_record", "phases_record"]


def dynamics_due(config: Config, step: int) -> bool:
    """Whether the step after ``step`` completed steps is read (step 0 is: the initial point)."""
    every = config.run.dynamics_every
    return bool(every) and step % every == 0


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _is_linear_network(model: nn.Module, config: Config) -> bool:
    """Only Linear layers without biases, no residual paths and no activation: f(x) = W_L ... W_1 x."""
    m = config.model
    return m.name == "mlp" and m.activation == "none" and not m.bias and not m.residual


def _unit_fields(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: Config) -> dict[str, Any]:
    """The loss, and for two bias-free Linear layers the units' alignment with Lemma 1's top direction."""
    layers = _linears(model)
    with torch.enable_grad():
        outputs = model(x)
        loss = batch_loss(outputs, y, config.run.loss)
        (grad,) = torch.autograd.grad(loss, outputs)
    fields: dict[str, Any] = {"loss": float(loss)}
    if len(layers) != 2 or any(layer.bias is not None for _, layer in layers):
        return fields
    w1, w2 = layers[0][1].weight.detach(), layers[1][1].weight.detach()
    inputs = x.flatten(1).T
    slopes = sigma_slopes(config.model.activation, w1 @ inputs)
    matrices = unit_matrices(inputs, grad.T * len(grad), slopes)
    directions, top = top_unit_directions(matrices)
    ratios = alignment(units(w1, w2), directions).tolist()
    fields.update(alignment_median=statistics.median(ratios), alignment_max=max(ratios))
    fields["top_singular_value"] = float(top.max())
    return fields


@torch.no_grad()
def dynamics_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: Config, step: int) -> dict[str, Any]:
    """The ``"dynamics"`` record of ``model`` on the batch ``(x, y)`` after ``step`` steps."""
    threshold = config.run.rank_threshold
    record: dict[str, Any] = {"kind": "dynamics", "step": step, **_unit_fields(model, x, y, config)}
    values = {name: torch.linalg.svdvals(layer.weight.detach().double()) for name, layer in _linears(model)}
    record["singular_values"] = {name: s.tolist() for name, s in values.items()}
    record["ranks"] = {name: effective_rank(s, threshold) for name, s in values.items()}
    if _is_linear_network(model, config):
        product = None
        for _, layer in _linears(model):
            weight = layer.weight.detach().double()
            product = weight if product is None else weight @ product
        assert product is not None
        s = torch.linalg.svdvals(product)
        record["product_singular_values"] = s.tolist()
        record["product_rank"] = effective_rank(s, threshold)
    return record


def phases_record(out_dir: str | Path, config: Config) -> dict[str, Any] | None:
    """The ``"phases"`` record of the run's ``"dynamics"`` losses so far (None with fewer than two readings)."""
    readings = sorted((r["step"], r["loss"]) for r in read_metrics(out_dir) if r.get("kind") == "dynamics")
    if len(readings) < 2:
        return None
    steps, losses = zip(*readings, strict=True)
    phases = detect_phases(losses, config.run.phase_tolerance, config.run.phase_min_steps, steps)
    return {
        "kind": "phases",
        "step": steps[-1],
        "phases": [{"kind": p.kind, "start": p.start, "stop": p.stop} for p in phases],
    }
