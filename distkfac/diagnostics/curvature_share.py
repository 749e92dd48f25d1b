"""How much of K-FAC's eigen preconditioner is curvature and how much is damping, layer by layer.

In the eigenbasis of a layer's factors, K-FAC divides each gradient coordinate by a damped eigenvalue ``D`` (tikhonov:
``c + damping`` with the curvature ``c = d_G d_A``; the factored forms: a product of shifted eigenvalues, see
docs/kfac.md). Where the curvature is small beside the damping, ``D`` is the damping and the step is the gradient
divided by it: SGD with learning rate ``lr / damping``. The *curvature share* of a direction, ``1 - damping / D``,
says how far its step is from that: 0 where damping alone sets it, towards 1 where curvature does.

Two means of it per layer, which can differ a lot:

- ``share``: over the layer's ``g_dim x a_dim`` eigen-directions, one per weight: how many directions curvature sets;
- ``energy``: weighted by ``c``, which is also the expected squared gradient coordinate of one example in that
  direction under K-FAC's own model of the gradients' second moment: how much of a gradient curvature sets. The
  gradients of a network concentrate in its few directions of large curvature, so a layer can have most directions
  damped (a small ``share``) and yet most of its gradient preconditioned (a large ``energy``).

Read from a :meth:`distkfac.KFACPreconditioner.state_dict` or :meth:`~distkfac.KFACPreconditioner.decompositions`
(``compute_method="eigen"``), live or from a checkpoint. In a distributed run each rank holds the decompositions of
some layers: :func:`gathered_shares` puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distkfac.comm import Communicator
from distkfac.methods import EigenMethod

PURPOSE = "curvature share"
HALF: float = 0.5  # a direction counts as curvature-led where curvature at least halves the step of gradient / damping


@dataclass(frozen=True)
class CurvatureShare:
    """One layer's preconditioner, compared with its damping."""

    layer: str
    directions: int  # eigen-directions, one per weight (g_dim x a_dim; 2 per unit for a unit-wise layer)
    share: float  # mean over the directions of 1 - damping / D: 0 = gradient / damping (SGD), towards 1 = curvature
    led: float  # the fraction of directions whose share is at least 1/2 (tikhonov: curvature d_G d_A >= damping)
    energy: float  # the mean of 1 - damping / D weighted by the curvature c (0 where every c is 0)


def current_damping(state: Mapping[str, Any], damping: float) -> float:
    """The damping in force: the adaptive controller's lambda where the state holds one, else ``damping``."""
    controller = state.get("damping")
    return float(controller["value"]) if isinstance(controller, Mapping) else float(damping)


def layer_share(name: str, a_state: Sequence[torch.Tensor], g_state: Sequence[torch.Tensor], damping: float,
                damping_form: str) -> CurvatureShare:  # fmt: skip
    """The curvature share of one layer from its eigenvalues (the last tensor of each state; an empty ``a_state`` is a
    unit-wise layer, whose one factor takes the whole damping)."""
    if damping <= 0:
        raise ValueError(f"damping {damping!r} must be positive: the share compares the curvature with it")
    d_g = g_state[-1].detach().double().reshape(1, -1)
    if len(a_state) == 0:
        curvature, denominators = d_g, d_g + damping
    else:
        d_a = a_state[-1].detach().double().reshape(1, -1)
        curvature = d_g.unsqueeze(2) * d_a.unsqueeze(1)
        denominators = EigenMethod(damping_form).damped_eigenvalues(d_a, d_g, damping)
    shares = 1.0 - damping / denominators
    total = float(curvature.sum())
    energy = float((shares * curvature).sum()) / total if total > 0 else 0.0
    return CurvatureShare(name, shares.numel(), float(shares.mean()), float((shares >= HALF).double().mean()), energy)


def curvature_shares(state: Mapping[str, Any], damping: float) -> list[CurvatureShare]:
    """The curvature share of every layer whose decomposition ``state`` (a preconditioner's ``state_dict``) holds, at
    the constructor's ``damping`` (or the adaptive controller's current value, which the state holds)."""
    if (method := state.get("compute_method")) != "eigen":
        raise ValueError(
            f"the curvature share needs eigenvalues, and this state's compute_method is {method!r}: it is defined "
            "for compute_method='eigen' only"
        )
    value = current_damping(state, damping)
    form = state["conventions"]["damping_form"]
    return [
        layer_share(name, layer["a_state"], layer["g_state"], value, form)
        for name, layer in state["layers"].items()
        if layer.get("a_state") is not None and layer.get("g_state")
    ]


def overall_share(layers: Sequence[CurvatureShare]) -> CurvatureShare:
    """The means of ``layers`` pooled over their directions (one per weight), as one ``"all"`` entry. The energy,
    too, is each layer's weighted by its weights: curvatures of different layers have different scales, and pooled
    by curvature the layers of the largest scale would decide alone."""
    total = sum(layer.directions for layer in layers)
    if total == 0:
        raise ValueError("no layer holds a decomposition: the preconditioner has not decomposed its factors yet")
    share, led, energy = (
        sum(getattr(x, key) * x.directions for x in layers) / total for key in ("share", "led", "energy")
    )
    return CurvatureShare("all", total, share, led, energy)


def gathered_shares(
    state: Mapping[str, Any], damping: float, names: Sequence[str], comm: Communicator, device: torch.device
) -> list[CurvatureShare]:
    """Collective: the share of every layer in ``names`` that some rank has decomposed, on every rank, in ``names``'
    order. Each rank reads the layers its ``state`` holds; a layer held on several ranks has the same decomposition
    on each, and counts once. ``device`` is where the communicator reduces (a CUDA device for NCCL)."""
    mine = {share.layer: share for share in curvature_shares(state, damping)}
    sums = torch.zeros(len(names), 5, dtype=torch.float64)
    for row, name in enumerate(names):
        if (x := mine.get(name)) is not None:
            sums[row] = torch.tensor([1.0, x.directions, x.share, x.led, x.energy], dtype=torch.float64)
    total = sums.to(device)
    comm.allreduce_sum(total, PURPOSE).wait()
    return [  # a layer held by several ranks: sums of the same values, divided by their count
        CurvatureShare(name, round(directions / held), share / held, led / held, energy / held)
        for name, (held, directions, share, led, energy) in zip(names, total.tolist(), strict=True)
        if held > 0
    ]
