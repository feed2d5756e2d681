r"""Facts about the manifolds the library knows, in one place for the transforms and the
distributions alike: for the unit sphere :math:`S^{n-1}` (:mod:`atlasdist.manifolds.sphere`)
and the probability simplex :math:`\Delta^{n-1}` (:mod:`atlasdist.manifolds.simplex`), the
projection onto the manifold, the on-manifold tolerance, constraint and check, the volume
w.r.t. the measure of the library's densities and, for the simplex, the factor between its
two measures.
"""

from . import simplex, sphere
from .simplex import *  # noqa: F403  (the names are the submodules' __all__)
from .sphere import *  # noqa: F403

__all__ = [*sphere.__all__, *simplex.__all__]
