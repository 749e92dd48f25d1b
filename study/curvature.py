"""The report's "K-FAC: curvature or damping?" section: the curvature share of K-FAC's preconditioner
(distkfac.diagnostics.curvature_share) at the end of each K-FAC cell's runs, at their tuned damping.

A share of 0 means the damping sets the step in every eigen-direction (K-FAC is then SGD with learning rate
``lr / damping``); towards 1, the curvature sets it. Its mean over the weights and its mean weighted by the gradient's
expected energy can differ a lot (the module's docstring). Runs record both at each evaluation (``jobs.loop``); for
runs made before they did, they are read from the run's latest checkpoint, when the run folder still has one.
"""

from __future__ import annotations

import json
import pickle
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from distkfac.diagnostics.curvature_share import CurvatureShare, curvature_shares, overall_share
from jobs.checkpoint import CheckpointRef, find_latest
from study.report import CellKey, _by_cell, _sorted_keys, best_runs, markdown_table, read_metrics_file, run_hparams

EXPLANATION: Final = (
    "In the eigenbasis of a layer's Kronecker factors, K-FAC divides each gradient coordinate by `d_G d_A + damping`"
    " (tikhonov). The curvature share of a direction is `1 - damping / (d_G d_A + damping)`: 0 where the damping "
    "alone sets the step (there K-FAC is SGD with learning rate lr / damping), towards 1 where the curvature does. "
    "Below, at the end of each cell's runs (the repeats of the best setting, else the best run; ± the standard error "
    "over them): its mean over the weights; its mean weighted by `d_G d_A`, which is also the expected squared "
    "gradient coordinate of one example under K-FAC's model (how much of a gradient the curvature sets; layers "
    "pooled by their weights); the fraction of directions where the curvature at least halves the step; and each "
    "layer's two means, first layer to last (distkfac.diagnostics.curvature_share)."
)


@dataclass(frozen=True)
class RunCurvature:
    """A run's curvature share at its end: over the weights, by gradient energy, the fraction of curvature-led
    directions, and each layer's share and energy."""

    share: float
    energy: float
    led: float
    layers: dict[str, tuple[float, float]]  # each layer's share and energy


def run_curvature(run: Mapping[str, Any]) -> RunCurvature | None:
    """The last evaluation's record of the run; for a run made before runs recorded it, its latest checkpoint's
    decompositions. None for a run that is not K-FAC (eigen), or has neither."""
    path = str(run.get("metrics_path") or "")
    recorded = [r for r in read_metrics_file(path) if r.get("kind") == "eval" and "curvature_energy" in r]
    if recorded:
        last = recorded[-1]
        layers = {name: (v["share"], v["energy"]) for name, v in last["curvature_layers"].items()}
        return RunCurvature(last["curvature_share"], last["curvature_energy"], last["curvature_led"], layers)
    return checkpoint_curvature(Path(path).parent) if path else None


def checkpoint_curvature(run_dir: Path) -> RunCurvature | None:
    """The curvature share of the K-FAC decompositions in the run's latest checkpoint (every rank's file, each layer
    once), at the damping of its config.json. None without a K-FAC (eigen) checkpoint, and with one that cannot be
    read: one old run's damaged checkpoint does not stop the report."""
    config_path = run_dir / "config.json"
    try:
        ref = find_latest(run_dir) if config_path.is_file() else None
        config = json.loads(config_path.read_text()) if ref is not None else None
        if (
            ref is None
            or config is None
            or config["optim"]["name"] != "kfac"
            or config["kfac"]["compute_method"] != "eigen"
        ):
            return None
        layers = _checkpoint_layers(ref, config["kfac"]["damping"])
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    if not layers:
        return None
    pooled = overall_share(list(layers.values()))
    by_layer = {name: (x.share, x.energy) for name, x in layers.items()}
    return RunCurvature(pooled.share, pooled.energy, pooled.led, by_layer)


def _checkpoint_layers(ref: CheckpointRef, damping: float) -> dict[str, CurvatureShare]:
    layers: dict[str, CurvatureShare] = {}
    for path in sorted(ref.folder.glob(f"{ref.name}.rank*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True).get("kfac")
        if state is not None:
            layers.update({share.layer: share for share in curvature_shares(state, damping)})
    return layers


def _mean_se(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def _row(key: CellKey, runs: Sequence[Mapping[str, Any]], measured: Sequence[RunCurvature]) -> list[str]:
    damping = run_hparams(runs[0]).get("kfac.damping")
    layers = [[m.layers[name] for m in measured if name in m.layers] for name in measured[0].layers]
    by_layer = [f"{statistics.fmean(s for s, _ in v):.3f} / {statistics.fmean(e for _, e in v):.3f}" for v in layers]
    return [
        key[0] or "–",
        str(key[2]),
        f"{damping:.3g}" if isinstance(damping, int | float) else "–",
        f"{len(measured)} of {len(runs)}",
        _mean_se([m.share for m in measured]),
        _mean_se([m.energy for m in measured]),
        f"{100 * statistics.fmean(m.led for m in measured):.1f}%",
        ", ".join(by_layer),
    ]


def curvature_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The section, for the cells whose runs measured it: K-FAC's, eigen (nothing when none did)."""
    repeats, best = _by_cell(r for r in runs if r.get("source") == "repeat"), best_runs(runs)
    rows, unmeasured = [], []
    for key in _sorted_keys({*repeats, *best}):
        chosen = repeats.get(key) or [best[key]]
        measured = [m for run in chosen if (m := run_curvature(run)) is not None]
        if measured:
            rows.append(_row(key, chosen, measured))
        elif key[1] == "kfac":
            unmeasured.append(f"{key[0]}/{key[2]}" if key[0] else str(key[2]))
    if not rows:
        return []
    header = ["variant", "batch", "damping", "runs", "share, by weights", "share, by gradient energy",
              "curvature-led directions", "by layer (weights / energy)"]  # fmt: skip
    if not any(key[0] for key in {*repeats, *best}):  # one variant: no column for it
        header, rows = header[1:], [row[1:] for row in rows]
    lines = ["## K-FAC: curvature or damping?", "", EXPLANATION, "", markdown_table(header, rows), ""]
    if unmeasured:  # say so, rather than leave the reader to count the rows
        lines += [f"Not measured at batch {', '.join(unmeasured)}: those runs predate the record and their folders "
                  "hold no K-FAC checkpoint.", ""]  # fmt: skip
    return lines
