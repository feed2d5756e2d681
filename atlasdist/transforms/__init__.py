"""Injective, conformal and chart-conditioned transforms.

The public names are those of the submodules (their ``__all__``), plus the facts about the
sphere and the simplex the manifold flows use (:mod:`atlasdist.manifolds`).
"""

from ..manifolds import (
    helmert_basis,
    simplex_projection,
    sphere_projection,
    sphere_tolerance,
    unit_sphere,
)
from . import (
    cache,
    conditional,
    conformal,
    external,
    indexed,
    injective,
    manifold,
    product,
    simplex,
    sphere,
    spline,
)
from .cache import *  # noqa: F403  (the names are the submodules' __all__)
from .conditional import *  # noqa: F403
from .conformal import *  # noqa: F403
from .external import *  # noqa: F403
from .indexed import *  # noqa: F403
from .injective import *  # noqa: F403
from .manifold import *  # noqa: F403
from .product import *  # noqa: F403
from .simplex import *  # noqa: F403
from .sphere import *  # noqa: F403
from .spline import *  # noqa: F403

__all__ = [
    *injective.__all__,
    *conformal.__all__,
    *indexed.__all__,
    *product.__all__,
    *sphere.__all__,
    *simplex.__all__,
    *manifold.__all__,
    *spline.__all__,
    *conditional.__all__,
    *cache.__all__,
    *external.__all__,
    "unit_sphere",
    "sphere_tolerance",
    "helmert_basis",
    "sphere_projection",
    "simplex_projection",
]
