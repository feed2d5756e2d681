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

__all__ = [
    "check_features",
    "check_finite",
    "check_parameter",
    "check_floating",
    "check_batch",
    "model_tensor",
    "validation_enabled",
    "no_validation",
]

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


def _show(t: torch.Tensor) -> str:
    values = t.detach().reshape(-1)[:6].tolist()
    return str(values if t.numel() > 1 else values[0]) + (" ..." if t.numel() > 6 else "")


def check_parameter(
    value, name: str, owner: str, *, positive: bool = False, nonnegative: bool = False
) -> None:
    """Raises ValueError, naming the parameter and the class, unless ``value`` (a number or a
    tensor) is finite and, as asked, positive or non-negative. For construction parameters:
    always on (they are checked once, not per call)."""
    t = torch.as_tensor(value).detach()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{owner}: {name} must be finite, got {_show(t)}")
    if positive and not bool((t > 0).all()):
        raise ValueError(f"{owner}: {name} must be > 0, got {_show(t)}")
    if nonnegative and not bool((t >= 0).all()):
        raise ValueError(f"{owner}: {name} must be >= 0, got {_show(t)}")


def check_floating(x, owner: str, what: str = "value", like: torch.Tensor | None = None) -> None:
    """Raises TypeError unless ``x`` is a float32 or float64 tensor and, when ``like`` (a tensor
    of the model's parameters) is given, ValueError unless ``x`` has its dtype and device. The
    messages name the argument, the class and the conversion that fixes it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{owner}: {what} must be a torch.Tensor, got {type(x).__name__}; convert it with "
            "torch.as_tensor(...)"
        )
    target = like.dtype if like is not None else torch.get_default_dtype()
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{owner}: {what} has dtype {x.dtype}; the library computes in float32 or float64 "
            f"(this model: {target}): convert it with {what}.to({target})"
        )
    if like is None:
        return
    if x.dtype != like.dtype:
        raise ValueError(
            f"{owner}: {what} has dtype {x.dtype}, the model's parameters {like.dtype}; "
            f"convert the {what} with .to({like.dtype}) or the model with .to({x.dtype})"
        )
    if x.device != like.device:
        raise ValueError(
            f"{owner}: {what} is on {x.device}, the model's parameters on {like.device}; "
            f"move the {what} with .to({str(like.device)!r}) or the model with .to(...)"
        )


def model_tensor(dist) -> torch.Tensor | None:
    """A tensor with the dtype and device a distribution computes in: a floating-point tensor
    of it or of its base (``base_dist``, followed down), or an empty tensor of its ``dtype`` and
    ``device`` (a distribution without parameters); None when none is found."""
    while dist is not None:
        for value in vars(dist).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        if isinstance(getattr(dist, "dtype", None), torch.dtype):
            return torch.empty(0, dtype=dist.dtype, device=getattr(dist, "device", None))
        dist = getattr(dist, "base_dist", None)
    return None


def check_batch(shape: torch.Size, batch_shape: torch.Size, owner: str) -> torch.Size:
    """The broadcast of a value's batch dimensions with the distribution's batch shape, or a
    ValueError naming both."""
    try:
        return torch.broadcast_shapes(shape, batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{owner}: a value with batch dimensions {tuple(shape)} does not broadcast with "
            f"the distribution's batch shape {tuple(batch_shape)}"
        ) from None
