"""``python -m study saddle --config STUDY.toml``: seed 004's saddle-to-saddle study (docs/saddle.md). Every case
(a training config) runs with every method (config overrides) at every initial scale and seed, through
``jobs.train``'s loop with the saddle instruments on; each run is a folder under the study's ``out_dir``, and a run
whose ``summary.json`` says finished is not run again, so a stopped study continues where it stopped.

A study file (example: ``jobs/configs/studies/saddle.toml``)::

    [study]
    name = "saddle"
    out_dir = "runs/saddle"                 # relative to the current directory
    scales = [1e-2, 1e-4, 1e-6]             # model.init_scale
    seeds = [0, 1, 2, 3, 4]                 # run.seed: the initial weights (a teacher's data come from data.*)

    [cases.teacher]                         # any name
    config = "jobs/configs/saddle_teacher.toml"   # relative to the current directory
    overrides = []                          # section.key=value, applied after the file
    target_fraction = 1e-3                  # steps to target: to a loss below this fraction of the initial loss

    [methods.gd]                            # any name; the first method is the baseline of the ratios
    overrides = ["optim.name=gd"]
    [methods.skip]
    overrides = ["optim.name=skip_gd", "optim.skip_strength=0.05"]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.config import StudyError, key_error

__all__ = ["DONE", "Case", "SaddleRun", "SaddleStudy", "load_saddle_study", "run_saddle_study", "runs"]

DONE = ("finished", "diverged")  # how a run that is not run again ended (jobs.outcome.RunEnd values)


@dataclass(frozen=True)
class Case:
    name: str
    config: Path
    overrides: tuple[str, ...]
    target_fraction: float
    scales: tuple[float, ...]  # the study's unless the case gives its own
    methods: tuple[str, ...]  # the study's unless the case lists some; the first is the baseline of the ratios


@dataclass(frozen=True)
class SaddleStudy:
    path: Path
    name: str
    out_dir: Path
    scales: tuple[float, ...]
    seeds: tuple[int, ...]
    cases: tuple[Case, ...]
    methods: Mapping[str, tuple[str, ...]]  # name: overrides, in the file's order


@dataclass(frozen=True)
class SaddleRun:
    case: Case
    method: str
    scale: float
    seed: int

    def out_dir(self, root: Path) -> Path:
        return root / self.case.name / self.method / f"scale{self.scale:g}" / f"seed{self.seed}"

    def overrides(self, study: SaddleStudy) -> list[str]:
        return [*self.case.overrides, *study.methods[self.method], f"model.init_scale={self.scale!r}",
                f"run.seed={self.seed}", f"run.out_dir={str(self.out_dir(study.out_dir))!r}"]  # fmt: skip


def _strings(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise key_error(path, key, f"a list of section.key=value strings, got {value!r}")
    return tuple(value)


CASE_KEYS = ("config", "overrides", "target_fraction", "scales", "methods")


def _case(path: Path, name: str, raw: Any, scales: tuple[float, ...], methods: Sequence[str]) -> Case:
    key = f"cases.{name}"
    if not isinstance(raw, dict) or set(raw) - set(CASE_KEYS) or "config" not in raw:
        raise key_error(path, key, f"a table with config (a training config file), and optionally {CASE_KEYS[1:]}")
    fraction = raw.get("target_fraction", 1e-3)
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise key_error(path, f"{key}.target_fraction", f"a fraction of the initial loss in (0, 1), got {fraction!r}")
    if "scales" in raw:
        scales = _scales(path, f"{key}.scales", raw["scales"])
    chosen = _strings(path, f"{key}.methods", raw.get("methods", list(methods)))
    unknown = sorted(set(chosen) - set(methods))
    if unknown or not chosen:
        raise key_error(
            path, f"{key}.methods", f"some of the [methods.NAME] tables {list(methods)}, got {list(chosen)}"
        )
    overrides = _strings(path, f"{key}.overrides", raw.get("overrides", []))
    return Case(name, Path(raw["config"]), overrides, fraction, scales, chosen)


def _scales(path: Path, key: str, scales: Any) -> tuple[float, ...]:
    if not isinstance(scales, list) or not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise key_error(path, key, f"a non-empty list of positive initial scales (e.g. [1e-2, 1e-4]), got {scales!r}")
    return tuple(float(s) for s in scales)


def _study_values(path: Path, study: Any) -> tuple[tuple[float, ...], tuple[int, ...]]:
    scales, seeds = _scales(path, "study.scales", study.get("scales")), study.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise key_error(path, "study.seeds", f"a non-empty list of seeds >= 0, got {seeds!r}")
    return scales, tuple(seeds)


def load_saddle_study(path: str | Path, out_dir: str | Path | None = None) -> SaddleStudy:
    """The study file, checked (every run's config too); StudyError naming the key and the fix."""
    from jobs.config import read_toml

    path = Path(path)
    raw = read_toml(path, "study file", "example: jobs/configs/studies/saddle.toml", StudyError)
    unknown = sorted(set(raw) - {"study", "cases", "methods"})
    if unknown:
        raise key_error(path, "tables", f"unknown {unknown}; a saddle study has [study], [cases.NAME], [methods.NAME]")
    study, cases, methods = raw.get("study", {}), raw.get("cases", {}), raw.get("methods", {})
    if not cases or not methods:
        raise key_error(path, "cases/methods", "give at least one [cases.NAME] and one [methods.NAME] table")
    scales, seeds = _study_values(path, study)
    overrides = {
        name: _strings(path, f"methods.{name}.overrides", (body or {}).get("overrides", []))
        for name, body in methods.items()
    }
    parsed = SaddleStudy(
        path, str(study.get("name", path.stem)), Path(out_dir or study.get("out_dir", f"runs/{path.stem}")), scales,
        seeds, tuple(_case(path, name, body, scales, list(overrides)) for name, body in cases.items()), overrides,
    )  # fmt: skip
    for run in runs(parsed):
        _config(parsed, run)
    return parsed


def runs(study: SaddleStudy, cases: Sequence[str] = ()) -> Iterator[SaddleRun]:
    """Every run of the study (optionally of some cases only): case, then scale, method and seed."""
    for case in study.cases:
        if cases and case.name not in cases:
            continue
        for scale in case.scales:
            for method in case.methods:
                for seed in study.seeds:
                    yield SaddleRun(case, method, scale, seed)


def _config(study: SaddleStudy, run: SaddleRun) -> Any:
    from jobs.config import ConfigError, load_config

    try:
        config = load_config(run.case.config, run.overrides(study))
    except (ConfigError, OSError) as exc:
        raise StudyError(f"{study.path}: case {run.case.name}, method {run.method}: {exc}") from None
    if not config.run.dynamics_every:
        raise StudyError(
            f"{study.path}: case {run.case.name}: set run.dynamics_every in {run.case.config} (the study reads the "
            "losses it records)"
        )
    return config


def run_saddle_study(study: SaddleStudy, cases: Sequence[str] = (), train: bool = True) -> Path:
    """Trains every run not yet finished (none when ``train`` is false), then writes the report; returns its path."""
    from jobs.loop import TrainingDiverged, run_training
    from jobs.outcome import read_summary
    from jobs.parallel import SingleContext
    from study.saddle_report import write_saddle_report

    for run in runs(study, cases) if train else ():
        summary = read_summary(run.out_dir(study.out_dir))
        if summary is not None and summary.get("end") in DONE:
            continue
        name = f"{run.case.name} {run.method} scale {run.scale:g} seed {run.seed}"
        try:
            result = run_training(_config(study, run), SingleContext(), log=lambda message: None)
        except TrainingDiverged as exc:  # a result: the report counts it as not reaching the target
            print(f"{name}: diverged: {exc}", flush=True)
            continue
        print(f"{name}: {result.steps} steps, train loss {result.train_loss:.4g}", flush=True)
    return write_saddle_report(study)
