"""Modelled seconds per training step that a device spends in collectives, by optimizer and number of devices P.

For the critical-batch study's cost section (``benchmarks/step_cost.py`` writes them to ``step_cost.json``): the
step costs there are measured on one device, and a P-device run also communicates. What travels, per step:

- every optimizer: the gradient allreduce of all parameters (DDP, in 25 MiB buckets), fp32;
- K-FAC besides: its factor reductions every ``factor_update_steps``, and at each decomposition step the finiteness
  checks and the decompositions' broadcasts, both every ``inv_update_steps``, and the preconditioned gradients'
  broadcasts, as distkfac plans them for the run's settings (``benchmarks/scale_model/rank_traffic.py``, which reads
  the exchanges' own plans; the busiest rank's broadcasts).

Each collective costs what the alpha-beta model of ``benchmarks/scale_model/network.py`` says on our stated network
(one 200 Gb/s InfiniBand HDR port per device, 5 us per message step), and nothing overlaps compute: an upper bound
on what communication adds. None of this depends on the batch size, so it is one number per (optimizer, P).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from benchmarks.scale_model.configs import Config
from benchmarks.scale_model.layer_sets import layer_set_from_module
from benchmarks.scale_model.network import Network, infiniband_hdr
from benchmarks.scale_model.projection import network_seconds
from benchmarks.scale_model.rank_traffic import busiest_rank, traffic
from jobs.config import build_config
from jobs.models import build_model
from jobs.optim import DTYPES

__all__ = ["DDP_BUCKET_BYTES", "communication_seconds", "network"]

DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb


def network() -> Network:
    return infiniband_hdr()


def _gradient_allreduce_s(net: Network, parameters: int, ranks: int) -> float:
    nbytes = 4 * parameters
    buckets = max(1, math.ceil(nbytes / DDP_BUCKET_BYTES))
    return buckets * net.seconds("allreduce", nbytes / buckets, ranks)


def _traffic_config(resolved: Mapping[str, Any]) -> Config:
    """The run's K-FAC settings as the traffic model takes them (jobs has no setting for the rest: defaults)."""
    kfac = resolved["kfac"]
    return Config.from_settings({
        "strategy": kfac["strategy"], "grad_worker_fraction": kfac["grad_worker_fraction"] or None,
        "compute_method": kfac["compute_method"], "damping_form": kfac["damping_form"] or None,
        "overlap_comm": kfac["overlap_comm"], "comm_dtype": DTYPES.get(kfac["comm_dtype"]),
        "bucket_cap_mb": kfac["bucket_cap_mb"], "split_factors_above": kfac["split_factors_above"] or None,
        "async_decompositions": kfac["async_decompositions"], "ddp": True,  # the gradients: DDP's allreduce, above
    })  # fmt: skip


def _kfac_s(resolved: Mapping[str, Any], net: Network, ranks: int) -> float:
    """K-FAC's own collectives per step, on average, of the busiest rank."""
    config = build_config({key: value for key, value in resolved.items() if key != "derived"})
    derived = resolved["derived"]
    model = build_model(config.model, tuple(derived["input_shape"]), int(derived["classes"]))
    example = torch.zeros(1, *derived["input_shape"])
    layer_set = layer_set_from_module(config.model.name, model, example)
    settings = _traffic_config(resolved)
    plan = traffic(layer_set, settings, ranks, busiest_rank(layer_set, settings, ranks))
    factors = network_seconds(net, plan.factor_calls()) / config.kfac.factor_update_steps
    decompositions = network_seconds(net, plan.checks + plan.decompositions) / config.kfac.inv_update_steps
    return factors + decompositions + network_seconds(net, plan.gradients)


def communication_seconds(resolved: Mapping[str, Any], largest: int) -> dict[str, float]:
    """Seconds per step in collectives on P = 1, 2, 4, .. ``largest`` devices for the run whose config.json is
    ``resolved`` (0 on one device)."""
    net = network()
    kfac = resolved["optim"]["name"] == "kfac"
    seconds = {}
    ranks = 1
    while ranks <= largest:
        total = _gradient_allreduce_s(net, int(resolved["derived"]["parameters"]), ranks)
        seconds[str(ranks)] = total + (_kfac_s(resolved, net, ranks) if kfac and ranks > 1 else 0.0)
        ranks *= 2
    return seconds
