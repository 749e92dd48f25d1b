"""distkfac: data-parallel K-FAC for PyTorch.

The package is laid out by concern: ``layers`` (per-layer maths), ``methods`` (eigen and inverse decompositions),
``assignment`` (which rank does what), ``exchange`` (what travels when), ``comm`` (how it travels: torch.distributed,
Horovod, or nothing), ``factors`` (the names A and G, and the structures a factor can have), ``settings`` (the
constructor's arguments, checked), ``damping`` (adaptive Levenberg-Marquardt damping), ``preconditioner``
(orchestration only).
"""

from distkfac.assignment import STRATEGIES
from distkfac.comm import CommunicationError, Communicator, SingleProcessCommunicator
from distkfac.damping import LevenbergMarquardt
from distkfac.layers import CONV_FACTORS, G_SCALES, WEIGHT_SHARINGS
from distkfac.methods import DAMPING_FORMS, METHODS, DecompositionError
from distkfac.preconditioner import KFACPreconditioner
from distkfac.settings import FACTOR_REDUCTIONS, FISHER_TYPES, KFACSettings

__all__ = [
    "CONV_FACTORS",
    "DAMPING_FORMS",
    "FACTOR_REDUCTIONS",
    "FISHER_TYPES",
    "G_SCALES",
    "METHODS",
    "STRATEGIES",
    "WEIGHT_SHARINGS",
    "CommunicationError",
    "Communicator",
    "DecompositionError",
    "KFACPreconditioner",
    "KFACSettings",
    "LevenbergMarquardt",
    "SingleProcessCommunicator",
]
__version__ = "0.1.0"
