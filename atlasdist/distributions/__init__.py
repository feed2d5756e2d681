"""Distributions on manifolds."""

from .atlas import AtlasFlowDistribution
from .free_form import (
    FreeFormEmbedding,
    FreeFormInjectiveDistribution,
    FreeFormInjectiveFlow,
    decoder_log_volume,
)
from .simplex import SimplexFlow, SimplexFlowDistribution, simplex_hausdorff_log_factor
from .sphere import SphereFlow, SphereFlowDistribution, UniformSphere, log_sphere_area

__all__ = [
    "AtlasFlowDistribution",
    "FreeFormInjectiveFlow",
    "FreeFormInjectiveDistribution",
    "FreeFormEmbedding",
    "decoder_log_volume",
    "UniformSphere",
    "SphereFlowDistribution",
    "SphereFlow",
    "log_sphere_area",
    "SimplexFlowDistribution",
    "SimplexFlow",
    "simplex_hausdorff_log_factor",
]
