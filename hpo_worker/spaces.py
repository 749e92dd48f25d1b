"""Search spaces: hyperopt expressions for SGD, Adam and K-FAC, custom spaces from TOML, and their jobs overrides.

A space is a list of :class:`ParamSpec` (label, distribution, bounds, the config key it sets) plus fixed config
overrides. ``hyperopt_space`` is what TPE samples; ``to_overrides`` turns one sample into the
``section.key=value`` overrides of ``python -m jobs.train``.

Built-in spaces (``sgd``, ``adam``, ``kfac``) follow the hyperparameters tuned in the large-batch K-FAC study in
``../shared/seeds/002_*.txt`` (section 5, table 1); its text reports the best values found, not the search ranges, so
the ranges below are chosen to bracket those values with margin (docs/hpo.md, "Search spaces").

Custom space file (TOML)::

    name = "my-sgd"                       # optional; default: the file's stem
    [fixed]                               # optional: overrides applied to every trial
    "optim.name" = "sgd"
    "optim.schedule" = "step"
    [params."optim.lr"]                   # the label is the dotted config key
    dist = "loguniform"                   # uniform | loguniform | quniform | qloguniform | choice
    low = 1e-3                            # bounds of the value itself (not of its log)
    high = 1.0
    [params."optim.milestones"]
    dist = "choice"
    options = [[30], [30, 60]]
    [params."optim.betas"]                # index = i: one position of a list key; the others from [fixed]
    dist = "uniform"
    low = 0.8
    high = 0.95
    index = 0

Integer config fields (``kfac.inv_update_steps``, ``optim.milestones``...) get rounded ints, since hyperopt's
quantized distributions return floats; a scalar sampled for a list field becomes a one-element list.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from hyperopt import hp

from jobs.config import Config, ConfigError, read_toml
from jobs.config import toml_value as config_toml_value

__all__ = ["DISTRIBUTIONS", "ParamSpec", "SearchSpace", "load_space", "space_names", "toml_value"]

DISTRIBUTIONS: Final = ("uniform", "loguniform", "quniform", "qloguniform", "choice")
_LOG_DISTRIBUTIONS: Final = frozenset({"loguniform", "qloguniform"})
_PARAM_KEYS: Final = frozenset({"dist", "low", "high", "q", "options", "index"})


def _config_field_types() -> dict[str, Any]:
    """``"optim.lr" -> float`` for every key of the training config (read from jobs.config's dataclasses)."""
    types: dict[str, Any] = {}
    for section_field in dataclasses.fields(Config):
        if section_field.name == "explicit":
            continue
        section_cls = type(getattr(Config(), section_field.name))
        for key, tp in typing.get_type_hints(section_cls).items():
            types[f"{section_field.name}.{key}"] = tp
    return types


_CONFIG_TYPES: Final = _config_field_types()


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter.

    ``config_key`` is the ``section.key`` it sets; ``list_index`` places it in a list-valued key (``beta1`` is
    ``optim.betas[0]``, ``decay_epoch`` is ``optim.milestones[0]``).
    """

    label: str
    dist: str
    config_key: str
    low: float = 0.0
    high: float = 0.0
    q: float = 0.0
    options: tuple[Any, ...] = ()
    list_index: int | None = None

    def hyperopt_expression(self) -> Any:
        if self.dist == "uniform":
            return hp.uniform(self.label, self.low, self.high)
        if self.dist == "loguniform":  # hyperopt takes the bounds of log(value)
            return hp.loguniform(self.label, math.log(self.low), math.log(self.high))
        if self.dist == "quniform":
            return hp.quniform(self.label, self.low, self.high, self.q)
        if self.dist == "qloguniform":
            return hp.qloguniform(self.label, math.log(self.low), math.log(self.high), self.q)
        if self.dist == "choice":
            return hp.choice(self.label, list(self.options))
        raise ValueError(f"{self.label}: unknown distribution {self.dist!r}; choose one of {', '.join(DISTRIBUTIONS)}")

    @property
    def log_scale(self) -> bool:
        return self.dist in _LOG_DISTRIBUTIONS

    def position(self, value: float) -> float | None:
        """Where ``value`` lies in the range on the scale it is sampled on: 0 at ``low``, 1 at ``high`` (None for a
        choice, whose options have no order)."""
        if self.dist == "choice":
            return None
        if self.log_scale:
            return math.log(value / self.low) / math.log(self.high / self.low)
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class SearchSpace:
    """A named search space: hyperopt expressions by label, and how a sample becomes jobs.train overrides."""

    name: str
    params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    source: str = "built-in"

    def __post_init__(self) -> None:  # built-in spaces are shared module objects: keep their fixed table read-only
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))

    @property
    def hyperopt_space(self) -> dict[str, Any]:
        """Label -> hyperopt expression (a fresh dict each time; pass it to ``hyperopt.fmin``/``tpe.suggest``)."""
        return {param.label: param.hyperopt_expression() for param in self.params}

    @property
    def definition(self) -> dict[str, Any]:
        """What the space searches, as plain JSON (stored with an experiment: a resumed one must search the same)."""
        return {
            "params": [
                {
                    "label": p.label, "dist": p.dist, "config_key": p.config_key, "low": p.low, "high": p.high,
                    "q": p.q, "options": plain_value(list(p.options)), "list_index": p.list_index,
                }
                for p in self.params
            ],
            "fixed": {key: plain_value(value) for key, value in sorted(self.fixed.items())},
        }  # fmt: skip

    @property
    def labels(self) -> list[str]:
        return [param.label for param in self.params]

    @property
    def log_scale_labels(self) -> frozenset[str]:
        """Labels sampled on a log scale (the report plots them on a log axis)."""
        return frozenset(param.label for param in self.params if param.log_scale)

    def evaluate(self, misc_vals: Mapping[str, Any]) -> dict[str, Any]:
        """Sampled values from a trial's ``misc.vals`` (``{label: [v]}``, choice as option index) via space_eval."""
        import hyperopt

        flat = {label: (v[0] if v else None) if isinstance(v, list) else v for label, v in misc_vals.items()}
        flat = {label: v for label, v in flat.items() if v is not None}
        missing = [label for label in self.labels if label not in flat]
        if missing:
            raise ValueError(f"space {self.name!r}: trial values lack {', '.join(missing)}")
        evaluated = hyperopt.space_eval(self.hyperopt_space, flat)
        return dict(evaluated)

    def extreme_samples(self) -> list[dict[str, Any]]:
        """Samples at the ends of the space: every range at its low end, every range at its high end, and each
        option of each choice (the others at their low end). A config that is valid at all of them is valid
        everywhere in a box, so checking these before any trial finds a bad bound before anything trains."""

        def end(param: ParamSpec, high: bool) -> Any:
            if param.dist == "choice":
                return param.options[-1 if high else 0]
            value = param.high if high else param.low
            return round(value / param.q) * param.q if param.q else value  # hyperopt's q-rounding

        low = {param.label: end(param, False) for param in self.params}
        samples = [low, {param.label: end(param, True) for param in self.params}]
        for param in self.params:
            if param.dist == "choice":
                samples += [{**low, param.label: option} for option in param.options[1:]]
        return samples

    def edges(self, values: Mapping[str, Any], within: float) -> list[str]:
        """The ranges in which a sample (values by label) lies within ``within`` of an end, as a fraction of the
        range on its sampling scale: ``"optim.lr 0.0011 at the low end (1e-3 – 3)"``. A best trial there suggests
        that a wider range would hold a better one."""
        found = []
        for param in self.params:
            if param.dist == "choice" or param.label not in values:
                continue
            value = float(values[param.label])
            position = param.position(value)
            if position is None or within <= position <= 1 - within:
                continue
            end = "low" if position < within else "high"
            found.append(f"{param.label} {value:.3g} at the {end} end ({param.low:g} – {param.high:g})")
        return found

    def to_overrides(self, values: Mapping[str, Any]) -> list[str]:
        """``section.key=value`` overrides (values in TOML) for one sample: the fixed ones, then the sampled ones.

        ``values`` are sampled values by label, as ``hyperopt.pyll.stochastic.sample`` or ``space_eval`` give them
        (for ``choice`` the option itself, not its index: use :meth:`evaluate` on raw ``misc.vals``).
        """
        unknown = sorted(set(values) - set(self.labels))
        if unknown:
            raise ValueError(f"space {self.name!r}: unknown parameters {', '.join(unknown)}; it has {self.labels}")
        missing = [label for label in self.labels if label not in values]
        if missing:
            raise ValueError(f"space {self.name!r}: no value for {', '.join(missing)}")

        settings: dict[str, Any] = dict(self.fixed)
        list_parts: dict[str, dict[int, Any]] = {}
        for param in self.params:
            value = plain_value(values[param.label])
            if param.list_index is None:
                settings[param.config_key] = value
            else:
                list_parts.setdefault(param.config_key, {})[param.list_index] = value
        for key, parts in list_parts.items():
            fixed_list = self.fixed.get(key)
            if isinstance(fixed_list, list | tuple):  # searched positions replace those of a fixed list
                parts = {**dict(enumerate(plain_value(v) for v in fixed_list)), **parts}
            if sorted(parts) != list(range(len(parts))):  # a list key must be filled from index 0 without gaps
                raise ValueError(f"space {self.name!r}: {key} gets list positions {sorted(parts)}, not 0..n-1")
            settings[key] = [parts[i] for i in range(len(parts))]
        return [f"{key}={toml_value(_cast(key, value))}" for key, value in settings.items()]


def plain_value(value: Any) -> Any:
    """numpy scalars (what hyperopt returns) as Python ones, so repr and TOML see plain numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [plain_value(v) for v in value]
    return value


def _cast(key: str, value: Any) -> Any:
    """``value`` in the type of config key ``key``: floats from quantized distributions become ints where needed."""
    tp = _CONFIG_TYPES.get(key)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]  # one sampled epoch -> milestones = [epoch]
        return [_cast_scalar(key, v, item_tp) for v in items]
    return _cast_scalar(key, value, tp)


def _cast_scalar(key: str, value: Any, tp: Any) -> Any:
    if tp is int and isinstance(value, float):
        if not math.isfinite(value) or abs(value - round(value)) > 1e-6:
            raise ValueError(f"{key} needs an integer, got {value!r} (use quniform or qloguniform with an integer q)")
        return round(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def toml_value(value: Any) -> str:
    """``value`` (numpy scalars too) written as a TOML value, as jobs.config's overrides read it."""
    try:
        return config_toml_value(plain_value(value))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


# --- built-in spaces -------------------------------------------------------------------------------------------------
# Ranges bracket the best values of table 1 of the K-FAC tuning study (seeds/002) by at least an order of magnitude
# for log-scaled parameters; the study's text gives no ranges. Decay epochs there are multiples of 10 (20..100).


def _step_decay_params(lr_label: str, lr_low: float, lr_high: float) -> list[ParamSpec]:
    return [
        ParamSpec(lr_label, "loguniform", "optim.lr", low=lr_low, high=lr_high),
        ParamSpec("decay_factor", "uniform", "optim.gamma", low=0.1, high=1.0),
        ParamSpec("decay_epoch", "quniform", "optim.milestones", low=10, high=100, q=10, list_index=0),
    ]


_WEIGHT_DECAY: Final = ParamSpec("weight_decay", "loguniform", "optim.weight_decay", low=1e-6, high=1e-2)
_MOMENTUM: Final = ParamSpec("momentum", "uniform", "optim.momentum", low=0.5, high=0.99)

_BUILTIN_SPACES: Final[dict[str, SearchSpace]] = {
    "sgd": SearchSpace(
        "sgd",
        (*_step_decay_params("lr", 1e-4, 1.0), _MOMENTUM, _WEIGHT_DECAY),
        {"optim.name": "sgd", "optim.schedule": "step"},
    ),
    "adam": SearchSpace(
        "adam",
        (
            *_step_decay_params("alpha", 1e-5, 1e-1),
            ParamSpec("beta1", "uniform", "optim.betas", low=0.8, high=0.99, list_index=0),
            ParamSpec("beta2", "uniform", "optim.betas", low=0.99, high=0.9999, list_index=1),
            ParamSpec("eps", "loguniform", "optim.eps", low=1e-10, high=1e-6),
            _WEIGHT_DECAY,
        ),
        {"optim.name": "adam", "optim.schedule": "step"},
    ),
    "kfac": SearchSpace(
        "kfac",
        (
            *_step_decay_params("lr", 1e-4, 1.0),
            _MOMENTUM,
            _WEIGHT_DECAY,
            ParamSpec("factor_decay", "uniform", "kfac.factor_decay", low=0.8, high=0.999),
            ParamSpec("damping", "loguniform", "kfac.damping", low=1e-5, high=1e-1),
            # ints 1..100, log-uniform: TPE resolves 1..10 as finely as 10..100
            ParamSpec("inv_update_interval", "qloguniform", "kfac.inv_update_steps", low=1, high=100, q=1),
        ),
        {"optim.name": "kfac", "optim.schedule": "step"},
    ),
}


def space_names() -> list[str]:
    """Names of the built-in spaces."""
    return list(_BUILTIN_SPACES)


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A built-in space by name (``sgd``, ``adam``, ``kfac``) or a custom space from a TOML file."""
    text = str(name_or_path)
    if text in _BUILTIN_SPACES:
        return _BUILTIN_SPACES[text]
    path = Path(text)
    if path.suffix == ".toml" or path.exists() or "/" in text:
        return _load_space_file(path)
    raise ValueError(
        f"unknown search space {text!r}: give one of {', '.join(space_names())} or the path of a .toml space file"
    )


def _flatten_tables(table: Mapping[str, Any], prefix: str, is_leaf: Any) -> dict[str, Any]:
    """``{"optim": {"lr": {...}}}`` -> ``{"optim.lr": {...}}``: accepts unquoted dotted keys in the file too."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and not is_leaf(value):
            flat.update(_flatten_tables(value, dotted, is_leaf))
        else:
            flat[dotted] = value
    return flat


def _check_config_key(where: str, key: str) -> None:
    if key not in _CONFIG_TYPES:
        import difflib

        close = difflib.get_close_matches(key, list(_CONFIG_TYPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: {key!r} is not a config key{hint}; keys are section.key as in jobs/config.py")


def _number(where: str, table: Mapping[str, Any], key: str) -> float:
    if key not in table:
        raise ValueError(f"{where}: dist = {table['dist']!r} needs {key}")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _param_from_table(where: str, label: str, table: Any) -> ParamSpec:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: expected a table with dist = ..., got {table!r}")
    extra = sorted(set(table) - _PARAM_KEYS)
    if extra:
        raise ValueError(f"{where}: unknown keys {', '.join(extra)}; a parameter has {', '.join(sorted(_PARAM_KEYS))}")
    dist = table.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"{where}: dist = {dist!r} is not known; choose one of {', '.join(DISTRIBUTIONS)}")
    _check_config_key(where, label)
    if dist == "choice":
        options = table.get("options")
        if not isinstance(options, list) or not options:
            raise ValueError(f"{where}: dist = 'choice' needs options = [...] (a non-empty list)")
        return ParamSpec(label, dist, label, options=tuple(options), list_index=_list_index(where, table))
    low, high = _number(where, table, "low"), _number(where, table, "high")
    if not low < high:
        raise ValueError(f"{where}: low must be below high, got low = {low}, high = {high}")
    if dist in _LOG_DISTRIBUTIONS and low <= 0:
        raise ValueError(f"{where}: {dist} needs low > 0 (bounds are of the value, not of its log), got {low}")
    q = 0.0
    if dist.startswith("q"):
        q = _number(where, table, "q")
        if q <= 0:
            raise ValueError(f"{where}: q must be > 0, got {q}")
    return ParamSpec(label, dist, label, low=low, high=high, q=q, list_index=_list_index(where, table))


def _list_index(where: str, table: Mapping[str, Any]) -> int | None:
    """``index = i``: the parameter is position i of a list key (e.g. beta1 of ``optim.betas``); the other
    positions come from ``[fixed]``."""
    index = table.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise ValueError(f"{where}: index must be a list position >= 0, got {index!r}")
    return index


def _load_space_file(path: Path) -> SearchSpace:
    document = read_toml(path, "search space file", f"built-in spaces: {', '.join(space_names())}", ValueError)
    extra = sorted(set(document) - {"name", "params", "fixed"})
    if extra:
        raise ValueError(f"search space file {path}: unknown top-level keys {', '.join(extra)} (name, params, fixed)")
    name = document.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ValueError(f"search space file {path}: name must be a non-empty string")
    params_table = document.get("params")
    if not isinstance(params_table, Mapping) or not params_table:
        raise ValueError(f'search space file {path}: no [params."section.key"] tables; nothing to search')
    params_flat = _flatten_tables(params_table, "", lambda t: "dist" in t)
    params = tuple(
        _param_from_table(f'{path}: [params."{label}"]', label, table) for label, table in params_flat.items()
    )
    fixed_table = document.get("fixed", {})
    if not isinstance(fixed_table, Mapping):
        raise ValueError(f"search space file {path}: [fixed] must be a table of config keys and values")
    fixed = _flatten_tables(fixed_table, "", lambda t: False)
    for key, value in fixed.items():
        _check_config_key(f"{path}: [fixed]", key)
        toml_value(value)  # fails early on values that cannot become overrides
    # A list key may be fixed and have some positions searched (index = i); anything else is set twice.
    both = sorted(set(fixed) & {p.label for p in params if p.list_index is None})
    if both:
        raise ValueError(f"search space file {path}: {', '.join(both)} both fixed and searched")
    return SearchSpace(name, params, fixed, source=str(path))
