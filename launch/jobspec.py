"""What a batch job asks for: the ``[job]`` table of a TOML file, command-line flags over it, and its validation.

Every value is checked here, with a message that names the key and the fix, so that rendering (``jobscript``) can
trust what it gets. Reading TOML and validating are separate: ``load_job_table`` reads a file's ``[job]`` table,
``build_spec`` merges tables (later wins; ``modules`` and ``env`` accumulate) and validates.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from launch.environment import LaunchError

SCHEDULERS: Final = ("slurm", "pbs")
LAUNCHERS: Final = ("srun", "mpirun", "none")
CONTAINERS: Final = ("apptainer", "singularity", "podman")
PBS_FLAVORS: Final = ("torque", "pro")

# A value that goes on a #SBATCH / #PBS line or a qsub command line: no spaces, quotes or shell metacharacters.
_DIRECTIVE_VALUE = re.compile(r"[A-Za-z0-9_.,:/%@+=~-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARRAY = re.compile(r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?")
_WALLTIME = re.compile(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)")


@dataclass(frozen=True)
class JobSpec:
    """A validated job; see docs/launch.md for each key's meaning."""

    scheduler: str | None = None  # slurm | pbs | None (whichever of sbatch, qsub is installed)
    name: str = "distkfac"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    walltime: str = "01:00:00"  # normalised to H:MM:SS
    partition: str | None = None  # Slurm; PBS uses it when queue is not given
    queue: str | None = None  # PBS; Slurm uses it when partition is not given
    account: str | None = None
    output: str | None = None
    error: str | None = None
    chdir: str | None = None
    modules: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    setup: tuple[str, ...] = ()  # shell lines run before the command
    directives: tuple[str, ...] = ()  # extra scheduler options, each rendered as is after "#SBATCH " / "#PBS "
    image: str | None = None
    container: str = "apptainer"
    container_args: tuple[str, ...] = ()
    nv: bool | None = None  # apptainer --nv, podman's CDI GPUs; None: when gpus_per_node > 0
    launcher: str | None = None  # srun | mpirun | none; None: srun for Slurm, mpirun for PBS
    mpi: str = "pmix"  # srun --mpi=
    launcher_args: tuple[str, ...] = ()
    array: str | None = None  # index range, e.g. "0-7" or "0-15%4"
    pbs_flavor: str = "torque"  # torque: nodes=N:ppn=P, -t; pro: select=N:ncpus=..:mpiprocs=.., -J
    command: str | None = None  # shell text; None: the training command below
    config: str | None = None  # the training config (passes through to the command)
    overrides: tuple[str, ...] = ()  # section.key=value overrides for the training command
    python: str = "python"

    @property
    def ntasks(self) -> int:
        return self.nodes * self.tasks_per_node


KEYS: Final = (*(f.name for f in fields(JobSpec)), "ntasks")


def load_job_table(path: str | Path, required: bool = True) -> dict[str, Any]:
    """The ``[job]`` table of a TOML file (empty when the file has none and ``required`` is false)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise LaunchError(f"launch: cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise LaunchError(f"launch: {path} is not valid TOML: {error}") from None
    table = document.get("job")
    if table is None:
        if required:
            raise LaunchError(f"launch: {path} has no [job] table (see docs/launch.md for an example)")
        return {}
    if not isinstance(table, dict):
        raise LaunchError(f"launch: {path}: 'job' must be a table ([job] followed by key = value lines)")
    return {key: (value, str(path)) for key, value in table.items()}


def _positive(key: str, value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise LaunchError(f"launch: {where}: {key} must be a whole number, got {value!r}") from None
    if value < minimum:
        raise LaunchError(f"launch: {where}: {key} must be at least {minimum}, got {value}")
    return value


def parse_walltime(value: Any, where: str = "job") -> str:
    """``HH:MM:SS``, ``D-HH:MM:SS`` or whole minutes -> ``H:MM:SS`` (hours may exceed 24)."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
        if minutes <= 0:
            raise LaunchError(f"launch: {where}: walltime must be positive, got {value} minutes")
        return f"{minutes // 60}:{minutes % 60:02d}:00"
    text = str(value).strip()
    if text.isdigit():
        return parse_walltime(int(text), where)
    match = _WALLTIME.fullmatch(text)
    if not match or int(match.group(3)) >= 60 or int(match.group(4)) >= 60:
        raise LaunchError(
            f"launch: {where}: walltime {text!r} is not valid: use HH:MM:SS (e.g. 02:30:00), D-HH:MM:SS "
            "(e.g. 1-12:00:00) or whole minutes (e.g. 90)"
        )
    days, hours, minutes, seconds = (int(group or 0) for group in match.groups())
    hours += 24 * days
    if hours == minutes == seconds == 0:
        raise LaunchError(f"launch: {where}: walltime must be positive, got {text!r}")
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def parse_array(value: Any, where: str = "job") -> str:
    """A count N means N array tasks, 0 to N-1; a string is a scheduler range (``0-7``, ``1,3,5``, ``0-15%4``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"0-{_positive('array', value, where) - 1}"
    text = str(value).strip()
    if text.isdigit():
        return parse_array(int(text), where)
    if not _ARRAY.fullmatch(text):
        raise LaunchError(
            f"launch: {where}: array {text!r} is not valid: give a count (8 means tasks 0-7) or a range such as "
            "0-7, 1,3,5 or 0-15%4 (at most 4 at a time)"
        )
    return text


def _string(key: str, value: Any, where: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise LaunchError(f"launch: {where}: {key} must be a string, got {value!r}")
    text = str(value)
    if "\n" in text or "\0" in text:
        raise LaunchError(f"launch: {where}: {key} must be one line, got {text!r}")
    return text


def _directive_value(key: str, value: Any, where: str) -> str:
    text = _string(key, value, where)
    if not _DIRECTIVE_VALUE.fullmatch(text):
        raise LaunchError(
            f"launch: {where}: {key} {text!r} goes on a #SBATCH/#PBS line: use letters, digits and _.,:/%@+=~- "
            "only (no spaces or quotes)"
        )
    return text


def _strings(key: str, value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_string(key, value, where),)
    if not isinstance(value, list | tuple):
        raise LaunchError(f"launch: {where}: {key} must be a list of strings, got {value!r}")
    return tuple(_string(key, item, where) for item in value)


def _env(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        pairs = []
        for item in _strings("env", value, where):
            name, sep, text = item.partition("=")
            if not sep:
                raise LaunchError(f"launch: {where}: env entry {item!r} must be NAME=VALUE")
            pairs.append((name, text))
    result = []
    for name, text in pairs:
        if not _ENV_NAME.fullmatch(name):
            raise LaunchError(f"launch: {where}: env name {name!r} is not a shell variable name")
        if isinstance(text, bool):
            text = "1" if text else "0"
        result.append((name, _string(f"env.{name}", text, where)))
    return tuple(result)


def _choice(key: str, value: Any, options: Sequence[str], where: str) -> str:
    text = _string(key, value, where)
    if text not in options:
        raise LaunchError(f"launch: {where}: {key} must be one of {', '.join(options)}, got {text!r}")
    return text


def _bool(key: str, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise LaunchError(f"launch: {where}: {key} must be true or false, got {value!r}")
    return value


def build_spec(*tables: Mapping[str, tuple[Any, str]]) -> JobSpec:
    """Merge ``{key: (value, where)}`` tables, later over earlier, and validate. ``modules``, ``env``, ``setup``
    and ``directives`` accumulate (env by name); every other key is replaced."""
    merged: dict[str, tuple[Any, str]] = {}
    accumulated: dict[str, list[Any]] = {"modules": [], "setup": [], "directives": []}
    env: dict[str, str] = {}
    for table in tables:
        for key, (value, where) in table.items():
            if key not in KEYS:
                raise LaunchError(f"launch: {where}: unknown job key {key!r}; keys are: {', '.join(sorted(KEYS))}")
            if key in accumulated:
                accumulated[key] += _strings(key, value, where)
            elif key == "env":
                env.update(_env(value, where))
            else:
                merged[key] = (value, where)

    values: dict[str, Any] = {
        "modules": tuple(accumulated["modules"]),
        "setup": tuple(accumulated["setup"]),
        "directives": tuple(accumulated["directives"]),
        "env": tuple(env.items()),
    }
    for module in values["modules"]:
        if not module.strip() or any(c.isspace() for c in module):
            raise LaunchError(f"launch: job: module {module!r} must be one module name (one entry per module)")
    for key, (value, where) in merged.items():
        if key in ("nodes", "tasks_per_node", "cpus_per_task", "ntasks"):
            values[key] = _positive(key, value, where)
        elif key == "gpus_per_node":
            values[key] = _positive(key, value, where, minimum=0)
        elif key == "walltime":
            values[key] = parse_walltime(value, where)
        elif key == "array":
            values[key] = parse_array(value, where)
        elif key == "scheduler":
            values[key] = _choice(key, value, SCHEDULERS, where)
        elif key == "launcher":
            values[key] = _choice(key, value, LAUNCHERS, where)
        elif key == "container":
            values[key] = _choice(key, value, CONTAINERS, where)
        elif key == "pbs_flavor":
            values[key] = _choice(key, value, PBS_FLAVORS, where)
        elif key == "nv":
            values[key] = _bool(key, value, where)
        elif key in ("name", "partition", "queue", "account", "output", "error", "chdir", "mpi"):
            values[key] = _directive_value(key, value, where)
        elif key in ("container_args", "launcher_args", "overrides"):
            values[key] = _strings(key, value, where)
        elif key == "command":
            values[key] = _command(value, where)
        else:  # image, config, python
            values[key] = _string(key, value, where)
            if not values[key]:
                raise LaunchError(f"launch: {where}: {key} must not be empty")
    _tasks(values, merged)
    if "name" not in values and values.get("config"):
        # The job is named after the training config: runs/<stem> is also where jobs.train writes.
        values["name"] = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(values["config"]).stem) or "distkfac"
    return JobSpec(**values)


def _command(value: Any, where: str) -> str:
    """Shell text as given; a list is an argument vector, quoted word by word."""
    if isinstance(value, list | tuple):
        words = _strings("command", value, where)
        if not words:
            raise LaunchError(f"launch: {where}: command must not be empty")
        return shlex.join(words)
    text = _string("command", value, where).strip()
    if not text:
        raise LaunchError(f"launch: {where}: command must not be empty")
    return text


def _tasks(values: dict[str, Any], merged: Mapping[str, tuple[Any, str]]) -> None:
    """``ntasks`` (the total) with ``nodes`` gives ``tasks_per_node``; given all three, they must agree."""
    ntasks = values.pop("ntasks", None)
    if ntasks is None:
        return
    nodes = values.get("nodes", 1)
    where = merged["ntasks"][1]
    if "tasks_per_node" in values:
        if nodes * values["tasks_per_node"] != ntasks:
            raise LaunchError(
                f"launch: {where}: ntasks={ntasks} but nodes={nodes} x tasks_per_node={values['tasks_per_node']} "
                f"= {nodes * values['tasks_per_node']}: give two of them, or make them agree"
            )
        return
    if ntasks % nodes:
        raise LaunchError(
            f"launch: {where}: ntasks={ntasks} does not split evenly over nodes={nodes}: every node runs the same "
            "number of tasks (set tasks_per_node)"
        )
    values["tasks_per_node"] = ntasks // nodes
