"""Job scripts from a :class:`~launch.jobspec.JobSpec`: ``#SBATCH`` for Slurm, ``#PBS`` for PBS (Torque or Pro).

A script is: the scheduler's directives, ``set -eo pipefail``, ``module load`` lines, ``export`` lines, the user's
setup lines, then one command started by the launcher (``srun --mpi=pmix``, ``mpirun`` or nothing), optionally
inside an Apptainer/Singularity or podman image. Every word this module makes up is quoted with ``shlex.quote``;
the user's ``command`` and ``setup`` lines are shell text and go in as written.
"""

from __future__ import annotations

import re
import shlex

from launch.environment import LaunchError
from launch.jobspec import JobSpec

HEADER = "# Rendered by `python -m launch submit` (distkfac); see docs/launch.md."
ARRAY_INDEX = 'export LAUNCH_ARRAY_INDEX="${SLURM_ARRAY_TASK_ID:-${PBS_ARRAYID:-${PBS_ARRAY_INDEX:-0}}}"'
ROOT_MPI = """\
if [ "$(id -u)" -eq 0 ]; then
    # Open MPI refuses to start as root (containers, test clusters) unless told twice.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi"""
# Variables by which a task inside podman learns its rank, size and rendezvous (podman expands a trailing *).
PODMAN_ENV_PREFIXES = ("SLURM_*", "PMIX_*", "PMI_*", "OMPI_*", "PBS_*", "MASTER_*", "LAUNCH_*")
PBS_NODEFILE = """\
if [ -z "${PBS_NODEFILE:-}" ] && command -v generate_pbs_nodefile >/dev/null 2>&1; then
    # Slurm's PBS wrappers set no PBS_NODEFILE: make one (one line per slot, as PBS does).
    PBS_NODEFILE=$(generate_pbs_nodefile)
    export PBS_NODEFILE
fi"""


def launcher_of(spec: JobSpec, scheduler: str) -> str:
    """The launcher the job uses: as asked, else ``srun`` under Slurm and ``mpirun`` under PBS."""
    if spec.launcher is not None:
        return spec.launcher
    return "srun" if scheduler == "slurm" else "mpirun"


def user_command(spec: JobSpec) -> str:
    """The command every task runs: ``command`` as given, else ``python -m jobs.train --config CONFIG [overrides]``."""
    if spec.command is not None:
        if spec.overrides:
            raise LaunchError(
                "launch: key=value overrides go to the training command, but --command replaces it: "
                "put them in the command instead"
            )
        return spec.command
    if spec.config is None:
        raise LaunchError(
            "launch: nothing to run: give the training config (--config FILE) or a command (--command '...')"
        )
    return shlex.join([spec.python, "-m", "jobs.train", "--config", spec.config, *spec.overrides])


def _launch_line(spec: JobSpec, scheduler: str) -> str:
    launcher = launcher_of(spec, scheduler)
    words: list[str] = []
    if launcher == "srun":
        words = [
            "srun",
            f"--mpi={spec.mpi}",
            f"--nodes={spec.nodes}",
            f"--ntasks-per-node={spec.tasks_per_node}",
            # Since Slurm 22.05 srun does not take --cpus-per-task from the allocation: say it again.
            f"--cpus-per-task={spec.cpus_per_task}",
        ]
    elif launcher == "mpirun":
        mapping = f"ppr:{spec.tasks_per_node}:node" + (f":PE={spec.cpus_per_task}" if spec.cpus_per_task > 1 else "")
        words = ["mpirun", "-np", str(spec.ntasks), "--map-by", mapping]
        if scheduler == "pbs":
            words += ["--hostfile", "$PBS_NODEFILE"]
        for name in ["OMP_NUM_THREADS", *(name for name, _ in spec.env if name != "OMP_NUM_THREADS")]:
            words += ["-x", name]  # Open MPI forwards only the variables named with -x to other nodes
    text = " ".join(shlex.quote(word) if word != "$PBS_NODEFILE" else '"$PBS_NODEFILE"' for word in words)
    text = " ".join(filter(None, [text, shlex.join(spec.launcher_args)]))
    if spec.image is not None:
        text = " ".join(filter(None, [text, container_prefix(spec)]))
    return " ".join(filter(None, [text, user_command(spec)]))


def container_prefix(spec: JobSpec) -> str:
    """The words that put each task's command inside ``spec.image`` (shell text; ``$PWD`` is left to the job's shell).

    Apptainer/Singularity pass the environment, the working directory and the host's network through by
    themselves. podman passes nothing: the task runs with the host's network and IPC (NCCL and gloo need both), the
    working directory mounted at the same path, and the variables that say who it is (the launcher's and
    scheduler's, by prefix) and those the job exports; Open MPI's messages go over TCP, as its shared-memory
    transport does not cross containers. GPUs go in by CDI (``nvidia-ctk cdi generate``).
    """
    assert spec.image is not None
    nv = spec.nv if spec.nv is not None else spec.gpus_per_node > 0
    if spec.container != "podman":
        return shlex.join([spec.container, "exec", *(["--nv"] if nv else []), *spec.container_args, spec.image])
    names = [*PODMAN_ENV_PREFIXES, "OMP_NUM_THREADS", *(name for name, _ in spec.env if name != "OMP_NUM_THREADS")]
    words = ["podman", "run", "--rm", "--network=host", "--ipc=host", *(f"--env={name}" for name in names)]
    # Open MPI's shared-memory transport crashes between containers (each has its own /tmp and PID namespace; seen
    # with podman here): its messages (the MPI rendezvous, comm="mpi") go over TCP on the host's network instead.
    words += ["--env=OMPI_MCA_btl=self,tcp"]
    words += ["--device=nvidia.com/gpu=all"] if nv else []
    here = '--volume="$PWD:$PWD" --workdir="$PWD"'
    return " ".join([shlex.join(words), here, shlex.join([*spec.container_args, spec.image])])


def _body(spec: JobSpec, scheduler: str) -> list[str]:
    lines = ["set -eo pipefail", ""]
    if scheduler == "pbs":
        # PBS starts jobs in the home directory; Slurm (and Slurm's qsub) in the submission directory.
        lines.append(f"cd {shlex.quote(spec.chdir)}" if spec.chdir else 'cd "${PBS_O_WORKDIR:-$PWD}"')
    lines += [f"module load {shlex.quote(module)}" for module in spec.modules]
    env = dict(spec.env)
    env.setdefault("OMP_NUM_THREADS", str(spec.cpus_per_task))
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    if spec.array is not None:
        lines.append(ARRAY_INDEX)
    lines += list(spec.setup)
    launcher = launcher_of(spec, scheduler)
    if launcher == "mpirun":
        lines.append(ROOT_MPI)
        if scheduler == "pbs":
            lines.append(PBS_NODEFILE)
    lines += ["", _launch_line(spec, scheduler), ""]
    return lines


def _shebang(spec: JobSpec) -> str:
    # A login shell defines `module` on clusters where only /etc/profile.d sets it up.
    return "#!/bin/bash -l" if spec.modules else "#!/bin/bash"


def render_slurm(spec: JobSpec) -> str:
    directives = [
        f"--job-name={spec.name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.tasks_per_node}",
        f"--cpus-per-task={spec.cpus_per_task}",
    ]
    if spec.gpus_per_node:
        directives.append(f"--gpus-per-node={spec.gpus_per_node}")
    directives.append(f"--time={spec.walltime}")
    optional = {
        "partition": spec.partition or spec.queue,
        "account": spec.account,
        "output": spec.output,
        "error": spec.error,
        "array": spec.array,
        "chdir": spec.chdir,
    }
    directives += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    directives += [d if d.startswith("-") else f"--{d}" for d in spec.directives]
    lines = [_shebang(spec), HEADER, *(f"#SBATCH {d}" for d in directives), *_body(spec, "slurm")]
    return "\n".join(lines)


def _pbs_array(spec: JobSpec) -> str | None:
    if spec.array is None:
        return None
    if spec.pbs_flavor == "pro":
        match = re.fullmatch(r"(\d+)-(\d+)(:\d+)?(%\d+)?", spec.array)
        if not match or int(match.group(1)) >= int(match.group(2)):
            raise LaunchError(
                f"launch: PBS Pro arrays are one range of at least two indices (e.g. 0-7, 0-15:2, 0-15%4), "
                f"not {spec.array!r}"
            )
        return f"-J {spec.array}"
    if ":" in spec.array:
        raise LaunchError(f"launch: Torque arrays take no step (:N): {spec.array!r}; list the indices instead")
    return f"-t {spec.array}"


def render_pbs(spec: JobSpec) -> str:
    cpus = spec.tasks_per_node * spec.cpus_per_task
    if spec.pbs_flavor == "pro":
        select = f"select={spec.nodes}:ncpus={cpus}:mpiprocs={spec.tasks_per_node}"
        resources = select + (f":ngpus={spec.gpus_per_node}" if spec.gpus_per_node else "")
    else:
        resources = f"nodes={spec.nodes}:ppn={cpus}" + (f":gpus={spec.gpus_per_node}" if spec.gpus_per_node else "")
    directives = [f"-N {spec.name}", f"-l {resources}", f"-l walltime={spec.walltime}"]
    queue = spec.queue or spec.partition
    directives += [f"-q {queue}"] if queue else []
    directives += [f"-A {spec.account}"] if spec.account else []
    directives += [f"-o {spec.output}"] if spec.output else []
    directives += [f"-e {spec.error}"] if spec.error else []
    array = _pbs_array(spec)
    directives += [array] if array else []
    directives += list(spec.directives)
    lines = [_shebang(spec), HEADER, *(f"#PBS {d}" for d in directives), *_body(spec, "pbs")]
    return "\n".join(lines)


def render(spec: JobSpec, scheduler: str) -> str:
    """The job script for ``scheduler`` (``slurm`` or ``pbs``)."""
    if scheduler == "slurm":
        return render_slurm(spec)
    if scheduler == "pbs":
        return render_pbs(spec)
    raise LaunchError(f"launch: scheduler must be slurm or pbs, got {scheduler!r}")
