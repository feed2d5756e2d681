"""Fitting loops and objectives."""

from .mle import fit, negative_log_likelihood

__all__ = ["fit", "negative_log_likelihood"]
