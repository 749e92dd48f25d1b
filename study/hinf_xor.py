"""``python -m study hinf-xor --config STUDY.toml``: seed 001's XOR study, epochs to converge against depth for g-EHF,
Adam and steepest descent (docs/hinf.md). Every (method, depth, chunk of seeds) is one result file, written
atomically when the chunk ends, so a stopped study continues where it stopped: run the same command again.

A study file (example: ``jobs/configs/studies/hinf_xor.toml``)::

    [study]
    name = "hinf-xor"
    out_dir = "runs/hinf-xor"              # relative to the current directory

    [task]                                  # jobs.xor.XorTask, for every method
    width = 5
    slope = 2.5
    init = 0.05
    threshold = 0.01

    [methods.g-EHF]                         # any name; kind = hinf | adam | steepest
    kind = "hinf"
    gamma_f = 1.7
    eps0 = 10.0
    max_epochs = 100                        # the budget: a seed not converged by then counts as not converged
    depths = [5, 101, 201, 401, 801, 1001]
    seeds = [100, 100, 100, 100, 20, 20]    # seeds 0 .. count-1 at each depth
    compare = "hinf"                        # the paper's column to compare with (hinf | adam | steepest | "")

    [methods.adam]
    kind = "adam"
    lr = 0.01
    betas = [0.79, 0.78]
    eps = 1e-8
    per_pattern = false                     # one step per epoch on the four patterns (true: one per pattern)
    batch = 100                             # seeds trained together (one result file)
    ...
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.config import StudyError, key_error

__all__ = ["HinfStudy", "Method", "Unit", "load_hinf_study", "read_results", "run_hinf_study", "units"]

KINDS: dict[str, dict[str, Any]] = {
    "hinf": {"gamma_f": 1.7, "eps0": 10.0},
    "adam": {"lr": 0.01, "betas": [0.79, 0.78], "eps": 1e-8, "per_pattern": False},
    "steepest": {"eps0": 10.0},
}
COMMON = {"kind", "max_epochs", "depths", "seeds", "compare", "batch"}
TASK_KEYS = {"width": 5, "slope": 2.5, "init": 0.05, "threshold": 1e-2}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    settings: Mapping[str, Any]
    max_epochs: int
    depths: tuple[int, ...]
    seeds: tuple[int, ...]
    compare: str
    batch: int


@dataclass(frozen=True)
class HinfStudy:
    path: Path
    name: str
    out_dir: Path
    task: Mapping[str, float]
    methods: tuple[Method, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Unit:
    """One result file: a method at one depth over seeds ``first .. last``."""

    method: Method
    depth: int
    first: int
    last: int

    def path(self, out_dir: Path) -> Path:
        return out_dir / self.method.name / f"L{self.depth}" / f"seeds-{self.first}-{self.last}.json"


def _positive_ints(path: Path, key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise key_error(path, key, f"a non-empty list of positive integers, got {value!r}")
    return tuple(value)


def _method(path: Path, name: str, raw: Any) -> Method:
    key = f"methods.{name}"
    if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
        raise key_error(path, f"{key}.kind", f"one of {', '.join(KINDS)}")
    kind = raw["kind"]
    unknown = sorted(set(raw) - COMMON - set(KINDS[kind]))
    if unknown:
        raise key_error(path, key, f"unknown keys {unknown}; a {kind} method takes {sorted(COMMON | set(KINDS[kind]))}")
    depths = _positive_ints(path, f"{key}.depths", raw.get("depths"))
    seeds = _positive_ints(path, f"{key}.seeds", raw.get("seeds"))
    if len(depths) != len(seeds):
        raise key_error(path, key, f"depths has {len(depths)} entries and seeds {len(seeds)}: one seed count per depth")
    bad = [d for d in depths if d < 5 or d % 2 == 0]
    if bad:
        raise key_error(path, f"{key}.depths", f"{bad}: the network has L = 2n + 3 layers (5, 7, 9, ...)")
    max_epochs, batch = raw.get("max_epochs", 100), raw.get("batch", 100)
    if not isinstance(max_epochs, int) or max_epochs < 1 or not isinstance(batch, int) or batch < 1:
        raise key_error(path, key, f"max_epochs and batch must be positive integers, got {max_epochs!r}, {batch!r}")
    settings = {**KINDS[kind], **{k: v for k, v in raw.items() if k in KINDS[kind]}}
    compare = raw.get("compare", kind)
    if compare not in ("", *KINDS):
        raise key_error(path, f"{key}.compare", f'one of hinf, adam, steepest or "", got {compare!r}')
    return Method(name, kind, settings, max_epochs, depths, seeds, compare, 1 if kind == "hinf" else batch)


def load_hinf_study(path: str | Path, out_dir: str | Path | None = None) -> HinfStudy:
    """The study file, checked; StudyError naming the key and the fix when something is wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StudyError(f"{path}: cannot read the study file: {exc}") from None
    study, task, methods = raw.get("study", {}), raw.get("task", {}), raw.get("methods", {})
    unknown = sorted(set(task) - set(TASK_KEYS))
    if unknown:
        raise key_error(path, "task", f"unknown keys {unknown}; known: {sorted(TASK_KEYS)}")
    if not isinstance(methods, dict) or not methods:
        raise key_error(path, "methods", "give at least one [methods.NAME] table")
    return HinfStudy(
        path, str(study.get("name", path.stem)), Path(out_dir or study.get("out_dir", f"runs/{path.stem}")),
        {**TASK_KEYS, **task}, tuple(_method(path, name, body) for name, body in methods.items()),
    )  # fmt: skip


def units(study: HinfStudy, methods: Sequence[str] = (), depths: Sequence[int] = ()) -> Iterator[Unit]:
    """Every result file of the study (optionally only some methods and depths), in the file's order."""
    for method in study.methods:
        if methods and method.name not in methods:
            continue
        for depth, count in zip(method.depths, method.seeds, strict=True):
            if depths and depth not in depths:
                continue
            for first in range(0, count, method.batch):
                yield Unit(method, depth, first, min(first + method.batch, count) - 1)


def _train(study: HinfStudy, unit: Unit) -> list[dict[str, Any]]:
    from jobs.xor import XorTask, train_adam, train_hinf, train_steepest

    task = XorTask(depth=unit.depth, max_epochs=unit.method.max_epochs, **study.task)  # type: ignore[arg-type]
    seeds, s = list(range(unit.first, unit.last + 1)), unit.method.settings
    if unit.method.kind == "hinf":
        runs = [train_hinf(task, seed, s["gamma_f"], s["eps0"]) for seed in seeds]
    elif unit.method.kind == "adam":
        runs = train_adam(task, seeds, s["lr"], tuple(s["betas"]), s["eps"], s["per_pattern"])
    else:
        runs = train_steepest(task, seeds, s["eps0"])
    return [run.as_dict() for run in runs]


def run_hinf_study(
    study: HinfStudy, methods: Sequence[str] = (), depths: Sequence[int] = (), train: bool = True
) -> Path:
    """Trains every result file not yet written (none when ``train`` is false), then writes the report; returns its
    path."""
    from jobs.files import atomic_write_text
    from study.hinf_report import write_hinf_report

    for unit in units(study, methods, depths):
        target = unit.path(study.out_dir)
        if target.exists() or not train:
            continue
        runs = _train(study, unit)
        record = {"method": unit.method.name, "kind": unit.method.kind, "depth": unit.depth,
                  "settings": dict(unit.method.settings), "runs": runs}  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(record) + "\n")
        converged = [r["epochs"] for r in runs if r["epochs"] is not None]
        mean = sum(converged) / len(converged) if converged else math.nan
        print(f"{unit.method.name} L={unit.depth} seeds {unit.first}-{unit.last}: {len(converged)}/{len(runs)} "
              f"converged, mean {mean:.1f} epochs", flush=True)  # fmt: skip
    return write_hinf_report(study)


def read_results(study: HinfStudy) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every written run, by (method name, depth), seeds in order."""
    found: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for unit in units(study):
        target = unit.path(study.out_dir)
        if target.exists():
            found.setdefault((unit.method.name, unit.depth), []).extend(json.loads(target.read_text())["runs"])
    return found
