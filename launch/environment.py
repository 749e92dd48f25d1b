"""Who am I: rank, world size, local rank and the master's address, read from the launcher's environment variables.

Checked in this order (the first launcher whose variables are present wins):

| launcher | rank / size / local rank | master address |
|---|---|---|
| torchrun | RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE | MASTER_ADDR, MASTER_PORT |
| Open MPI mpirun | OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE | see below |
| srun --mpi=pmix | PMIX_RANK, with SLURM_STEP_NUM_TASKS / SLURM_LOCALID (OMPI_* is not set there) | see below |
| MPICH / Intel MPI (PMI) | PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS | see below |
| srun | SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE | see below |
| none | one process | 127.0.0.1 |

The master address, when the launcher does not give one: MASTER_ADDR if set; else the first host of
SLURM_STEP_NODELIST / SLURM_JOB_NODELIST (Slurm's compressed list, e.g. ``node[03-05,9]``); else the first line of
PBS_NODEFILE; else 127.0.0.1 when every rank is on this node; else empty: unknown until rank 0 sends its address
through MPI (``launch.rendezvous``, which also picks a free port under an MPI launcher). The port is
MASTER_PORT if set, else derived from the job id and the launch within it (Slurm's step id, Open MPI's job id), so
that two jobs or two launches sharing a node do not collide, in 20000-31999 (below Linux's ephemeral ports); else 29500.

Only SLURM_STEP_* counts as a Slurm launch: a batch script itself (no ``srun``) is one process, whatever
SLURM_NTASKS says.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The environment does not say enough to start a distributed run, or says contradictory things."""


@dataclass(frozen=True)
class Environment:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | openmpi | pmix | pmi | slurm | single
    scheduler: str | None  # slurm | pbs | None
    job_id: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def expand_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[07-09,12],cpu1`` gives ``gpu07``, ``r[1-2]-n[01-04]`` ``r1-n01``."""
    entry = re.match(r"(?:[^,\[\]]|\[[^\[\]]*\])*", nodelist.strip())
    text = entry.group(0) if entry else ""
    rest = nodelist.strip()[len(text) :]
    if not text or (rest and not rest.startswith(",")):
        raise LaunchError(f"launch: cannot read the Slurm node list {nodelist!r}")
    host = re.sub(r"\[([^\]]*)\]", lambda ranges: ranges.group(1).split(",")[0].split("-")[0], text)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"launch: cannot read the Slurm node list {nodelist!r}")
    return host


def _int(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise LaunchError(f"launch: {name} is not set although other variables of its launcher are: inconsistent")
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"launch: {name}={value!r} is not an integer") from None


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE looks like ``4(x2),3``: ``[4, 4, 3]``, one count per node of the step."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise LaunchError(f"launch: cannot read the Slurm tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _slurm_local_size(env: Mapping[str, str], size: int) -> int:
    """Tasks of this step on this node: this node's entry of SLURM_STEP_TASKS_PER_NODE (SLURM_NODEID picks it)."""
    counts = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(size)))
    if sum(counts) != size:
        raise LaunchError(
            f"launch: SLURM_STEP_TASKS_PER_NODE={env.get('SLURM_STEP_TASKS_PER_NODE')!r} adds up to {sum(counts)} "
            f"tasks, not the {size} of SLURM_STEP_NUM_TASKS: inconsistent"
        )
    node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if not 0 <= node < len(counts):
        raise LaunchError(f"launch: SLURM_NODEID={node} but the step has {len(counts)} nodes: inconsistent")
    return counts[node]


def _scheduler(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    if "SLURM_JOB_ID" in env:
        return "slurm", env["SLURM_JOB_ID"]
    if "PBS_JOBID" in env:
        return "pbs", env["PBS_JOBID"]
    return None, None


def _launch_id(env: Mapping[str, str], launcher: str, job_id: str | None) -> str | None:
    """What tells this launch from others on the same node: the job id, and the step (Slurm) or mpirun's job id."""
    within = {"openmpi": "OMPI_MCA_ess_base_jobid", "pmix": "SLURM_STEP_ID", "slurm": "SLURM_STEP_ID"}.get(launcher)
    parts = [part for part in (job_id, env.get(within) if within else None) if part]
    return ".".join(parts) or None


def _master(env: Mapping[str, str], all_local: bool, launch_id: str | None) -> tuple[str, int]:
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if port is None:
        port = 20000 + zlib.crc32(launch_id.encode()) % 12000 if launch_id else DEFAULT_PORT
    if not 0 < port < 65536:
        raise LaunchError(f"launch: MASTER_PORT={port} is not a TCP port")
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], port
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        return expand_first_host(nodelist), port
    nodefile = env.get("PBS_NODEFILE")
    if nodefile:
        try:
            first = Path(nodefile).read_text().split()
        except OSError as error:
            raise LaunchError(f"launch: PBS_NODEFILE={nodefile} cannot be read ({error})") from None
        if first:
            return first[0], port
    if all_local:
        return "127.0.0.1", port
    return "", port  # unknown here: rank 0 sends its address through MPI (launch.rendezvous), or it is an error there


def detect(env: Mapping[str, str] | None = None) -> Environment:
    """Read this process's place in the run from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    scheduler, job_id = _scheduler(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env else "env"
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        # Launchers other than torchrun may give LOCAL_RANK without LOCAL_WORLD_SIZE: this rank's count is a floor.
        local_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else local_rank + 1
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "openmpi"
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "PMIX_RANK" in env and "SLURM_STEP_NUM_TASKS" in env:
        launcher = "pmix"
        rank, size = _int(env, "PMIX_RANK"), _int(env, "SLURM_STEP_NUM_TASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_size = _slurm_local_size(env, size)
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        launcher = "pmi"
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        local_size = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else size
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        launcher = "slurm"
        rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_size = _slurm_local_size(env, size)
    else:
        launcher, rank, size, local_rank, local_size = "single", 0, 1, 0, 1
    if not (0 <= rank < size) or not (0 <= local_rank < local_size <= size):
        raise LaunchError(
            f"launch: {launcher} says rank {rank} of {size}, local rank {local_rank} of {local_size}: inconsistent"
        )
    addr, port = _master(env, all_local=local_size >= size, launch_id=_launch_id(env, launcher, job_id))
    return Environment(rank, size, local_rank, local_size, addr, port, launcher, scheduler, job_id)
