"""Fisher spectrum and gradient-outlier diagnostics (torch only; data-parallel through a ``distkfac.comm`` one).

``per_example`` (gradient rows ``g_i``, chunked), ``rows`` (how the other modules read them), ``spectrum`` (top
eigenpairs of ``F = (1/N) J^T J``), ``projections`` (``a_i = v_1^T g_i`` and the trimmed eigenvalue), ``outliers``
(MAD counts), ``gather`` (global counts and the gather of floats), ``curvature_share`` (how much of K-FAC's step
curvature sets, and how much damping). See docs/kfac.md.
"""

from distkfac.diagnostics.curvature_share import CurvatureShare, curvature_shares, gathered_shares, overall_share
from distkfac.diagnostics.outliers import OutlierCounts, gradient_norms, mad_outliers, median
from distkfac.diagnostics.per_example import parameter_names, per_example_gradients
from distkfac.diagnostics.projections import (
    TrimmedEigenvalue,
    eigenvalue_matches_projections,
    mean_squared_projection,
    projections,
    trimmed_top_eigenvalue,
)
from distkfac.diagnostics.rows import Rows
from distkfac.diagnostics.spectrum import METHODS, Eigenpairs, choose_method, fisher_product, top_eigenpairs

__all__ = [
    "METHODS",
    "CurvatureShare",
    "Eigenpairs",
    "OutlierCounts",
    "Rows",
    "TrimmedEigenvalue",
    "choose_method",
    "curvature_shares",
    "eigenvalue_matches_projections",
    "fisher_product",
    "gathered_shares",
    "gradient_norms",
    "mad_outliers",
    "mean_squared_projection",
    "median",
    "overall_share",
    "parameter_names",
    "per_example_gradients",
    "projections",
    "top_eigenpairs",
    "trimmed_top_eigenvalue",
]
