"""Fitting loops and objectives."""

from .distributed import DataParallel, init_distributed, local_device
from .fif import fif_loss, fif_loss_terms, hutchinson_vectors, volume_change_surrogate
from .mle import FitHistory, fit, negative_log_likelihood
from .objectives import AtlasObjective

__all__ = [
    "fit",
    "FitHistory",
    "negative_log_likelihood",
    "AtlasObjective",
    "fif_loss",
    "fif_loss_terms",
    "volume_change_surrogate",
    "hutchinson_vectors",
    "DataParallel",
    "init_distributed",
    "local_device",
]
