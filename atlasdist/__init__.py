"""atlasdist: probability distributions on manifolds for PyTorch and Pyro."""

from . import charts, datasets, distributions, geometry, intrinsic_dimension, training, transforms
from .atlas import AtlasFlow
from .charts import ChartMembership
from .distributions import AtlasFlowDistribution
from .geometry import log_volume_ratio, manifold_log_volume_ratio, tangent_frame
from .intrinsic_dimension import IntrinsicDimension, estimate_intrinsic_dimension

__version__ = "0.1.0"

__all__ = [
    "AtlasFlow",
    "AtlasFlowDistribution",
    "estimate_intrinsic_dimension",
    "IntrinsicDimension",
    "intrinsic_dimension",
    "ChartMembership",
    "charts",
    "datasets",
    "distributions",
    "geometry",
    "training",
    "transforms",
    "log_volume_ratio",
    "manifold_log_volume_ratio",
    "tangent_frame",
]
