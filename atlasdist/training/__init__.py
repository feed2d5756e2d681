"""Fitting loops and objectives."""

from .mle import fit, negative_log_likelihood
from .objectives import AtlasObjective

__all__ = ["fit", "negative_log_likelihood", "AtlasObjective"]
