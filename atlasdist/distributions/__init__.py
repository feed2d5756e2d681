"""Distributions on manifolds."""

from .atlas import AtlasFlowDistribution

__all__ = ["AtlasFlowDistribution"]
