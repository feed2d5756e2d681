r"""What every distribution supported on an embedded :math:`d`-manifold in
:math:`\mathbb{R}^D` shares: the on-support constraint (reconstruction within a tolerance),
the thickened-support switch and ``expand``."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

__all__ = ["EmbeddedDistribution"]


def latent_dim_of(base) -> int:
    """The latent dimension d of a base distribution with event shape (d,) and batch shape ()
    (ValueError otherwise)."""
    if len(base.event_shape) != 1 or base.batch_shape != ():
        raise ValueError(
            f"base must have event shape (d,) and batch shape (), got event "
            f"{tuple(base.event_shape)}, batch {tuple(base.batch_shape)}"
        )
    return base.event_shape[0]


class _OnSupport(constraints.Constraint):
    """Points whose distance to the distribution's support is within its tolerance."""

    is_discrete = False
    event_dim = 1

    def __init__(self, dist: EmbeddedDistribution):
        self.dist = dist
        super().__init__()

    def check(self, value):
        return self.dist.distance_to_support(value) <= self.dist._tolerance(value)

    def __repr__(self):
        return f"OnSupport({type(self.dist).__name__})"


class EmbeddedDistribution(TorchDistribution):
    r"""Base of distributions on an embedded manifold with an optional thickening.

    Subclasses set ``atol`` and ``noise_scale`` and implement ``distance_to_support``. The
    support is the manifold (points within ``atol`` :math:`(1 + |x|)` of it; default
    :math:`10^{-4}` in float32, :math:`10^{-6}` in float64: loose enough for data computed in
    float32 and cast to float64, like :func:`~atlasdist.manifolds.sphere_tolerance`), or
    :math:`\mathbb{R}^D` when ``noise_scale`` is set.
    """

    atol: float | None = None
    noise_scale: float | None = None

    def distance_to_support(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def _tolerance(self, x: torch.Tensor) -> torch.Tensor:
        atol = self.atol
        if atol is None:
            atol = 1e-6 if x.dtype == torch.float64 else 1e-4
        return atol * (1 + x.norm(dim=-1))

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self):
        if self.noise_scale is not None:
            return constraints.real_vector
        return _OnSupport(self)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        new.__dict__.update(self.__dict__)
        TorchDistribution.__init__(
            new,
            batch_shape=torch.Size(batch_shape),
            event_shape=self.event_shape,
            validate_args=False,
        )
        new._validate_args = self._validate_args
        return new
