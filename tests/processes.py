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
