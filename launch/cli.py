"""``python -m launch``: ``env`` (what this process detected), ``submit`` (job scripts for Slurm and PBS),
``status`` and ``cancel`` (the scheduler's own commands). Errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from launch.environment import LaunchError, detect
from launch.jobscript import render
from launch.jobspec import build_spec, load_job_table
from launch.submit import choose_scheduler, passthrough, submit

ERROR_STATUS = 2
COMMANDS = ("env", "submit", "status", "cancel")
USAGE = """usage: python -m launch {env,submit,status,cancel} ...

  env       print this process's rank, world size, local rank, master address and port, launcher, scheduler and
            job id as one line of JSON; --init also joins the other ranks and checks an allreduce
  submit    render a Slurm or PBS job script from a [job] table and flags, and submit it (--dry-run: print it)
  status    the scheduler's view of a job (scontrol show job / qstat -f)
  cancel    cancel a job (scancel / qdel)

python -m launch COMMAND --help says more; docs/launch.md has the details."""


def _env_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch env", description="Print what this process detected.")
    parser.add_argument("--init", action="store_true", help="also join the other ranks and allreduce rank+1")
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "gloo", "nccl", "horovod", "mpi", "single"], help="for --init"
    )
    return parser


def run_env(argv: Sequence[str]) -> int:
    args = _env_parser().parse_args(argv)
    environment = detect()
    report: dict[str, Any] = {**asdict(environment), "host": socket.gethostname()}
    if args.init:
        report.update(_allreduce(args.backend))
    # One line per process, written at once: the lines of several ranks sharing a terminal or file stay whole.
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    status = 0 if not args.init or report["allreduce_sum"] == report["allreduce_expected"] else 1
    if args.init:  # joined: leave the group the one clean way (a barrier, then no C++ teardown)
        from distkfac.comm import leave

        leave(status)
    return status


def _allreduce(backend: Any) -> dict[str, Any]:
    """Every rank contributes rank + 1; the sum is n (n + 1) / 2 when all n ranks took part."""
    import torch

    from launch.distributed import init_distributed

    context = init_distributed(backend)
    value = torch.tensor([float(context.rank + 1)], device=context.device)
    context.comm.allreduce_sum(value, "launch check").wait()
    size = context.world_size
    return {
        "backend": context.kind,
        "rendezvous": context.rendezvous,
        "allreduce_sum": round(float(value.item())),
        "allreduce_expected": size * (size + 1) // 2,
    }


def _submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch submit",
        description="Render a Slurm or PBS job script and submit it. Values come from the [job] table of the "
        "training config, then of --job FILE, then from these flags (later wins).",
        epilog="Status and cancel: the scheduler's commands (squeue, scontrol show job, scancel; qstat, qdel), or "
        "python -m launch status|cancel JOBID. Details and an example: docs/launch.md.",
    )
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="training config overrides")
    parser.add_argument("--config", metavar="FILE", help="training config (TOML); its [job] table is read too")
    parser.add_argument("--job", metavar="FILE", help="a TOML file with a [job] table")
    parser.add_argument("--scheduler", choices=["slurm", "pbs"], help="default: whichever of sbatch/qsub exists")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the job; exit with its exit status")
    parser.add_argument("--save-script", metavar="PATH", type=Path, help="keep the submitted script here")
    job = parser.add_argument_group("job (each also a [job] key, with _ for -)")
    for flag, metavar, text in [
        ("--name", "NAME", "job name (default: the config's file stem)"),
        ("--nodes", "N", "nodes (default 1)"),
        ("--tasks-per-node", "N", "processes per node (default 1)"),
        ("--ntasks", "N", "processes in all: with --nodes gives --tasks-per-node"),
        ("--gpus-per-node", "N", "GPUs per node (default 0)"),
        ("--cpus-per-task", "N", "CPU cores per process (default 1; also OMP_NUM_THREADS)"),
        ("--walltime", "TIME", "HH:MM:SS, D-HH:MM:SS or minutes (default 01:00:00)"),
        ("--partition", "NAME", "Slurm partition (PBS: queue, when --queue is not given)"),
        ("--queue", "NAME", "PBS queue (Slurm: partition, when --partition is not given)"),
        ("--account", "NAME", "account or project to charge"),
        ("--output", "PATH", "stdout file (scheduler patterns such as %%j allowed)"),
        ("--error", "PATH", "stderr file"),
        ("--chdir", "DIR", "working directory of the job (default: where you submit)"),
        ("--image", "IMAGE", "container image (a .sif for Apptainer, a name for podman): the command runs in it"),
        ("--container", "NAME", "apptainer (default), singularity or podman"),
        ("--launcher", "NAME", "srun, mpirun or none (default: srun for Slurm, mpirun for PBS)"),
        ("--mpi", "PLUGIN", "srun --mpi= plugin (default pmix)"),
        ("--array", "N|RANGE", "job array: a count N (tasks 0..N-1) or a range such as 0-7 or 0-15%%4"),
        ("--pbs-flavor", "NAME", "torque (nodes=..:ppn=.., -t; default) or pro (select=.., -J)"),
        ("--command", "TEXT", "shell command each task runs instead of the training command"),
        ("--python", "PATH", "interpreter of the training command (default python)"),
    ]:
        job.add_argument(flag, metavar=metavar, help=text)
    for flag, metavar, text in [
        ("--module", "NAME", "module to load (repeatable)"),
        ("--env", "NAME=VALUE", "variable to export (repeatable)"),
        ("--setup", "LINE", "shell line run before the command (repeatable)"),
        ("--directive", "TEXT", "extra #SBATCH/#PBS option (repeatable)"),
        ("--container-arg", "ARG", "extra argument of apptainer exec / podman run (repeatable)"),
        ("--launcher-arg", "ARG", "extra argument of srun/mpirun (repeatable; --launcher-arg=--flag)"),
    ]:
        job.add_argument(flag, action="append", default=[], metavar=metavar, help=text)
    job.add_argument(
        "--nv", action=argparse.BooleanOptionalAction, help="GPUs in the container: apptainer --nv (default: with GPUs)"
    )
    return parser


LIST_FLAGS = {
    "module": "modules",
    "env": "env",
    "setup": "setup",
    "directive": "directives",
    "container_arg": "container_args",
    "launcher_arg": "launcher_args",
}
SCALAR_FLAGS = [
    *("name", "nodes", "tasks_per_node", "ntasks", "gpus_per_node", "cpus_per_task", "walltime", "partition"),
    *("queue", "account", "output", "error", "chdir", "image", "container", "launcher", "mpi", "array"),
    *("pbs_flavor", "command", "python", "nv", "scheduler"),
]


def run_submit(argv: Sequence[str]) -> int:
    args = _submit_parser().parse_intermixed_args(argv)
    job_table = load_job_table(args.job) if args.job else {}
    config = args.config or (job_table["config"][0] if "config" in job_table else None)
    config_table: dict[str, Any] = {}
    if config is not None:
        if not Path(config).is_file():
            raise LaunchError(f"launch: the training config {config} does not exist")
        if Path(config).suffix == ".toml":
            config_table = load_job_table(config, required=False)
    flags: dict[str, Any] = {}
    for name in SCALAR_FLAGS:
        if getattr(args, name) is not None:
            flags[name] = (getattr(args, name), f"--{name.replace('_', '-')}")
    for name, key in LIST_FLAGS.items():
        if getattr(args, name):
            flags[key] = (getattr(args, name), f"--{name.replace('_', '-')}")
    if args.config:
        flags["config"] = (args.config, "--config")
    if args.overrides:
        flags["overrides"] = (args.overrides, "command line")
    spec = build_spec(config_table, job_table, flags)
    scheduler = choose_scheduler(spec.scheduler, args.dry_run)
    script = render(spec, scheduler)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    submitted = submit(spec, scheduler, script, wait=args.wait, save_script=args.save_script)
    return submitted.exit_status if submitted.exit_status is not None else 0


def run_passthrough(action: str, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m launch {action}")
    parser.add_argument("job_id")
    parser.add_argument("--scheduler", choices=["slurm", "pbs"], help="default: whichever is installed")
    args = parser.parse_args(argv)
    return passthrough(action, args.job_id, args.scheduler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else ERROR_STATUS
    command, rest = argv[0], argv[1:]
    try:
        if command == "env":
            return run_env(rest)
        if command == "submit":
            return run_submit(rest)
        return run_passthrough(command, rest)
    except LaunchError as error:
        print(str(error), file=sys.stderr)
        return ERROR_STATUS
