"""Input checks shared by transforms and distributions.

Shape checks are free and always on. Value checks (NaN, domains) need a device sync, so they
follow torch's switch: they run while ``torch.distributions.Distribution._validate_args`` is
true (the default under ``python`` without ``-O``; ``pyro.enable_validation(False)`` or
``Distribution.set_default_validate_args(False)`` turns them off for speed).

Construction parameters are checked once, when a user builds an object. Layers that a
hypernetwork's output builds on every call (``from_parameters``) are built inside
:func:`trusted_parameters`, which skips the value checks of those parameters (each would
synchronise the device) and keeps the free shape checks.
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
from torch.distributions import Distribution

__all__ = [
    "check_features",
    "check_finite",
    "check_parameter",
    "check_count",
    "check_sizes",
    "check_floating",
    "check_batch",
    "check_sample_shape",
    "model_tensor",
    "module_tensor",
    "validation_enabled",
    "no_validation",
    "trusted_parameters",
    "parameters_trusted",
]

_DISABLED = [0]
_TRUSTED = [0]


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


@contextlib.contextmanager
def trusted_parameters():
    """Inside the block, layers built from given parameter tensors skip the value checks of
    those tensors (finiteness, range), keeping the free shape checks. For the hot path, where a
    hypernetwork's output builds a layer on every call (``from_parameters``): a value check
    there would force a device synchronisation per call. The user-facing constructors run
    outside it and check their parameters."""
    _TRUSTED[0] += 1
    try:
        yield
    finally:
        _TRUSTED[0] -= 1


def parameters_trusted() -> bool:
    """Whether the caller is inside :func:`trusted_parameters`."""
    return _TRUSTED[0] > 0


def check_features(x: torch.Tensor, features: int, name: str, what: str = "input") -> None:
    """Raises ValueError unless ``x`` has shape ``(*, features)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{name}: expected {what} of shape (*, {features}), got {tuple(x.shape)}")


def check_finite(x: torch.Tensor, name: str, what: str = "input") -> None:
    """Raises ValueError if ``x`` holds NaN or infinite entries (when validation is on)."""
    if x.device.type == "meta":  # shapes only, no values
        return
    if validation_enabled() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {what} holds {bad} non-finite (NaN or inf) entries")


def _show(t: torch.Tensor) -> str:
    values = t.detach().reshape(-1)[:6].tolist()
    return str(values if t.numel() > 1 else values[0]) + (" ..." if t.numel() > 6 else "")


def check_parameter(
    value,
    name: str,
    owner: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    tensor: bool = False,
) -> None:
    """Raises ValueError, naming the parameter and the class, unless ``value`` (a number or a
    tensor) is finite and, as asked, positive or non-negative; a TypeError unless it is a
    number or a float32/float64 tensor (``tensor``: a tensor). For construction parameters:
    checked once, when the object is built, not per call."""
    if isinstance(value, int | float) and not isinstance(value, bool) and not tensor:
        if not math.isfinite(value):
            raise ValueError(f"{owner}: {name} must be finite, got {value}")
        if positive and not value > 0:
            raise ValueError(f"{owner}: {name} must be > 0, got {value}")
        if nonnegative and not value >= 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
        return
    if tensor and not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}; convert it "
            "with torch.as_tensor(...)"
        )
    try:
        t = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{owner}: {name} must be a number or a tensor, got {value!r}") from None
    if t.dtype not in (torch.float32, torch.float64) and (
        isinstance(value, torch.Tensor) or t.dtype not in (torch.int32, torch.int64)
    ):
        raise TypeError(
            f"{owner}: {name} has dtype {t.dtype}; the library computes in float32 or float64: "
            f"convert it with {name}.to(torch.get_default_dtype())"
        )
    if t.device.type == "meta":
        return  # no values to check
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{owner}: {name} must be finite, got {_show(t)}")
    if positive and not bool((t > 0).all()):
        raise ValueError(f"{owner}: {name} must be > 0, got {_show(t)}")
    if nonnegative and not bool((t >= 0).all()):
        raise ValueError(f"{owner}: {name} must be >= 0, got {_show(t)}")


def check_count(value, name: str, owner: str, minimum: int = 1) -> int:
    """``value`` as an int, or a TypeError unless it is an integer (``bool`` and ``float``
    are refused: ``1.5`` features is a mistake, not ``1``) and a ValueError unless it is at
    least ``minimum``; both name the argument and the class."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def check_sizes(values, name: str, owner: str, nonempty: bool = False) -> tuple[int, ...]:
    """A sequence of ints >= 1 (hidden layer sizes), at least one with ``nonempty``, as a tuple,
    or a TypeError/ValueError naming the argument and the class."""
    if isinstance(values, torch.Tensor | str) or not hasattr(values, "__iter__"):
        raise TypeError(f"{owner}: {name} must be a sequence of ints, got {values!r}")
    sizes = tuple(check_count(v, f"{name} entry", owner) for v in values)
    if nonempty and not sizes:
        raise ValueError(f"{owner}: {name} needs at least one layer size, got {values!r}")
    return sizes


def check_sample_shape(sample_shape, owner: str, name: str = "sample_shape") -> torch.Size:
    """``sample_shape`` (or another shape, ``name``) as a ``torch.Size``: a TypeError unless its
    entries are ints, a ValueError naming the class if one is negative."""
    try:
        shape = torch.Size(sample_shape)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be a tuple of ints, got {sample_shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{owner}: {name} must not be negative, got {tuple(shape)}")
    return shape


def check_floating(x, owner: str, what: str = "value", like: torch.Tensor | None = None) -> None:
    """Raises TypeError unless ``x`` is a float32 or float64 tensor and, when ``like`` (a tensor
    of the model's parameters) is given, ValueError unless ``x`` has its dtype and device. The
    messages name the argument, the class and the conversion that fixes it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{owner}: {what} must be a torch.Tensor, got {type(x).__name__}; convert it with "
            "torch.as_tensor(...)"
        )
    if x.dtype not in (torch.float32, torch.float64):
        target, whose = (
            (like.dtype, "this model")
            if like is not None
            else (torch.get_default_dtype(), "torch's default")
        )
        raise TypeError(
            f"{owner}: {what} has dtype {x.dtype}; the library computes in float32 or float64 "
            f"({whose}: {target}): convert it with {what}.to({target})"
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


def module_tensor(module) -> torch.Tensor | None:
    """A floating-point tensor of a module, giving the dtype and device it computes in: one of
    its own parameters, buffers or tensor attributes (a conditioned layer's given parameters),
    else the first of its submodules'; None for a module without any. Buffers a module lists
    in ``_default_buffers`` (default constants, e.g. the north pole of a stereographic chart
    built without one) do not count: such a layer follows its input's dtype. Metadata only, no
    device sync."""
    for sub in module.modules():
        defaults = getattr(sub, "_default_buffers", ())
        for table in (sub._parameters, sub._buffers, sub.__dict__):
            for key, value in table.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and not (table is sub._buffers and key in defaults)
                ):
                    return value
    return None


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
