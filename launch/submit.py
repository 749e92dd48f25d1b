"""Hand a rendered job script to the scheduler (``sbatch`` or ``qsub``), optionally wait for it, and the thin
``status`` / ``cancel`` passthroughs.

Waiting: Slurm's own ``sbatch --wait`` (its exit status is the job's). PBS's ``qsub`` has no portable equivalent,
so the job is polled: with ``scontrol show job`` when the job is known to Slurm (Slurm's PBS wrappers), else with
``qstat -f`` (``qstat -f -x`` on PBS Pro, which drops finished jobs from plain ``qstat``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from launch.environment import LaunchError
from launch.jobspec import JobSpec

SUBMIT_COMMAND = {"slurm": "sbatch", "pbs": "qsub"}
_MISSING_HINT = "run on the cluster's login node or load the {what} module; use --dry-run to see the script"
FINAL_SLURM_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}
)
POLL_FIRST, POLL_GROWTH, POLL_MAX = 1.0, 1.5, 30.0


def installed_scheduler() -> str | None:
    """``slurm`` when sbatch is on PATH, else ``pbs`` when qsub is, else None (Slurm first: its PBS wrappers
    install a qsub too)."""
    for scheduler, command in SUBMIT_COMMAND.items():
        if shutil.which(command):
            return scheduler
    return None


def choose_scheduler(asked: str | None, dry_run: bool) -> str:
    """The scheduler to render for and submit to; a clear error when its submit command is missing."""
    if asked is None:
        found = installed_scheduler()
        if found is not None:
            return found
        if dry_run:
            return "slurm"
        raise LaunchError(
            "launch: neither sbatch (Slurm) nor qsub (PBS) found on PATH: "
            + _MISSING_HINT.format(what="scheduler's")
            + ", and --scheduler slurm|pbs to pick one"
        )
    if not dry_run and shutil.which(SUBMIT_COMMAND[asked]) is None:
        what = "Slurm" if asked == "slurm" else "PBS"
        raise LaunchError(f"launch: {SUBMIT_COMMAND[asked]} not found on PATH: " + _MISSING_HINT.format(what=what))
    return asked


def submit_argv(spec: JobSpec, scheduler: str, script: Path, wait: bool) -> list[str]:
    """The submission command. qsub also gets -N/-o/-e on its command line: Slurm's qsub ignores them in the script
    (real PBS takes either)."""
    if scheduler == "slurm":
        return ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]
    argv = ["qsub", "-N", spec.name]
    argv += ["-o", spec.output] if spec.output else []
    argv += ["-e", spec.error] if spec.error else []
    return [*argv, str(script)]


@dataclass(frozen=True)
class Submitted:
    job_id: str
    exit_status: int | None  # None when not waited for


def submit(
    spec: JobSpec,
    scheduler: str,
    script_text: str,
    *,
    wait: bool = False,
    save_script: Path | None = None,
    out: TextIO = sys.stdout,
) -> Submitted:
    """Write the script (to ``save_script`` or a temporary file), submit it, print the job id on ``out``, and with
    ``wait`` wait for the job and return its exit status."""
    _make_log_dirs(spec)
    with tempfile.TemporaryDirectory(prefix="launch-") as tmp:
        suffix = ".sbatch" if scheduler == "slurm" else ".pbs"
        script = save_script if save_script is not None else Path(tmp) / f"{spec.name}{suffix}"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(script_text)
        script.chmod(0o755)
        argv = submit_argv(spec, scheduler, script, wait)
        if scheduler == "slurm":
            return _sbatch(argv, out)
        job_id = _qsub(argv)
    print(job_id, file=out, flush=True)
    if not wait:
        return Submitted(job_id, None)
    return Submitted(job_id, wait_for_job(job_id, spec.pbs_flavor))


def _make_log_dirs(spec: JobSpec) -> None:
    """Schedulers do not create the directories of --output/--error (the job then fails without a word): make them,
    relative to the job's working directory, unless a directory part holds a scheduler pattern such as %u."""
    for path in (spec.output, spec.error):
        if path is None:
            continue
        parent = Path(spec.chdir or ".") / Path(path).parent
        if "%" not in str(parent) and "$" not in str(parent):
            parent.mkdir(parents=True, exist_ok=True)


def _sbatch(argv: list[str], out: TextIO) -> Submitted:
    """sbatch --parsable prints ``ID[;cluster]`` at once; with --wait it then waits and exits with the job's status."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    error_lines: list[str] = []
    # sbatch's messages are passed on as they come (with --wait it may run for the whole job) and kept for the check.
    relay = threading.Thread(target=_relay_lines, args=(process.stderr, error_lines), daemon=True)
    relay.start()
    first = process.stdout.readline().strip()
    job_id = first.split(";")[0]
    if job_id:
        print(job_id, file=out, flush=True)
    rest = process.stdout.read()
    status = process.wait()
    relay.join()
    errors = "".join(error_lines)
    if rest.strip():
        print(rest.rstrip(), file=sys.stderr)
    if not job_id:
        raise LaunchError(f"launch: sbatch failed (exit status {status}); its message is above")
    if "no longer found and exit code not found" in errors:
        # sbatch --wait then exits 0 whatever the job did: the controller purged the finished job (MinJobAge)
        # between two of its polls. Success must not be reported for a status nobody read.
        raise LaunchError(
            f"launch: Slurm forgot job {job_id} before sbatch --wait read its exit status (the controller keeps a "
            "finished job MinJobAge seconds; sbatch polls every 2 s or more): its status is unknown; read the job's "
            "output, and raise MinJobAge in slurm.conf to at least twice sbatch's poll interval"
        )
    waited = "--wait" in argv
    return Submitted(job_id, status if waited else None)


def _relay_lines(stream: TextIO, kept: list[str]) -> None:
    for line in stream:
        kept.append(line)
        print(line, end="", file=sys.stderr, flush=True)


def _qsub(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        message = (result.stderr + result.stdout).strip()
        raise LaunchError(f"launch: qsub failed (exit status {result.returncode}): {message}")
    if result.stderr.strip():
        print(result.stderr.rstrip(), file=sys.stderr)
    return lines[-1]


def _exit_from_signal_pair(text: str) -> int:
    """Slurm's ``ExitCode=3:0`` (status:signal) as a shell would report it."""
    status, _, signal = text.partition(":")
    return 128 + int(signal) if signal and int(signal) else int(status)


def slurm_job_state(job_id: str) -> tuple[bool, int] | None:
    """``(finished, exit status)`` from ``scontrol show job`` (all tasks of an array), or None when Slurm does not
    know the job."""
    if shutil.which("scontrol") is None:
        return None
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    records = [line for line in result.stdout.splitlines() if line.startswith("JobId=")]
    if result.returncode != 0 or not records:
        return None
    finished, status = True, 0
    for record in records:
        state = re.search(r"\bJobState=(\S+)", record)
        code = re.search(r"\bExitCode=(\d+:\d+)", record)
        name = state.group(1) if state else "UNKNOWN"
        if name not in FINAL_SLURM_STATES:
            finished = False
            continue
        task_status = _exit_from_signal_pair(code.group(1)) if code else 1
        if name != "COMPLETED" and task_status == 0:
            task_status = 1  # cancelled or failed without a status: still a failure
        status = max(status, task_status)
    return finished, status


def pbs_job_state(job_id: str, flavor: str) -> tuple[bool, int | None] | None:
    """``(finished, exit status or None)`` from ``qstat -f``, or None when qstat does not know the job."""
    argv = ["qstat", "-f", *(["-x"] if flavor == "pro" else []), job_id]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    state = re.search(r"^\s*job_state\s*=\s*(\S+)", result.stdout, re.MULTILINE | re.IGNORECASE)
    code = re.search(r"^\s*exit_status\s*=\s*(-?\d+)", result.stdout, re.MULTILINE | re.IGNORECASE)
    if state is None:
        return None
    if state.group(1).upper() not in ("C", "F"):
        return False, None
    if code is None:
        return True, None
    value = int(code.group(1))
    # PBS Pro reports 256 + N for a job killed by signal N; Torque uses negative values for its own failures.
    return True, value if 0 <= value < 256 else (128 + value - 256 if value > 256 else 1)


def _slurm_min_job_age() -> float:
    """Seconds Slurm keeps a finished job visible (MinJobAge): polls must come at least twice as often."""
    result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    match = re.search(r"^MinJobAge\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return float(match.group(1)) if match else 300.0


def wait_for_job(job_id: str, flavor: str = "torque", poll: float = POLL_FIRST) -> int:
    """Poll until the job has finished; its exit status (the highest of an array's tasks)."""
    delay, cap = poll, POLL_MAX
    while True:
        slurm = slurm_job_state(job_id)
        if slurm is not None:
            if slurm[0]:
                return slurm[1]
            if cap == POLL_MAX:
                cap = max(0.5, min(POLL_MAX, _slurm_min_job_age() / 2))
        else:
            pbs = pbs_job_state(job_id, flavor)
            if pbs is None:
                raise LaunchError(
                    f"launch: the scheduler no longer knows job {job_id}, so its exit status is unknown "
                    "(see its output file)"
                )
            if pbs[0]:
                if pbs[1] is None:
                    print(f"launch: job {job_id} finished; the scheduler reports no exit status", file=sys.stderr)
                    return 0
                return pbs[1]
        time.sleep(min(delay, cap))
        delay = min(delay * POLL_GROWTH, cap)


def passthrough(action: str, job_id: str, scheduler: str | None) -> int:
    """``status``/``cancel``: run the scheduler's own command (scontrol show job / scancel, qstat -f / qdel)."""
    if scheduler is None:
        scheduler = "slurm" if shutil.which("scontrol") else "pbs" if shutil.which("qstat") else None
    if scheduler is None:
        raise LaunchError(
            "launch: neither scontrol (Slurm) nor qstat (PBS) found on PATH: run on the cluster's login node or "
            "load the scheduler's module"
        )
    argv = {
        ("status", "slurm"): ["scontrol", "show", "job", job_id],
        ("cancel", "slurm"): ["scancel", job_id],
        ("status", "pbs"): ["qstat", "-f", job_id],
        ("cancel", "pbs"): ["qdel", job_id],
    }[(action, scheduler)]
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"launch: {argv[0]} not found on PATH: run on the cluster's login node")
    return subprocess.run(argv).returncode
