"""atlasdist: probability distributions on manifolds for PyTorch and Pyro."""

from . import geometry, transforms
from .geometry import log_volume_ratio, manifold_log_volume_ratio, tangent_frame

__version__ = "0.1.0"

__all__ = [
    "geometry",
    "transforms",
    "log_volume_ratio",
    "manifold_log_volume_ratio",
    "tangent_frame",
]
