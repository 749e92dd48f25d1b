"""The training configuration: a TOML file with sections, command-line overrides, and their validation.

A config file has up to five tables; every key is optional and falls back to the defaults below::

    [model]  name, hidden, activation, residual, bias (mlp); activation (lenet5); channels, hidden, activation
             (convnet); depth, width (resnet); depth, width, slope, init (sigmoid_resnet); depth, width, heads,
             patch, mlp_ratio (vit); init_scale (any model)
    [data]   name, path, format, cache_dir, batch_size (global), eval_batch_size, train_examples,
             test_examples, normalize, augment, synthetic_*, teacher_singular_values
    [optim]  name, lr, momentum, momentum_form, nesterov, weight_decay, betas, eps, schedule, milestones, decay_every,
             gamma, end_lr, end_factor, warmup_steps, warmup_epochs, base_batch_size, layer_order, skip_*
    [kfac]   the arguments of distkfac.KFACPreconditioner (used when optim.name = "kfac"), and damping_adaptive,
             damping_interval, damping_min, damping_max (adaptive Levenberg-Marquardt damping)
    [run]    out_dir, epochs or steps, step_cap, diverge_above, seed, checkpoint_every, checkpoint_every_s,
             keep_checkpoints, eval_every, eval_every_steps, log_every, resume, stop_after_steps, progress, backend,
             ddp, threads, tensorboard,
             deterministic, target_accuracy, stop_at_target, noise_every, train_eval_examples, fisher_every,
             fisher_every_epochs, fisher_layer, fisher_examples, fisher_trim, outlier_k, fisher_save, loss,
             dynamics_every, rank_threshold, phase_tolerance, phase_min_steps
    [job]    not read here: the batch job's resources, for ``python -m launch submit`` (docs/launch.md)

Overrides are ``section.key=value`` with the value read as a TOML value (``optim.lr=0.1``,
``optim.milestones=[30, 60]``, ``model.name=lenet5``: a bare word that is not TOML is taken as a string).
Unknown sections or keys, values of the wrong type and out-of-range values raise :class:`ConfigError`, whose
message names the key and says what is expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from jobs.optimizers import LAYER_ORDERS, OPTIMIZER_NAMES, OPTIMIZERS

__all__ = [
    "ACTIVATIONS",
    "DATASET_NAMES",
    "MODEL_NAMES",
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "Config",
    "ConfigError",
    "DataConfig",
    "KFACConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "build_config",
    "ignored_keys",
    "load_config",
    "parse_override",
    "read_toml",
    "toml_value",
    "trajectory_differences",
]

MODEL_NAMES: Final = ("mlp", "lenet5", "convnet", "resnet", "sigmoid_resnet", "vit")
ACTIVATIONS: Final = ("relu", "tanh", "none")
DATASET_NAMES: Final = ("fashion-mnist", "mnist", "cifar10", "synthetic", "teacher")
LOSSES: Final = ("cross_entropy", "squared")
CIFAR_FORMATS: Final = ("auto", "python", "folder")
SCHEDULE_NAMES: Final = ("constant", "step", "linear")
MOMENTUM_FORMS: Final = ("torch", "chainer")
DTYPE_NAMES: Final = ("", "float32", "float64", "bfloat16", "float16")
BACKENDS: Final = ("auto", "gloo", "nccl", "horovod", "mpi", "single")


class ConfigError(ValueError):
    """The configuration is not valid; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # mlp, convnet: widths of the hidden layers
    channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64])  # convnet: of the 3x3 convolutions
    activation: str = "relu"  # mlp, lenet5, convnet: relu | tanh | none (a linear network)
    residual: bool = False  # mlp: skip connections around hidden layers whose input and output widths are equal
    depth: int = 20  # resnet: 6n + 2 (20, 32, 44, 56, 110); vit: transformer blocks (give it: e.g. 2)
    width: int = 16  # resnet: channels of the first stage (16, 32, 64 in the three stages by default); vit: the
    # tokens' width (give it: e.g. 64; a multiple of heads)
    heads: int = 4  # vit: attention heads
    patch: int = 7  # vit: side of the square patches, dividing the image's height and width (7: 16 tokens of 28x28)
    mlp_ratio: int = 2  # vit: the hidden width of each block's MLP is mlp_ratio x width
    slope: float = 2.5  # sigmoid_resnet: eta_0 of f(s) = 1/(1 + exp(-eta_0 s)) (seed 001); depth L = 2n + 3, width N
    init: float = 0.05  # sigmoid_resnet: every weight and bias uniform in [-init, init]
    bias: bool = True  # mlp: biases in the Linear layers (false with one hidden layer: W2 sigma(W1 x), seed 004)
    init_scale: float = 0.0  # any model: > 0 draws every Linear/Conv weight from N(0, init_scale^2), biases 0;
    # 0 keeps the model's own initialisation (seed 004's small initialisations: 1e-2, 1e-4, 1e-6). An explicit 0 is
    # accepted: configs written out in full (a study's replay of its best trial) must load again.


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    path: str = ""  # "" = the data set's default location
    format: str = "auto"  # cifar10: auto | python (cifar-10-batches-py) | folder (<split>/<class>/*.jpg, or .tar.gz)
    cache_dir: str = ""  # where tarballs are extracted and decoded images cached; "" = <repo>/build/data
    batch_size: int = 128  # global: split equally over the ranks; 0 = the whole training set (full batch)
    eval_batch_size: int = 1000
    train_examples: int = 0  # use only the first N training examples (0 = all)
    test_examples: int = 0  # evaluate on the first N test examples (0 = all)
    normalize: bool = True  # subtract the training set's per-channel mean, divide by its standard deviation
    augment: bool = False  # images: random crop (4 pixels of zero padding) and horizontal flip
    synthetic_shape: list[int] = field(default_factory=lambda: [32])
    synthetic_classes: int = 10
    synthetic_train_size: int = 4096
    synthetic_test_size: int = 1024
    synthetic_separation: float = 2.0  # distance scale of the class means (noise has unit variance)
    synthetic_seed: int = 0
    # teacher: regression on y = A x, x in R^(synthetic_shape[0]) whitened (X^T X / n = I on the training split),
    # y in R^(synthetic_classes), A of these singular values (rank = their number; seed 004)
    teacher_singular_values: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0])


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw | kfac (K-FAC preconditioning + momentum SGD)
    lr: float = 0.1  # base learning rate (before the linear scaling rule)
    momentum: float = 0.9  # sgd, kfac
    # sgd, kfac: "torch" (v = mu v + g; w -= lr v) or "chainer" (v = mu v - lr g; w += v, Chainer's MomentumSGD);
    # they differ only while the learning rate changes.
    momentum_form: str = "torch"
    nesterov: bool = False  # sgd, kfac
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw
    schedule: str = "constant"  # constant | step | linear
    milestones: list[int] = field(default_factory=list)  # step: epochs at which the lr is multiplied by gamma
    decay_every: int = 0  # step: multiply by gamma every N epochs instead (Chainer's ExponentialShift idiom)
    gamma: float = 0.1  # step
    end_lr: float = 0.0  # linear: the lr the decay heads for (reached one step after the last; see optim.py)
    end_factor: float = 0.0  # linear: when > 0, the decay heads for end_factor x the peak lr instead of end_lr
    warmup_steps: int = 0  # linear warmup from lr / warmup to lr; give steps or epochs, not both
    warmup_epochs: float = 0.0
    base_batch_size: int = 0  # linear scaling rule: lr * batch_size / base_batch_size (0 = off)
    layer_order: str = "forward"  # layerwise_gd: one layer per step, forward (input to output) or backward
    skip_strength: float = 0.05  # skip_gd: size of the new rank-1 term, a fraction of its fit (0 = current norms)
    skip_patience: int = 5  # skip_gd: a plateau is this many steps in a row whose loss fell by < skip_tolerance
    skip_tolerance: float = 1e-4  # skip_gd: of itself


@dataclass
class KFACConfig:
    damping: float = 1e-3
    factor_decay: float = 0.95
    factor_update_steps: int = 1
    inv_update_steps: int = 10
    kl_clip: float = 1e-3  # 0 = no KL clipping (KFACPreconditioner(kl_clip=None)); neither paper clips
    compute_method: str = "eigen"
    damping_form: str = ""  # "" = the method's own (eigen: tikhonov, inverse: factored) | factored-pi (docs/kfac.md)
    conv_factors: str = "mean"  # mean | kfc (Grosse & Martens 2016)
    g_scale: str = "example"  # example (per-example gradients) | batch (Chainer-era K-FAC: G of the mean loss)
    weight_sharing: str = "expand"  # expand | reduce (Eschenhagen et al. 2023): a Linear over a sequence
    fisher: str = "empirical"
    skip_layers: list[str] = field(default_factory=list)
    strategy: str = "comm-opt"
    grad_worker_fraction: float = 0.0  # 0 = the strategy's own
    factor_dtype: str = ""  # "" = the layer's dtype
    inv_dtype: str = ""
    comm_dtype: str = ""
    bucket_cap_mb: float = 8.0
    overlap_comm: bool = True
    # Scale (docs/kfac.md, "At scale"): factors larger than this are decomposed as diagonal blocks (0 = never), and
    # decompositions computed in the background and installed one interval late.
    split_factors_above: int = 0
    async_decompositions: bool = False
    # Adaptive Levenberg-Marquardt damping (Martens & Grosse 2015, 6.5; docs/kfac.md, "Adaptive damping"): damping is
    # then the initial value, adapted every damping_interval steps within [damping_min, damping_max].
    damping_adaptive: bool = False
    damping_interval: int = 5
    damping_min: float = 1e-8
    damping_max: float = 1e4


@dataclass
class RunConfig:
    out_dir: str = ""  # "" = runs/<config file name without .toml>
    epochs: int = 0  # give epochs or steps
    steps: int = 0
    step_cap: int = 0  # with epochs: the run ends at this step if its epochs have not ended it (0 = no cap)
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    # Also a checkpoint once this many seconds have passed since the last one (0 = off): rank 0's clock, read at the
    # logged steps (run.log_every), decides for every rank. For runs of unknown step cost, e.g. tuning trials.
    checkpoint_every_s: float = 0.0
    keep_checkpoints: int = 2  # the newest N are kept (0 = all)
    eval_every: int = 1  # epochs between evaluations on the test split (0 = only at the end)
    log_every: int = 1  # steps between per-step metric records
    resume: bool = False  # continue from the newest checkpoint in out_dir
    stop_after_steps: int = 0  # stop after this many steps without a final checkpoint, as if killed (tests)
    progress: bool = True  # progress line on stderr (rank 0, terminals only)
    backend: str = "auto"  # launch.distributed backend: auto | gloo | nccl | horovod | mpi | single
    ddp: bool = True  # wrap the model in DistributedDataParallel under torch.distributed
    threads: int = 0  # torch.set_num_threads (0 = leave as is)
    # Examples per forward/backward pass, the step's gradient the mean over its passes (0 = chosen automatically:
    # 128 on the CPU where that changes only the rounding; jobs.passes). Set it to the rank's batch for one pass.
    micro_batch: int = 0
    tensorboard: bool = True  # also log to TensorBoard when the tensorboard package is installed
    deterministic: bool = True  # cuDNN deterministic algorithms, no autotuning
    # Batch-size scaling study (docs/train.md):
    eval_every_steps: int = 0  # also evaluate on the test split every N steps (0 = off), for a fine steps-to-target
    target_accuracy: float = 0.0  # record the first evaluated step whose test accuracy reaches it (0 = no target)
    stop_at_target: bool = True  # with a target: end the run (checkpoint, summary) at the step that reaches it
    noise_every: int = 0  # measure the gradient noise scale every N steps (0 = off; jobs.noise_scale)
    diverge_above: float = 0.0  # > 0: a training loss above this also ends the run as diverged (besides NaN/inf)
    train_eval_examples: int = 10000  # at the end, evaluate on the first N training examples (0 = all)
    # Fisher-spectrum and gradient-outlier diagnostics (jobs.diagnostics, docs/fisher.md):
    fisher_every: int = 0  # every N steps (0 = off)
    fisher_every_epochs: int = 0  # and/or at the end of every N epochs (0 = off)
    fisher_layer: str = ""  # a module name of the model ("" = every parameter)
    fisher_examples: int = 0  # over the first N training examples (0 = all)
    fisher_trim: float = 0.1  # the fraction of examples with the largest |v1 . g_i| left out of the trimmed eigenvalue
    outlier_k: float = 10.0  # count gradient norms above k MAD
    fisher_save: bool = False  # also write each record's projections and gradient norms to fisher/step_<N>.pt
    loss: str = "cross_entropy"  # cross_entropy | squared (0.5 |f(x) - y|^2, y one-hot or a teacher's; mean over x)
    # Saddle-to-saddle instruments (jobs.dynamics, docs/saddle.md):
    dynamics_every: int = 0  # every N steps (0 = off): singular values and ranks of the weights, units' alignment
    rank_threshold: float = 0.1  # effective rank: singular values above this fraction of the largest
    phase_tolerance: float = 1e-2  # a step is a drop when the loss falls by at least this fraction of itself
    phase_min_steps: int = 5  # shorter phases join the one before


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    run: RunConfig = field(default_factory=RunConfig)
    #: ``section.key`` names set by the file or an override (not defaults).
    explicit: frozenset[str] = frozenset()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: Final[dict[str, type]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "kfac": KFACConfig,
    "run": RunConfig,
}

#: Tables of a config file that other tools read and training ignores: [job] is the batch job's resources, read by
#: ``python -m launch submit`` (see docs/launch.md), so one file can describe a whole run.
OTHER_TOOLS_SECTIONS: Final = frozenset({"job"})

# Keys that only make sense for some models or optimizers: setting them for another one is reported as ignored.
_MODEL_KEYS: Final[dict[str, set[str]]] = {
    "mlp": {"hidden", "activation", "residual", "bias"},
    "lenet5": {"activation"},
    "convnet": {"channels", "hidden", "activation"},
    "sigmoid_resnet": {"depth", "width", "slope", "init"},
    "resnet": {"depth", "width"},
    "vit": {"depth", "width", "heads", "patch", "mlp_ratio"},
}
_OPTIM_KEYS: Final[dict[str, frozenset[str]]] = {name: entry.keys for name, entry in OPTIMIZERS.items()}
# Run keys that do not change what a run computes: they may differ between a run and its resumption.
# Evaluations never change the parameters, so eval_every and eval_every_steps are here although, with
# stop_at_target, they decide at which steps the run may stop: changing them on resume changes only the resolution
# of steps_to_target after the checkpoint, never the steps computed. train_eval_examples is read once, at the end.
# Not here: target_accuracy and stop_at_target (they decide where the run ends and what steps_to_target means) and
# noise_every (the noise-scale average in the checkpoint is only meaningful for one measuring interval).
_BOOKKEEPING_RUN_KEYS: Final = frozenset(
    {"out_dir", "checkpoint_every", "checkpoint_every_s", "keep_checkpoints", "eval_every", "log_every", "resume"}
    | {"stop_after_steps"}
    | {"progress", "tensorboard", "backend", "threads", "eval_every_steps", "train_eval_examples"}
    | {"micro_batch"}  # the same step up to rounding (jobs.passes)
    | {"fisher_every", "fisher_every_epochs", "fisher_layer", "fisher_examples", "fisher_trim", "outlier_k"}
    | {"fisher_save"}  # the diagnostics only read the model
    | {"dynamics_every", "rank_threshold", "phase_tolerance", "phase_min_steps"}  # so do the saddle instruments
)
_BARE_WORD = re.compile(r"[A-Za-z0-9_.:/+\-]+")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int, float, str, bool or list of them); TOML integers are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional fields today
        raise ConfigError(f"{key}: unsupported type {tp}")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        # TOML reads nan and inf as floats, and every range check below is false for NaN: refused here, for every
        # float key, before a run starts (a NaN lr would otherwise fail at the first logged step).
        raise ConfigError(f"{key}: {toml_value(float(value))} is not a usable value: give a finite number")
    return float(value) if tp is float else value


def _closest(name: str, options: Sequence[str]) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _section_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def _set(raw: dict[str, dict[str, Any]], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"{where}: key {dotted!r} must be section.key with a section among {', '.join(SECTIONS)} "
            "(e.g. optim.lr=0.1)"
        )
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(
            f"{where}: unknown section {section!r}{_closest(section, list(SECTIONS))}; "
            f"sections are {', '.join(SECTIONS)}"
        )
    types_ = _section_types(section)
    if key not in types_:
        raise ConfigError(
            f"{where}: unknown key {dotted!r}{_closest(key, list(types_))}; [{section}] has: {', '.join(types_)}"
        )
    raw.setdefault(section, {})[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is read as TOML, or else taken as a bare string."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. optim.lr=0.1 or data.batch_size=256)")
    value_text = value_text.strip()
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        if value_text and not _BARE_WORD.fullmatch(value_text):
            raise ConfigError(
                f"override {text!r}: {value_text!r} is not a TOML value (strings with spaces or symbols need "
                "quotes: key='a b'; lists look like [1, 2])"
            ) from None
        value = value_text
    return key, value


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value, as :func:`parse_override` and TOML files read it back (strings quoted,
    lists bracketed, floats in their shortest round-trip form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are a subset of TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def build_config(
    file_values: Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    source: str = "config",
    default_out_dir: str = "runs/default",
) -> Config:
    """The validated configuration from a parsed TOML document and ``section.key=value`` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    for section, table in file_values.items():
        if section in OTHER_TOOLS_SECTIONS:
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]{_closest(section, list(SECTIONS))}; "
                f"sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: {section} must be a table ([{section}] followed by key = value lines)")
        for key, value in table.items():
            _set(raw, f"{section}.{key}", value, source)
    for text in overrides:
        key, value = parse_override(text)
        _set(raw, key, value, f"override {text!r}")

    sections: dict[str, Any] = {}
    explicit: set[str] = set()
    for section, cls in SECTIONS.items():
        types_ = _section_types(section)
        values = {key: _coerce(f"{section}.{key}", value, types_[key]) for key, value in raw.get(section, {}).items()}
        explicit.update(f"{section}.{key}" for key in values)
        sections[section] = cls(**values)
    config = Config(**sections, explicit=frozenset(explicit))
    if not config.run.out_dir:
        config.run.out_dir = default_out_dir
    _validate(config)
    return config


def read_toml(path: Path, what: str, hint: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """The TOML document at ``path``; a missing or malformed file raises ``error`` naming ``what`` it should be."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist ({hint})")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path}: not valid TOML: {exc}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Reads a TOML config file and applies the overrides; ``run.out_dir`` defaults to ``runs/<file stem>``."""
    path = Path(path)
    document = read_toml(path, "config file", "examples: jobs/configs/")
    return build_config(document, overrides, source=str(path), default_out_dir=f"runs/{path.stem}")


def _choice(key: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        shown = ", ".join(repr(o) for o in options)
        raise ConfigError(f"{key} = {value!r} is not known{_closest(value, options)}; choose one of {shown}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _validate(c: Config) -> None:
    _validate_model(c.model)
    _validate_data(c.data)
    _validate_optim(c.optim)
    _validate_kfac(c.kfac)
    _validate_run(c.run, c.data)
    _validate_saddle(c)


def _validate_model(m: ModelConfig) -> None:
    _choice("model.name", m.name, MODEL_NAMES)
    _choice("model.activation", m.activation, ACTIVATIONS)
    if not (m.init_scale >= 0 and math.isfinite(m.init_scale)):
        raise ConfigError(
            f"model.init_scale = {m.init_scale}: give a positive standard deviation for every weight (e.g. 1e-4), "
            "or 0 for the model's own initialisation"
        )
    if m.residual and not m.bias:
        raise ConfigError("model.bias = false is for MLPs without residual layers: set model.residual = false")
    if not m.hidden and m.residual:
        raise ConfigError("model.residual = true needs hidden layers: set model.hidden, e.g. [256, 256, 256]")
    for i, width in enumerate(m.hidden):
        _positive(f"model.hidden[{i}]", width)
    if m.name == "convnet" and not m.channels:
        raise ConfigError("model.channels is empty: a convnet needs convolutions, e.g. [32, 32, 64, 64]")
    for i, width in enumerate(m.channels):
        _positive(f"model.channels[{i}]", width)
    if m.name == "sigmoid_resnet" and (m.depth < 5 or (m.depth - 3) % 2):
        raise ConfigError(f"model.depth = {m.depth}: a sigmoid_resnet has depth L = 2n + 3 (5, 7, ..., 1001)")
    if m.name == "sigmoid_resnet" and not (m.slope > 0 and m.init > 0):
        raise ConfigError(f"model.slope ({m.slope}) and model.init ({m.init}) must be positive for a sigmoid_resnet")
    if m.name == "resnet" and (m.depth < 8 or (m.depth - 2) % 6):
        raise ConfigError(f"model.depth = {m.depth}: a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 32, 44, 56)")
    _positive("model.width", m.width)
    if m.name == "vit":
        _validate_vit(m)


def _validate_vit(m: ModelConfig) -> None:
    for key in ("depth", "heads", "patch", "mlp_ratio"):
        _positive(f"model.{key}", getattr(m, key))
    if m.width % m.heads:
        raise ConfigError(
            f"model.width = {m.width} is not a multiple of model.heads = {m.heads}: every head takes width / heads "
            f"of each token (e.g. width = {m.heads * max(1, round(m.width / m.heads))})"
        )


def _validate_data(d: DataConfig) -> None:
    _choice("data.name", d.name, DATASET_NAMES)
    _choice("data.format", d.format, CIFAR_FORMATS)
    _positive("data.batch_size", d.batch_size, zero_ok=True)
    _positive("data.eval_batch_size", d.eval_batch_size)
    _positive("data.train_examples", d.train_examples, zero_ok=True)
    _positive("data.test_examples", d.test_examples, zero_ok=True)
    if not d.synthetic_shape or any(s <= 0 for s in d.synthetic_shape):
        raise ConfigError(f"data.synthetic_shape must be a non-empty list of sizes > 0, got {d.synthetic_shape}")
    if d.synthetic_classes < 2:
        raise ConfigError(f"data.synthetic_classes must be >= 2, got {d.synthetic_classes}")
    _positive("data.synthetic_train_size", d.synthetic_train_size)
    _positive("data.synthetic_test_size", d.synthetic_test_size)
    _positive("data.synthetic_separation", d.synthetic_separation, zero_ok=True)


def _validate_optim(o: OptimConfig) -> None:
    _choice("optim.name", o.name, OPTIMIZER_NAMES)
    _choice("optim.schedule", o.schedule, SCHEDULE_NAMES)
    _choice("optim.momentum_form", o.momentum_form, MOMENTUM_FORMS)
    if o.momentum_form == "chainer" and o.nesterov:
        raise ConfigError("optim.momentum_form = 'chainer' has no Nesterov variant: set optim.nesterov = false")
    _positive("optim.lr", o.lr)
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov = true needs optim.momentum > 0")
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _positive("optim.eps", o.eps)
    if o.milestones != sorted(set(o.milestones)) or any(m <= 0 for m in o.milestones):
        raise ConfigError(f"optim.milestones must be increasing epochs > 0, got {o.milestones}")
    _positive("optim.decay_every", o.decay_every, zero_ok=True)
    if o.decay_every and o.milestones:
        raise ConfigError(
            "give optim.milestones (decay at those epochs) or optim.decay_every (every N epochs), not both"
        )
    if o.schedule == "step" and not (o.milestones or o.decay_every):
        raise ConfigError(
            "optim.schedule = 'step' needs optim.milestones (epochs), e.g. [30, 60], or optim.decay_every (epochs)"
        )
    _positive("optim.gamma", o.gamma)
    _positive("optim.end_lr", o.end_lr, zero_ok=True)
    if not 0.0 <= o.end_factor <= 1.0:
        raise ConfigError(f"optim.end_factor must be in [0, 1] (a fraction of the peak lr), not {o.end_factor}")
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    _positive("optim.warmup_epochs", o.warmup_epochs, zero_ok=True)
    if o.warmup_steps and o.warmup_epochs:
        raise ConfigError("give optim.warmup_steps or optim.warmup_epochs, not both")
    _positive("optim.base_batch_size", o.base_batch_size, zero_ok=True)


def _validate_kfac(k: KFACConfig) -> None:
    # distkfac's own lists (imported here: distkfac imports torch, which the rest of the config does not need).
    import distkfac

    _positive("kfac.damping", k.damping)
    if not 0 <= k.factor_decay < 1:
        raise ConfigError(f"kfac.factor_decay must be in [0, 1), got {k.factor_decay}")
    _positive("kfac.factor_update_steps", k.factor_update_steps)
    _positive("kfac.inv_update_steps", k.inv_update_steps)
    _positive("kfac.kl_clip", k.kl_clip, zero_ok=True)
    _choice("kfac.compute_method", k.compute_method, tuple(distkfac.METHODS))
    _choice("kfac.damping_form", k.damping_form, ("", *distkfac.DAMPING_FORMS))
    if k.compute_method == "inverse" and k.damping_form == "tikhonov":
        raise ConfigError(
            "kfac.damping_form = 'tikhonov' needs kfac.compute_method = 'eigen': the exact damping of A (x) G is not "
            "a product of two factor inverses (use damping_form = 'factored' or 'factored-pi' with 'inverse')"
        )
    _choice("kfac.conv_factors", k.conv_factors, distkfac.CONV_FACTORS)
    _choice("kfac.g_scale", k.g_scale, distkfac.G_SCALES)
    _choice("kfac.weight_sharing", k.weight_sharing, distkfac.WEIGHT_SHARINGS)
    _choice("kfac.fisher", k.fisher, distkfac.FISHER_TYPES)
    _choice("kfac.strategy", k.strategy, distkfac.STRATEGIES)
    for key in ("factor_dtype", "inv_dtype", "comm_dtype"):
        _choice(f"kfac.{key}", getattr(k, key), DTYPE_NAMES)
    _positive("kfac.bucket_cap_mb", k.bucket_cap_mb)
    _positive("kfac.split_factors_above", k.split_factors_above, zero_ok=True)
    _validate_adaptive_damping(k)


def _validate_adaptive_damping(k: KFACConfig) -> None:
    _positive("kfac.damping_interval", k.damping_interval)
    _positive("kfac.damping_min", k.damping_min)
    if not k.damping_min <= k.damping_max:
        raise ConfigError(
            f"kfac.damping_min = {k.damping_min} is above kfac.damping_max = {k.damping_max}: the adaptive damping "
            "stays between them, so give damping_min <= damping_max"
        )
    if k.damping_adaptive and not k.damping_min <= k.damping <= k.damping_max:
        raise ConfigError(
            f"kfac.damping = {k.damping} (the adaptive damping's initial value) must lie in [kfac.damping_min, "
            f"kfac.damping_max] = [{k.damping_min}, {k.damping_max}]: move it inside or widen the bounds"
        )


def _validate_run(r: RunConfig, d: DataConfig) -> None:
    if (r.epochs > 0) == (r.steps > 0) or r.epochs < 0 or r.steps < 0:
        raise ConfigError(
            f"give exactly one of run.epochs and run.steps (> 0); got epochs = {r.epochs}, steps = {r.steps}"
        )
    for key in ("checkpoint_every", "checkpoint_every_s", "keep_checkpoints", "eval_every", "stop_after_steps",
                "threads", "step_cap", "diverge_above"):  # fmt: skip
        _positive(f"run.{key}", getattr(r, key), zero_ok=True)
    _positive("run.log_every", r.log_every)
    for key in ("eval_every_steps", "noise_every", "train_eval_examples", "fisher_every", "fisher_every_epochs"):
        _positive(f"run.{key}", getattr(r, key), zero_ok=True)
    _positive("run.fisher_examples", r.fisher_examples, zero_ok=True)
    if not 0.0 <= r.fisher_trim < 1.0:
        raise ConfigError(f"run.fisher_trim must be a fraction in [0, 1) (0.1 leaves out 10%), got {r.fisher_trim}")
    _positive("run.outlier_k", r.outlier_k)
    if not 0.0 <= r.target_accuracy <= 1.0:
        raise ConfigError(
            f"run.target_accuracy must be in (0, 1] (a fraction of the test split: 0.9 for 90%), or 0 for no "
            f"target; got {r.target_accuracy}"
        )
    if r.noise_every and d.batch_size < 2:
        raise ConfigError(
            f"run.noise_every needs a local batch of at least 2 examples to split in two halves, but "
            f"data.batch_size = {d.batch_size}: raise data.batch_size or set run.noise_every = 0"
        )
    _choice("run.backend", r.backend, BACKENDS)


def _validate_saddle(c: Config) -> None:
    """Seed 004's pieces: the teacher, the squared loss, layer-wise and plateau-skipping GD, the instruments."""
    _choice("run.loss", c.run.loss, LOSSES)
    _choice("optim.layer_order", c.optim.layer_order, LAYER_ORDERS)
    d, m, o, r = c.data, c.model, c.optim, c.run
    if d.name == "teacher":
        values = d.teacher_singular_values
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values) or len(d.synthetic_shape) != 1:
            raise ConfigError(
                f"data.name = 'teacher' needs positive data.teacher_singular_values (got {values}) and a flat "
                f"data.synthetic_shape = [inputs] (got {d.synthetic_shape})"
            )
        if len(values) > min(d.synthetic_shape[0], d.synthetic_classes):
            raise ConfigError(
                f"data.teacher_singular_values: {len(values)} values, but a {d.synthetic_classes} x "
                f"{d.synthetic_shape[0]} teacher has rank at most {min(d.synthetic_shape[0], d.synthetic_classes)}"
            )
        if d.synthetic_train_size < d.synthetic_shape[0]:
            raise ConfigError(
                f"data.synthetic_train_size = {d.synthetic_train_size}: whitening a teacher's {d.synthetic_shape[0]} "
                "inputs needs at least as many training examples"
            )
        if r.loss != "squared" or r.target_accuracy:
            raise ConfigError("data.name = 'teacher' is a regression: set run.loss = 'squared' and no target accuracy")
    if r.loss == "squared" and (r.noise_every or r.fisher_every or r.fisher_every_epochs or c.kfac.fisher == "mc"):
        raise ConfigError(
            "run.noise_every, run.fisher_every(_epochs) and kfac.fisher = 'mc' measure the cross-entropy's gradients: "
            "set run.loss = 'cross_entropy', or turn them off"
        )
    if o.name == "skip_gd" and not (m.name == "mlp" and len(m.hidden) == 1 and not m.bias and not m.residual):
        raise ConfigError(
            "optim.name = 'skip_gd' trains W2 sigma(W1 x): set model.name = 'mlp', one width in model.hidden, "
            "model.bias = false"
        )
    if not (o.skip_strength >= 0 and o.skip_patience >= 1 and o.skip_tolerance > 0):
        raise ConfigError(
            f"optim.skip_strength >= 0, optim.skip_patience >= 1 and optim.skip_tolerance > 0, got "
            f"{o.skip_strength}, {o.skip_patience}, {o.skip_tolerance}"
        )
    _positive("run.dynamics_every", r.dynamics_every, zero_ok=True)
    if not (0 < r.rank_threshold < 1 and r.phase_tolerance > 0 and r.phase_min_steps >= 1):
        raise ConfigError(
            f"run.rank_threshold in (0, 1), run.phase_tolerance > 0 and run.phase_min_steps >= 1, got "
            f"{r.rank_threshold}, {r.phase_tolerance}, {r.phase_min_steps}"
        )


def ignored_keys(config: Config) -> list[str]:
    """Explicitly set keys that the chosen model or optimizer does not use (reported, not an error)."""
    ignored = []
    used_model = _MODEL_KEYS[config.model.name]
    for key in sorted(set().union(*_MODEL_KEYS.values()) - used_model):
        if f"model.{key}" in config.explicit:
            ignored.append(f"model.{key} (not used by {config.model.name})")
    used_optim = _OPTIM_KEYS[config.optim.name]
    for key in sorted(set().union(*_OPTIM_KEYS.values()) - used_optim):
        if f"optim.{key}" in config.explicit:
            ignored.append(f"optim.{key} (not used by {config.optim.name})")
    if config.optim.name != "kfac":
        ignored += [f"{key} (optim.name is not kfac)" for key in sorted(config.explicit) if key.startswith("kfac.")]
    elif not config.kfac.damping_adaptive:
        adaptive = ("kfac.damping_interval", "kfac.damping_max", "kfac.damping_min")
        ignored += [f"{key} (kfac.damping_adaptive is false)" for key in adaptive if key in config.explicit]
    return ignored


def trajectory_differences(saved: Mapping[str, Mapping[str, Any]], current: Config) -> list[str]:
    """Keys whose values differ between a checkpoint's config and ``current``, ignoring bookkeeping keys of [run]."""
    differences = []
    now = current.to_dict()
    defaults = Config().to_dict()
    for section, values in now.items():
        for key, value in values.items():
            if section == "run" and key in _BOOKKEEPING_RUN_KEYS:
                continue
            if key not in saved.get(section, {}) and value == defaults[section][key]:
                continue  # a key added after the checkpoint was written, left at its default: the same trajectory
            before = saved.get(section, {}).get(key)
            if before != value:
                differences.append(f"{section}.{key}: checkpoint {before!r}, now {value!r}")
    return differences
