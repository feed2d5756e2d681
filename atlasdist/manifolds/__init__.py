r"""Facts about the manifolds the library knows, in one place for the transforms and the
distributions alike: for the unit sphere :math:`S^{n-1}` (:mod:`atlasdist.manifolds.sphere`)
and the probability simplex :math:`\Delta^{n-1}` (:mod:`atlasdist.manifolds.simplex`), the
projection onto the manifold, the on-manifold tolerance, constraint and check, the volume
w.r.t. the measure of the library's densities and, for the simplex, the factor between its
two measures.
"""

from .simplex import (
    SIMPLEX_TOLERANCE,
    check_on_simplex,
    helmert_basis,
    log_simplex_volume,
    simplex_hausdorff_log_factor,
    simplex_projection,
    unit_simplex,
)
from .sphere import (
    check_on_sphere,
    log_sphere_area,
    sphere_projection,
    sphere_tolerance,
    unit_sphere,
)

__all__ = [
    "sphere_projection",
    "sphere_tolerance",
    "unit_sphere",
    "check_on_sphere",
    "log_sphere_area",
    "simplex_projection",
    "helmert_basis",
    "SIMPLEX_TOLERANCE",
    "unit_simplex",
    "check_on_simplex",
    "simplex_hausdorff_log_factor",
    "log_simplex_volume",
]
