"""Study files: which optimizers, batch sizes and variants; the target or step budget; tuning or given values.

A study file is TOML (examples: ``jobs/configs/studies/``)::

    [study]
    name = "demo"                                 # the study's name (experiment names start with it)
    base_config = "../fashion_mlp_study.toml"     # a jobs.train config, relative to this file
    optimizers = ["sgd", "adam", "kfac"]          # sgd | adam | adamw | kfac
    batch_sizes = [128, 512, 2048]
    target_accuracy = 0.80                        # on the test split; 0 = none (then only the step budget)
    max_steps = 300                               # step budget of every run (or max_epochs; both: the smaller)
    eval_every_steps = 10                         # evaluations that place steps-to-target
    eval_every_examples = 0                       # or every N examples: max(1, N / batch) steps, the same
                                                  # relative resolution at every batch size
    noise_every = 10                              # gradient noise scale every N steps (0 = off)
    out_dir = "runs/study-demo"                   # relative to the current directory
    top_k = 100                                   # top-k means of the skip-connection study's tables
    seeds = [0, 1, 2]                             # optional: repeat every cell per study seed (run.seed and TPE's
                                                  # seed), for means and standard errors over seeds
    overrides = ["run.seed=0"]                    # for every run

    [study.variants]                              # optional: model variants, each a list of overrides
    plain = ["model.residual=false"]
    residual = ["model.residual=true"]

    [study.optimizer_overrides]                   # optional: per optimizer, for every run of it
    kfac = ["kfac.inv_update_steps=10"]

    [tune]                                        # optional: tune every cell with TPE (python -m hpo_worker)
    trials = 8                                    # per cell
    workers = 2                                   # local workers the study starts; 0 = external workers
    objective = "steps_to_target"                 # or test_loss, test_error, train_error
    spaces = { sgd = "sgd", adam = "adam", kfac = "kfac" }   # built-in names or .toml files (relative)
    mongo = ""                                    # a MongoDB URL; "" = embedded server in <out_dir>/hpo_data
    seed = 0
    pending = "worst"                             # TPE's lie for queued/running trials (docs/hpo.md)
    pruner = { name = "asha", min_fraction = 0.1, reduction_factor = 3 }   # default: none; or "median"
                                                  # behind_best = true: steps_to_target's exact stop (docs/hpo.md)
                                                  # threshold = 1.44, threshold_after = 0.2: stop trials still at
                                                  # the objective's bad end after 20% of their budget
    warm_start = { sgd = "table1_sgd.toml" }      # [[points]] files, queued first in every cell of the optimizer
    seed_from_neighbour = false                   # true: each cell also starts from the best point of the next
                                                  # smaller batch size's cell, tuned before it
    repeats = 5                                   # each cell's best trial trained again with 5 other seeds
    startup_trials = 20                           # TPE's random draws before it models the history (hyperopt's 20)

    [given.sgd]                                   # without [tune]: the values of each optimizer's runs
    "optim.lr" = 0.1

    [fisher]                                      # optional: Fisher spectrum and gradient outliers (docs/fisher.md)
    every_epochs = 1                              # a record every N epochs (and/or every_steps = N)
    layer = "classifier.4"                        # a module name ("" = the whole model)
    examples = 0                                  # over the first N training examples (0 = all)
    trim = 0.1                                    # the fraction left out of the trimmed eigenvalue
    outlier_k = 10.0                              # outliers above k MAD
    save = true                                   # keep every example's projection and norm (the histograms)

With [given], the [fisher] records are taken during every run (``python -m study fisher`` reports them); with
[tune], each cell's best trial is trained again with them, after the tuning (the run is the same: the diagnostics
only read the model).

Every mistake is found by :func:`load_study` (and :func:`check_cells`, which builds every run's config) before any
training, with a message that names the key and the fix.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from hpo_worker.pending import PENDING_LIES, STARTUP_TRIALS
from hpo_worker.pruning import PrunerSettings, check_objective
from hpo_worker.trial import OBJECTIVES
from jobs.config import Config, ConfigError, load_config, parse_override, read_toml, toml_value
from jobs.optimizers import OPTIMIZER_NAMES, OPTIMIZERS

__all__ = [
    "Cell", "FisherSettings", "StudyConfig", "StudyError", "TuneSettings", "cell_toml", "check_cells", "config_toml",
    "key_error", "load_study",
]  # fmt: skip
_STUDY_KEYS: Final = frozenset(
    {"name", "base_config", "optimizers", "batch_sizes", "target_accuracy", "max_steps", "max_epochs"}
    | {"eval_every_steps", "noise_every", "out_dir", "top_k", "overrides", "variants", "optimizer_overrides"}
    | {"eval_every_examples"}
    | {"seeds"}
)
_TUNE_KEYS: Final = frozenset(
    {"trials", "workers", "objective", "spaces", "mongo", "seed", "queue_size", "grace", "pending", "pruner"}
    | {"warm_start", "seed_from_neighbour", "repeats", "startup_trials"}
)
_FISHER_KEYS: Final = frozenset({"every_epochs", "every_steps", "layer", "examples", "trim", "outlier_k", "save"})


class StudyError(ValueError):
    """The study file is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class TuneSettings:
    trials: int
    workers: int = 2
    objective: str = "steps_to_target"
    spaces: Mapping[str, str] = field(default_factory=dict)  # optimizer -> space name or absolute path
    mongo: str = ""
    seed: int = 0
    queue_size: int = 0  # 0 = the number of workers (at least 2)
    grace: float = 120.0  # seconds without heartbeat before a trial is requeued
    pending: str = "worst"  # what TPE is told about queued and running trials (hpo_worker.pending)
    pruner: PrunerSettings = field(default_factory=PrunerSettings)  # off unless [tune] pruner says (hpo_worker.pruning)
    warm_start: Mapping[str, str] = field(default_factory=dict)  # optimizer -> points file (absolute)
    seed_from_neighbour: bool = False  # each cell starts from the best point of the next smaller batch size
    repeats: int = 0  # each cell's best trial trained again with this many other seeds (study.uncertainty)
    startup_trials: int = STARTUP_TRIALS  # TPE's random draws per cell before it models the cell's history


@dataclass(frozen=True)
class FisherSettings:
    """The study's [fisher] table: the run.fisher_* keys of the runs it diagnoses."""

    every_epochs: int = 1
    every_steps: int = 0
    layer: str = ""
    examples: int = 0
    trim: float = 0.1
    outlier_k: float = 10.0
    save: bool = True

    def overrides(self) -> tuple[str, ...]:
        return (
            f"run.fisher_every_epochs={self.every_epochs}", f"run.fisher_every={self.every_steps}",
            f"run.fisher_layer={json.dumps(self.layer)}", f"run.fisher_examples={self.examples}",
            f"run.fisher_trim={self.trim}", f"run.outlier_k={self.outlier_k}",
            f"run.fisher_save={toml_value(self.save)}",
        )  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One (variant, optimizer, batch size[, study seed]) of the study, and the overrides of its runs."""

    variant: str
    optimizer: str
    batch_size: int
    overrides: tuple[str, ...]
    seed: int | None = None  # the study seed (study.seeds), None when the study has none

    @property
    def name(self) -> str:
        seed = f"s{self.seed}" if self.seed is not None else ""
        return "/".join(filter(None, [self.variant, self.optimizer, f"b{self.batch_size}", seed]))

    @property
    def slug(self) -> str:
        """The name as a file and experiment name: ``residual-kfac-b256``."""
        return self.name.replace("/", "-")


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: Path
    base_config: Path
    optimizers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    target_accuracy: float
    max_steps: int
    max_epochs: int
    eval_every_steps: int
    noise_every: int
    out_dir: Path
    top_k: int
    overrides: tuple[str, ...]
    variants: Mapping[str, tuple[str, ...]]  # {"": ()} when the study has no variants
    optimizer_overrides: Mapping[str, tuple[str, ...]]
    tune: TuneSettings | None
    given: Mapping[str, tuple[str, ...]]  # optimizer -> overrides
    seeds: tuple[int, ...] = ()  # study seeds: each cell once per seed (run.seed and TPE's seed); () = once
    eval_every_examples: int = 0  # > 0: each cell evaluates every max(1, round(N / batch)) steps instead
    fisher: FisherSettings | None = None  # [fisher]: in every given run, or in a replay of each tuned cell's best

    def _eval_cadence(self, batch: int) -> tuple[str, ...]:
        """With eval_every_examples: evaluations every N examples at this batch size (later overrides win)."""
        if not self.eval_every_examples:
            return ()
        return (f"run.eval_every_steps={max(1, round(self.eval_every_examples / batch))}",)

    def cells(self) -> list[Cell]:
        # Both keys: the study's budget replaces whichever one the base config gives. With both max_epochs and
        # max_steps, the epochs are the budget and max_steps caps it (run.step_cap).
        budget = [f"run.steps={0 if self.max_epochs else self.max_steps}", f"run.epochs={self.max_epochs}"]
        budget += [f"run.step_cap={self.max_steps}"] if self.max_epochs and self.max_steps else []
        run = [
            *budget,
            f"run.target_accuracy={self.target_accuracy}",
            f"run.eval_every_steps={self.eval_every_steps}",
            f"run.noise_every={self.noise_every}",
            "run.progress=false",
        ]
        if self.fisher is not None and self.tune is None:
            run.extend(self.fisher.overrides())
        cells = []
        for variant, variant_overrides in self.variants.items():
            for optimizer in self.optimizers:
                given = () if self.tune is not None else self.given.get(optimizer, ())
                for batch in self.batch_sizes:
                    overrides = (
                        *self.overrides, *variant_overrides, f'optim.name="{optimizer}"',
                        *self.optimizer_overrides.get(optimizer, ()), *given, f"data.batch_size={batch}", *run,
                        *self._eval_cadence(batch),
                    )  # fmt: skip
                    if not self.seeds:
                        cells.append(Cell(variant, optimizer, batch, overrides))
                    for seed in self.seeds:
                        cells.append(Cell(variant, optimizer, batch, (*overrides, f"run.seed={seed}"), seed))
        return cells


def key_error(path: Path, key: str, problem: str) -> StudyError:
    """The error for a wrong key of a study file: the file, the key and the fix (every study kind's files)."""
    return StudyError(f"{path}: {key}: {problem}")


def _int(path: Path, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise key_error(path, key, f"must be an integer >= {minimum}, not {value!r}")
    return value


def _strings(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise key_error(path, key, f'must be a list of strings such as ["optim.lr=0.1"], not {value!r}')
    return tuple(value)


def _unknown(path: Path, table: str, keys: Sequence[str], known: frozenset[str]) -> None:
    extra = sorted(set(keys) - known)
    if extra:
        raise key_error(path, f"[{table}] {extra[0]}", f"unknown key; the keys are {', '.join(sorted(known))}")


def _given(path: Path, raw: Any, optimizers: Sequence[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise key_error(path, "[given]", 'must be a table of tables, e.g. [given.sgd] with "optim.lr" = 0.1')
    given: dict[str, tuple[str, ...]] = {}
    for optimizer, values in raw.items():
        if optimizer not in optimizers:
            raise key_error(path, f"[given.{optimizer}]", f"is not one of the study's optimizers {list(optimizers)}")
        if not isinstance(values, dict):
            raise key_error(path, f"[given.{optimizer}]", 'must be a table of "section.key" = value')
        try:
            given[optimizer] = tuple(f"{key}={toml_value(value)}" for key, value in values.items())
        except ConfigError as exc:
            raise key_error(path, f"[given.{optimizer}]", f"{exc}: give numbers, strings, booleans or lists") from None
    return given


def _tune(path: Path, raw: Any, optimizers: Sequence[str]) -> TuneSettings:
    if not isinstance(raw, dict):
        raise key_error(path, "[tune]", "must be a table")
    _unknown(path, "tune", list(raw), _TUNE_KEYS)
    trials = _int(path, "tune.trials", raw.get("trials"), 1)
    workers = _int(path, "tune.workers", raw.get("workers", 2), 0)
    objective = raw.get("objective", "steps_to_target")
    if objective not in OBJECTIVES:
        raise key_error(path, "tune.objective", f"{objective!r} is not one of {', '.join(OBJECTIVES)}")
    spaces_raw = raw.get("spaces", {})
    if not isinstance(spaces_raw, dict) or not all(isinstance(v, str) for v in spaces_raw.values()):
        raise key_error(path, "tune.spaces", 'must be a table such as { sgd = "sgd", kfac = "my_space.toml" }')
    spaces: dict[str, str] = {}
    for optimizer in optimizers:
        space = spaces_raw.get(optimizer, OPTIMIZERS[optimizer].default_space)
        if space.endswith(".toml"):
            resolved = (path.parent / space).resolve()
            if not resolved.is_file():
                raise key_error(path, f"tune.spaces.{optimizer}", f"{resolved} does not exist")
            space = str(resolved)
        spaces[optimizer] = space
    extra = sorted(set(spaces_raw) - set(optimizers))
    if extra:
        raise key_error(path, f"tune.spaces.{extra[0]}", f"is not one of the study's optimizers {list(optimizers)}")
    mongo = raw.get("mongo", "")
    if not isinstance(mongo, str):
        raise key_error(path, "tune.mongo", 'must be a mongodb:// URL string, or "" for the embedded server')
    grace = raw.get("grace", 120.0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace <= 0:
        raise key_error(path, "tune.grace", f"must be a positive number of seconds, not {grace!r}")
    return TuneSettings(
        trials=trials, workers=workers, objective=objective, spaces=spaces, mongo=mongo,
        seed=_int(path, "tune.seed", raw.get("seed", 0), 0),
        queue_size=_int(path, "tune.queue_size", raw.get("queue_size", 0), 0), grace=float(grace),
        repeats=_int(path, "tune.repeats", raw.get("repeats", 0), 0),
        startup_trials=_int(path, "tune.startup_trials", raw.get("startup_trials", STARTUP_TRIALS), 1),
        **_search(path, raw, optimizers, objective),
    )  # fmt: skip


def _search(path: Path, raw: Mapping[str, Any], optimizers: Sequence[str], objective: str) -> dict[str, Any]:
    """tune.pending, tune.pruner, tune.warm_start and tune.seed_from_neighbour, checked."""
    pending = raw.get("pending", "worst")
    if pending not in PENDING_LIES:
        raise key_error(path, "tune.pending", f"{pending!r} is not one of {', '.join(PENDING_LIES)}")
    pruner_raw = raw.get("pruner", {"name": "none"})
    if not isinstance(pruner_raw, dict):
        raise key_error(path, "tune.pruner", 'must be a table such as { name = "asha", reduction_factor = 3 }')
    try:
        pruner = PrunerSettings(**pruner_raw)
        check_objective(pruner, objective)
    except (TypeError, ValueError) as exc:
        raise key_error(
            path, "tune.pruner", f"{exc} (keys: {', '.join(PrunerSettings.__dataclass_fields__)})"
        ) from None
    warm_raw = raw.get("warm_start", {})
    if not isinstance(warm_raw, dict) or not all(isinstance(v, str) for v in warm_raw.values()):
        raise key_error(path, "tune.warm_start", 'must be a table such as { sgd = "table1_sgd.toml" }')
    warm_start = {}
    for optimizer, file in warm_raw.items():
        if optimizer not in optimizers:
            raise key_error(
                path, f"tune.warm_start.{optimizer}", f"is not one of the study's optimizers {list(optimizers)}"
            )
        resolved = (path.parent / file).resolve()
        if not resolved.is_file():
            raise key_error(path, f"tune.warm_start.{optimizer}", f"{resolved} does not exist")
        warm_start[optimizer] = str(resolved)
    neighbour = raw.get("seed_from_neighbour", False)
    if not isinstance(neighbour, bool):
        raise key_error(path, "tune.seed_from_neighbour", f"must be true or false, not {neighbour!r}")
    return {"pending": pending, "pruner": pruner, "warm_start": warm_start, "seed_from_neighbour": neighbour}


def _fisher(path: Path, raw: Any) -> FisherSettings:
    if not isinstance(raw, dict):
        raise key_error(path, "[fisher]", 'must be a table, e.g. every_epochs = 1 and layer = "classifier.4"')
    _unknown(path, "fisher", list(raw), _FISHER_KEYS)
    every_epochs = _int(path, "fisher.every_epochs", raw.get("every_epochs", 0 if "every_steps" in raw else 1), 0)
    every_steps = _int(path, "fisher.every_steps", raw.get("every_steps", 0), 0)
    if not every_epochs and not every_steps:
        raise key_error(path, "fisher.every_epochs", "a [fisher] table needs every_epochs or every_steps >= 1")
    layer, save = raw.get("layer", ""), raw.get("save", True)
    if not isinstance(layer, str):
        raise key_error(path, "fisher.layer", f'must be a module name string ("" = the whole model), not {layer!r}')
    if not isinstance(save, bool):
        raise key_error(path, "fisher.save", f"must be true or false, not {save!r}")
    numbers = {key: raw.get(key, default) for key, default in (("trim", 0.1), ("outlier_k", 10.0))}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise key_error(path, f"fisher.{key}", f"must be a number, not {value!r}")
    return FisherSettings(
        every_epochs=every_epochs, every_steps=every_steps, layer=layer,
        examples=_int(path, "fisher.examples", raw.get("examples", 0), 0), trim=float(numbers["trim"]),
        outlier_k=float(numbers["outlier_k"]), save=save,
    )  # fmt: skip


def _check_objective(path: Path, objective: str, target: float) -> None:
    """The objective and the target must fit: one counts steps to the target, the other needs no early stop."""
    if objective == "steps_to_target" and not target:
        raise key_error(path, "tune.objective", "steps_to_target needs study.target_accuracy > 0")
    if objective == "best_test_error" and target:
        raise key_error(
            path, "tune.objective",
            "best_test_error ranks runs by their best evaluation over the whole budget: remove "
            "study.target_accuracy (a target would stop runs early)",
        )  # fmt: skip


def _seeds(path: Path, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(set(map(repr, raw))) != len(raw):
        raise key_error(path, "study.seeds", f"must be a list of distinct integers >= 0, e.g. [0, 1, 2], not {raw!r}")
    return tuple(_int(path, "study.seeds", seed, 0) for seed in raw)


def _optimizers(path: Path, optimizers: Any) -> list[str]:
    if not isinstance(optimizers, list) or not optimizers:
        raise key_error(path, "study.optimizers", f"must be a non-empty list of {', '.join(OPTIMIZER_NAMES)}")
    for optimizer in optimizers:
        if optimizer not in OPTIMIZERS:
            choices = ", ".join(OPTIMIZER_NAMES)
            raise key_error(path, "study.optimizers", f"unknown optimizer {optimizer!r}; choose from {choices}")
    if len(set(optimizers)) != len(optimizers):
        raise key_error(path, "study.optimizers", "lists an optimizer twice")
    return optimizers


def _batch_sizes(path: Path, batches: Any) -> tuple[int, ...]:
    if not isinstance(batches, list) or not batches:
        raise key_error(path, "study.batch_sizes", "must be a non-empty list of batch sizes, e.g. [128, 512, 2048]")
    batch_sizes = tuple(_int(path, "study.batch_sizes", b, 1) for b in batches)
    if len(set(batch_sizes)) != len(batch_sizes):
        raise key_error(path, "study.batch_sizes", "lists a batch size twice")
    return batch_sizes


def _read_tables(path: Path) -> dict[str, Any]:
    """The study file's TOML, with its [study] table present and no unknown table or [study] key."""
    raw = read_toml(path, "study file", "examples: jobs/configs/studies/", StudyError)
    unknown_tables = sorted(set(raw) - {"study", "tune", "given", "fisher"})
    if unknown_tables:
        raise key_error(
            path, f"[{unknown_tables[0]}]", "unknown table; a study file has [study], [tune], [given] and [fisher]"
        )
    study = raw.get("study")
    if not isinstance(study, dict):
        raise key_error(path, "[study]", "missing: the study file needs a [study] table")
    _unknown(path, "study", list(study), _STUDY_KEYS)
    return raw


def _budget_and_cadence(path: Path, study: Mapping[str, Any], target: float) -> tuple[int, int, int, int]:
    """max_steps, max_epochs (one or both: then the smaller), eval_every_steps and eval_every_examples (one needed
    with a target)."""
    max_steps = _int(path, "study.max_steps", study.get("max_steps", 0), 0)
    max_epochs = _int(path, "study.max_epochs", study.get("max_epochs", 0), 0)
    if not (max_steps or max_epochs):
        raise key_error(path, "study.max_steps", "give a budget: max_steps or max_epochs (> 0), or both (the smaller)")
    eval_every = _int(path, "study.eval_every_steps", study.get("eval_every_steps", 0), 0)
    eval_examples = _int(path, "study.eval_every_examples", study.get("eval_every_examples", 0), 0)
    if target and not (eval_every or eval_examples):
        raise key_error(
            path, "study.eval_every_steps",
            "a target accuracy needs evaluations every N steps (N >= 1), or study.eval_every_examples",
        )  # fmt: skip
    return max_steps, max_epochs, eval_every, eval_examples


def load_study(path: str | Path, out_dir: str | Path | None = None) -> StudyConfig:
    """Reads and checks a study file; ``out_dir`` replaces the file's ``study.out_dir``."""
    path = Path(path)
    raw = _read_tables(path)
    study = raw["study"]

    name = study.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise key_error(path, "study.name", f"{name!r}: use letters, digits, '_', '.', '-'")
    if "base_config" not in study:
        raise key_error(path, "study.base_config", "missing: the jobs.train config every run starts from")
    base = (path.parent / str(study["base_config"])).resolve()
    if not base.is_file():
        raise key_error(path, "study.base_config", f"{base} does not exist")

    optimizers = _optimizers(path, study.get("optimizers"))
    batch_sizes = _batch_sizes(path, study.get("batch_sizes"))

    target = study.get("target_accuracy", 0.0)
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 <= target <= 1 or math.isnan(target):
        # 1.0 is allowed, as jobs.train allows it: every test example right is reachable (the run checks >=).
        raise key_error(
            path, "study.target_accuracy",
            f"{target!r} cannot be reached: give an accuracy in [0, 1] (0 = no target, only the step budget)",
        )  # fmt: skip
    max_steps, max_epochs, eval_every, eval_examples = _budget_and_cadence(path, study, target)

    variants_raw = study.get("variants", {})
    if not isinstance(variants_raw, dict):
        raise key_error(path, "study.variants", 'must be a table such as { plain = ["model.residual=false"] }')
    variants = {str(k): _strings(path, f"study.variants.{k}", v) for k, v in variants_raw.items()} or {"": ()}
    per_optimizer = study.get("optimizer_overrides", {})
    if not isinstance(per_optimizer, dict) or set(per_optimizer) - set(optimizers):
        raise key_error(path, "study.optimizer_overrides", f"must be a table keyed by the optimizers {optimizers}")
    tune = _tune(path, raw["tune"], optimizers) if "tune" in raw else None
    if tune is not None and "given" in raw:
        raise key_error(path, "[given]", "a study either tunes ([tune]) or takes given values ([given]), not both")
    if tune is not None:
        _check_objective(path, tune.objective, target)
    return StudyConfig(
        name=name, path=path.resolve(), base_config=base, optimizers=tuple(optimizers), batch_sizes=batch_sizes,
        target_accuracy=float(target), max_steps=max_steps, max_epochs=max_epochs, eval_every_steps=eval_every,
        eval_every_examples=eval_examples,
        noise_every=_int(path, "study.noise_every", study.get("noise_every", 0), 0),
        out_dir=Path(out_dir if out_dir is not None else study.get("out_dir", f"runs/study-{name}")),
        top_k=_int(path, "study.top_k", study.get("top_k", 100), 1),
        overrides=_strings(path, "study.overrides", study.get("overrides", [])),
        variants=variants,
        optimizer_overrides={k: _strings(path, f"study.optimizer_overrides.{k}", v) for k, v in per_optimizer.items()},
        tune=tune, given=_given(path, raw.get("given", {}), optimizers),
        seeds=_seeds(path, study.get("seeds", [])),
        fisher=_fisher(path, raw["fisher"]) if "fisher" in raw else None,
    )  # fmt: skip


def check_cells(study: StudyConfig) -> dict[str, Config]:
    """Every cell's resolved training config, by cell name; a bad override or missing data fails here, before any
    training."""
    configs: dict[str, Config] = {}
    for cell in study.cells():
        try:
            config = load_config(study.base_config, cell.overrides)
        except ConfigError as exc:
            raise StudyError(f"{study.path}: cell {cell.name}: {exc}") from exc
        if config.data.train_examples and cell.batch_size > config.data.train_examples:
            raise StudyError(
                f"{study.path}: batch size {cell.batch_size} is larger than the {config.data.train_examples} training "
                "examples of the base config (data.train_examples): lower the batch size or use more examples"
            )
        if (
            study.tune is not None
            and study.tune.objective == "best_test_error"
            and not (config.run.eval_every or config.run.eval_every_steps)
        ):
            raise StudyError(
                f"{study.path}: cell {cell.name}: tune.objective = best_test_error needs evaluations during the run: "
                "set study.eval_every_steps, or run.eval_every (epochs) in the base config or study.overrides"
            )
        configs[cell.name] = config
    if study.tune is not None:
        _check_spaces(study, study.tune)
    _check_fisher_layer(study, configs)
    from jobs.datasets import resolve_data_path  # torch: only once the file itself is known to be good

    for config in {c.data.name: c for c in configs.values()}.values():
        try:
            resolve_data_path(config.data)
        except (ValueError, FileNotFoundError) as exc:
            raise StudyError(f"{study.path}: {exc}") from exc
    return configs


def _check_fisher_layer(study: StudyConfig, configs: Mapping[str, Config]) -> None:
    """A [fisher] layer that is not a module of every cell's model fails here, before any training."""
    layer = study.fisher.layer if study.fisher is not None else ""
    if not layer:
        return
    from jobs.datasets import example_shape  # torch: only for a study with a [fisher] layer
    from jobs.diagnostics import layer_names
    from jobs.models import build_model

    for name, config in configs.items():
        shape, classes = example_shape(config.data)
        names = layer_names(build_model(config.model, shape, classes))
        if layer not in names:
            raise StudyError(
                f"{study.path}: fisher.layer = {layer!r} is not a layer of cell {name}'s model: choose one of {names}"
            )


def _check_spaces(study: StudyConfig, tune: TuneSettings) -> None:
    """Every cell's search space loads, and gives a valid config at each of its extreme samples: a bad bound or a
    bad fixed value fails here, before any trial trains."""
    from hpo_worker.spaces import load_space  # hyperopt: only for tuned studies

    for optimizer, name in tune.spaces.items():
        try:
            space = load_space(name)
        except ValueError as exc:
            raise StudyError(f"{study.path}: tune.spaces.{optimizer}: {exc}") from exc
        for cell in (c for c in study.cells() if c.optimizer == optimizer):
            for sample in space.extreme_samples():
                try:
                    load_config(study.base_config, [*cell.overrides, *space.to_overrides(sample)])
                except (ConfigError, ValueError) as exc:
                    raise StudyError(
                        f"{study.path}: cell {cell.name}, space {space.name!r} at {sample}: {exc} (fix the space's "
                        "bounds or [fixed] values, or the study's overrides)"
                    ) from exc


def cell_toml(study: StudyConfig, cell: Cell) -> str:
    """The base config's TOML document with the cell's overrides applied: the config file of the cell's runs
    (hpo_worker stores it with the experiment, so workers on other machines need no file of ours)."""
    # "(jobs.study)" although the package moved: this text is part of the experiment's identity (config_text), and
    # studies made before the move must resume their experiments.
    header = f"# {study.name}, cell {cell.name}: {study.base_config.name} + the study's overrides (jobs.study)."
    return config_toml(tomllib.loads(study.base_config.read_text()), cell.overrides, header)


def config_toml(document: dict[str, Any], overrides: Sequence[str], header: str) -> str:
    """A config document (tables of keys) with ``overrides`` applied, as TOML under the comment ``header``; keys
    whose value is None (nothing in TOML) are left out."""
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        document.setdefault(section, {})[name] = value
    lines = [header]
    for section, table in document.items():
        lines += ["", f"[{section}]"]
        lines += [f"{json.dumps(key)} = {toml_value(value)}" for key, value in table.items() if value is not None]
    return "\n".join(lines) + "\n"
