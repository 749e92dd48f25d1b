"""A run's place among the ranks (:class:`Context`) and how it joins them (:func:`start`).

Every collective goes through the context's communicator (``distkfac.comm``: torch.distributed, Horovod, MPI or
one process), which the training loop and K-FAC share; the loop's collectives are ``distkfac.comm.ops``. Starting the
ranks is ``launch.distributed``'s job (:func:`start` imports it lazily and falls back to one process when it is not
importable and no launcher started several); leaving is ``distkfac.comm.leave``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from distkfac.comm import Communicator, resolve_communicator

__all__ = ["Context", "SingleContext", "start"]

# Variables by which a launcher says that it started several processes (see launch/environment.py).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


class Context(Protocol):
    """What ``launch.distributed.init_distributed`` returns."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def local_rank(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def kind(self) -> str: ...  # single | torch | horovod | mpi
    @property
    def comm(self) -> Communicator: ...  # tensors handed to it must be on ``device`` (NCCL)


@dataclass(frozen=True)
class SingleContext:
    """One process (hpo_worker's and the study's in-process runs), or a hand-made context in tests.

    Its communicator follows ``kind`` unless given: a :class:`~distkfac.comm.SingleProcessCommunicator` for
    ``"single"``; the initialised torch.distributed or Horovod for ``"torch"`` or ``"horovod"``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    kind: str = "single"
    comm: Communicator = None  # type: ignore[assignment]  # filled from kind after __init__

    def __post_init__(self) -> None:
        if self.comm is None:
            object.__setattr__(self, "comm", resolve_communicator(self.kind))


def start(backend: str) -> Context:
    """Joins the other ranks through ``launch.distributed`` (one process without it, if that is all there is)."""
    try:
        from launch.distributed import init_distributed
    except ImportError as exc:
        sizes = {name: os.environ[name] for name in _WORLD_SIZE_VARS if os.environ.get(name, "1") != "1"}
        if sizes or backend not in ("auto", "single"):
            raise RuntimeError(
                f"a distributed run ({sizes or 'run.backend = ' + backend}) needs the launch package, which cannot "
                f"be imported ({exc}): run from the repository root (python -m jobs.train ...)"
            ) from exc
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return SingleContext(device=device)
    return init_distributed(backend=backend)  # type: ignore[arg-type]
