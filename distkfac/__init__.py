"""distkfac: data-parallel K-FAC for PyTorch.

The package is laid out by concern: ``layers`` (per-layer maths), ``methods`` (eigen and inverse decompositions),
``comm`` (how factors, decompositions and gradients travel), ``preconditioner`` (orchestration only).
"""

from distkfac.comm import Communicator, SingleProcessCommunicator
from distkfac.methods import DecompositionError
from distkfac.preconditioner import KFACPreconditioner

__all__ = ["Communicator", "DecompositionError", "KFACPreconditioner", "SingleProcessCommunicator"]
__version__ = "0.1.0"
