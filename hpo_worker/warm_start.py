"""Warm start: given points of a search space, queued as an experiment's first trials, before TPE proposes any
(``python -m hpo_worker driver --warm-start FILE``; docs/hpo.md).

A points file is TOML, one ``[[points]]`` table per trial, keyed by the space's labels::

    [[points]]            # e.g. a paper's Table 1
    lr = 0.1
    momentum = 0.9
    decay_factor = 0.5
    decay_epoch = 30
    weight_decay = 5e-4

Every point must give every parameter of the space, within its bounds (or one of its options). The points count
as trials of the experiment: they take the first tids and count toward ``--max-evals``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpo_worker.spaces import ParamSpec, SearchSpace

__all__ = ["WarmStartError", "check_point", "hyperopt_vals", "load_points", "point_of", "points_toml"]


class WarmStartError(ValueError):
    """A points file or point that cannot be used; the message names the point, the parameter and the fix."""


def _check_value(where: str, param: ParamSpec, value: Any) -> None:
    if param.dist == "choice":
        if value not in param.options:
            raise WarmStartError(f"{where}: {param.label} = {value!r} is not one of its options {list(param.options)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WarmStartError(f"{where}: {param.label} = {value!r} is not a number")
    slack = param.q / 2  # a q-distribution rounds to multiples of q, which may pass a bound by up to q / 2
    if not param.low - slack <= value <= param.high + slack:
        raise WarmStartError(
            f"{where}: {param.label} = {value!r} is outside the space [{param.low:g}, {param.high:g}]: move the "
            "point inside, or widen the space"
        )


def check_point(space: SearchSpace, point: Mapping[str, Any], where: str = "point") -> None:
    """Raises WarmStartError unless ``point`` gives every parameter of ``space``, each inside the space."""
    labels = [p.label for p in space.params]
    unknown, missing = sorted(set(point) - set(labels)), [label for label in labels if label not in point]
    if unknown or missing:
        raise WarmStartError(
            f"{where}: the space {space.name!r} has the parameters {labels}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
        )
    for param in space.params:
        _check_value(where, param, point[param.label])


def load_points(path: str | Path, space: SearchSpace) -> list[dict[str, Any]]:
    """The ``[[points]]`` of the TOML file ``path``, each checked against ``space``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise WarmStartError(f"warm-start file {path}: cannot read it: {exc}") from None
    points = raw.get("points")
    if set(raw) != {"points"} or not isinstance(points, list) or not points:
        raise WarmStartError(f"warm-start file {path}: give one or more [[points]] tables and nothing else")
    for index, point in enumerate(points, 1):
        check_point(space, point, f"warm-start file {path}, point {index}")
    return [dict(point) for point in points]


def hyperopt_vals(space: SearchSpace, point: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``point`` as hyperopt's ``misc.vals``: a one-element list per label, a choice as its option's index."""
    return {p.label: [p.options.index(point[p.label]) if p.dist == "choice" else point[p.label]] for p in space.params}


def point_of(space: SearchSpace, vals: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The point of a trial's ``misc.vals`` (the inverse of :func:`hyperopt_vals`): e.g. a finished trial's, to seed
    another experiment with."""
    return {p.label: p.options[int(vals[p.label][0])] if p.dist == "choice" else vals[p.label][0] for p in space.params}


def points_toml(points: Sequence[Mapping[str, Any]]) -> str:
    """A points file holding ``points`` (numbers and strings), as :func:`load_points` reads it."""
    tables = []
    for point in points:
        lines = [f"{json.dumps(label)} = {json.dumps(value)}" for label, value in point.items()]
        tables.append("[[points]]\n" + "\n".join(lines) + "\n")
    return "\n".join(tables)
