"""Chart regions and membership."""

from .membership import ChartMembership

__all__ = ["ChartMembership"]
