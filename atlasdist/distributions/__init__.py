"""Distributions on manifolds."""

from ..manifolds import log_sphere_area, simplex_hausdorff_log_factor
from .atlas import AtlasFlowDistribution
from .free_form import (
    FreeFormEmbedding,
    FreeFormInjectiveDistribution,
    FreeFormInjectiveFlow,
    decoder_log_volume,
)
from .manifold_prior import (
    ManifoldPrior,
    ManifoldPriorFlow,
    largest_gap_dimension,
    spread_negative_log_likelihood,
)
from .simplex import SimplexFlow, SimplexFlowDistribution
from .sphere import SphereFlow, SphereFlowDistribution, UniformSphere

__all__ = [
    "AtlasFlowDistribution",
    "FreeFormInjectiveFlow",
    "FreeFormInjectiveDistribution",
    "FreeFormEmbedding",
    "decoder_log_volume",
    "ManifoldPrior",
    "ManifoldPriorFlow",
    "largest_gap_dimension",
    "spread_negative_log_likelihood",
    "UniformSphere",
    "SphereFlowDistribution",
    "SphereFlow",
    "log_sphere_area",
    "SimplexFlowDistribution",
    "SimplexFlow",
    "simplex_hausdorff_log_factor",
]
