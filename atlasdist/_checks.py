"""Input checks shared by transforms and distributions.

Shape checks are free and always on. Value checks (NaN, domains) need a device sync, so they
follow torch's switch: they run while ``torch.distributions.Distribution._validate_args`` is
true (the default under ``python`` without ``-O``; ``pyro.enable_validation(False)`` or
``Distribution.set_default_validate_args(False)`` turns them off for speed).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributions import Distribution

__all__ = ["check_features", "check_finite", "validation_enabled", "no_validation"]

_DISABLED = [0]


def validation_enabled() -> bool:
    """Whether value checks (NaN, domains, off-manifold points) run."""
    return bool(Distribution._validate_args) and _DISABLED[0] == 0


@contextlib.contextmanager
def no_validation():
    """Turns value checks off inside the block (needed under ``torch.func`` transforms, where
    data-dependent Python control flow is not allowed)."""
    _DISABLED[0] += 1
    try:
        yield
    finally:
        _DISABLED[0] -= 1


def check_features(x: torch.Tensor, features: int, name: str, what: str = "input") -> None:
    """Raises ValueError unless ``x`` has shape ``(*, features)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name}: expected {what} of shape (*, {features}), got {tuple(x.shape)}")


def check_finite(x: torch.Tensor, name: str, what: str = "input") -> None:
    """Raises ValueError if ``x`` holds NaN or infinite entries (when validation is on)."""
    if validation_enabled() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {what} holds {bad} non-finite (NaN or inf) entries")
