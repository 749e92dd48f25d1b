"""What every test that starts processes shares: the repository root, the interpreter, and the environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# One OpenMP thread per process: the tests start several processes on a 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# Open MPI refuses to run as root and to start more ranks than cores unless told (../shared/notes/hpc-stack.md).
MPI_ENV = {
    **ENV,
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def processes_mentioning(text: str) -> list[str]:
    """``PID COMMAND-LINE`` of every live process whose command line contains ``text`` (from ``ps``, as any user
    of the machine sees them; zombies, which hold nothing, are left out)."""
    import subprocess

    table = subprocess.run(["ps", "-eww", "-o", "pid=,stat=,args="], capture_output=True, text=True, check=True)
    rows = [line.split(None, 2) for line in table.stdout.splitlines()]
    return [f"{row[0]} {row[2]}" for row in rows if len(row) == 3 and text in row[2] and not row[1].startswith("Z")]


def wait_until_gone(text: str, timeout_s: float = 20.0) -> list[str]:
    """Waits up to ``timeout_s`` for every process mentioning ``text`` to end; returns those still running."""
    import time

    deadline = time.monotonic() + timeout_s
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
