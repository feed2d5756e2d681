r"""The unit sphere :math:`S^{n-1} = \{x \in \mathbb{R}^n : |x| = 1\}`: the facts that the flows
of :mod:`atlasdist.transforms.sphere` and the distributions of
:mod:`atlasdist.distributions.sphere` share.

- the radial projection :func:`sphere_projection`, :math:`\pi(z) = z / |z|`;
- the on-sphere tolerance :func:`sphere_tolerance`, the constraint :data:`unit_sphere` and the
  check :func:`check_on_sphere` that use it;
- the volume :func:`log_sphere_area`, :math:`|S^{n-1}| = 2\pi^{n/2} / \Gamma(n/2)`.

**Measure.** Every density on the sphere in atlasdist is a density w.r.t. the **surface
measure**, the :math:`(n-1)`-dimensional Hausdorff measure of :math:`S^{n-1}` as a subset of
:math:`\mathbb{R}^n` (:math:`d\theta` on the circle, :math:`\sin\theta\, d\theta\, d\phi` on
:math:`S^2`), the measure of Pyro's ``ProjectedNormal``: no factor converts between
conventions, and :math:`\int_{S^{n-1}} dA = |S^{n-1}|`.

Example:
    >>> x = sphere_projection(torch.tensor([[0.6, 0.8, 0.0], [1.0, 1.0, 0.0]]))
    >>> unit_sphere.check(x), unit_sphere.check(2 * x)
    (tensor([True, True]), tensor([False, False]))
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import constraints as pyro_constraints
from pyro.distributions.transforms import Normalize
from torch.distributions import transform_to

from .._checks import validation_enabled

__all__ = [
    "sphere_projection",
    "sphere_tolerance",
    "unit_sphere",
    "check_on_sphere",
    "log_sphere_area",
]


def sphere_projection(z: torch.Tensor) -> torch.Tensor:
    r"""Radial projection :math:`\pi(z) = z / |z|` of :math:`\mathbb{R}^n \setminus \{0\}` onto
    the unit sphere :math:`S^{n-1}`.

    Its Jacobian on the sphere is the orthogonal tangent projection :math:`I - x x^\top`: it is
    the nearest-point projection. Cost :math:`O(n)` per point.

    Arguments:
        z: points of shape :math:`(*, n)`, none at the origin.

    Returns:
        :math:`\pi(z)`, shape :math:`(*, n)`.

    Example:
        >>> sphere_projection(torch.tensor([[3.0, 0.0, 4.0]]))
        tensor([[0.6000, 0.0000, 0.8000]])
    """
    return z / z.norm(dim=-1, keepdim=True)


def sphere_tolerance(dtype: torch.dtype) -> float:
    r"""Largest accepted :math:`\big||x| - 1\big|` of a point on the sphere:
    :math:`\max(10^{-6}, 100\,\varepsilon)` for the machine epsilon :math:`\varepsilon` of
    ``dtype``, loose enough for data normalized in float32 and cast to float64.

    Example:
        >>> sphere_tolerance(torch.float64), sphere_tolerance(torch.float32)
        (1e-06, 1.1920928955078125e-05)
    """
    return max(1e-6, 100 * torch.finfo(dtype).eps)


class _UnitSphere(type(pyro_constraints.sphere)):
    """Pyro's sphere constraint with the tolerance of :func:`sphere_tolerance` (Pyro's own,
    :math:`10\\varepsilon\\sqrt{n}`, rejects float32-normalized data cast to float64)."""

    def check(self, value):
        return (value.norm(dim=-1) - 1).abs() <= sphere_tolerance(value.dtype)


unit_sphere = _UnitSphere()
r"""The constraint :math:`\big||x| - 1\big| \le` :func:`sphere_tolerance` (``event_dim`` 1):
the ``support``, ``domain`` and ``codomain`` of the flows and distributions on spheres;
``transform_to(unit_sphere)`` is Pyro's ``Normalize``, so
``pyro.param(..., constraint=unit_sphere)`` works."""

transform_to.register(_UnitSphere)(lambda constraint: Normalize())


def check_on_sphere(
    x: torch.Tensor, name: str, what: str = "input", enabled: bool | None = None
) -> None:
    r"""Raises ``ValueError`` if a point of ``x`` is off the unit sphere by more than
    :func:`sphere_tolerance` (or is NaN), stating how far; the message names ``name`` and
    ``what``.

    Runs while validation is on (:func:`atlasdist._checks.validation_enabled`), or as
    ``enabled`` says when given. Cost: one norm per point and a device sync.

    Arguments:
        x: points of shape :math:`(*, n)`.
        name: who checks (e.g. the transform's name).
        what: what ``x`` is (``"input"``, ``"value"``).
        enabled: force the check on or off.

    Example:
        >>> check_on_sphere(torch.tensor([0.0, 0.0, 2.0]), "f", enabled=True)
        Traceback (most recent call last):
        ...
        ValueError: f: 1 input point(s) off the unit sphere S^2: | |x| - 1 | up to 1 ...
    """
    if not (validation_enabled() if enabled is None else enabled):
        return
    x = x.detach()
    off = (x.norm(dim=-1) - 1).abs()
    tol = sphere_tolerance(x.dtype)
    bad = ~(off <= tol)  # NaN counts as off
    if bool(bad.any()):
        n = x.shape[-1]
        raise ValueError(
            f"{name}: {int(bad.sum())} {what} point(s) off the unit sphere S^{n - 1}: "
            f"| |x| - 1 | up to {float(off[bad].max()):.3g} (tolerance {tol:.2g}); project them "
            "with x / x.norm(dim=-1, keepdim=True)"
        )


def log_sphere_area(features: int) -> float:
    r"""The log volume of the sphere w.r.t. its surface measure,

    .. math::
        \log|S^{n-1}| = \log \frac{2\pi^{n/2}}{\Gamma(n/2)},

    :math:`n` = ``features`` (:math:`2\pi` for the circle, :math:`4\pi` for :math:`S^2`):
    minus the log-density of the uniform distribution.

    Example:
        >>> math.isclose(math.exp(log_sphere_area(3)), 4 * math.pi)
        True
    """
    return math.log(2) + 0.5 * features * math.log(math.pi) - math.lgamma(0.5 * features)
