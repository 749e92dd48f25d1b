"""distkfac: data-parallel K-FAC for PyTorch.

The package is laid out by concern: ``layers`` (per-layer maths), ``methods`` (eigen and inverse decompositions),
``assignment`` (which rank does what), ``exchange`` (what travels when), ``comm`` (how it travels: torch.distributed,
Horovod, or nothing), ``preconditioner`` (orchestration only).
"""

from distkfac.comm import CommunicationError, Communicator, SingleProcessCommunicator
from distkfac.methods import DecompositionError
from distkfac.preconditioner import KFACPreconditioner

__all__ = [
    "CommunicationError",
    "Communicator",
    "DecompositionError",
    "KFACPreconditioner",
    "SingleProcessCommunicator",
]
__version__ = "0.1.0"
