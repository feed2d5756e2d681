"""Chart regions and membership."""

from .kmeans import kmeans
from .membership import ChartMembership

__all__ = ["ChartMembership", "kmeans"]
