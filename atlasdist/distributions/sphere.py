r"""Distributions on the unit sphere :math:`S^{n-1} \subset \mathbb{R}^n` built by flows.

Every density here is a density w.r.t. the **surface measure** of the sphere (the
:math:`(n-1)`-dimensional Hausdorff measure of :math:`S^{n-1}` as a subset of
:math:`\mathbb{R}^n`; :math:`\sin\theta\, d\theta\, d\phi` on :math:`S^2`), the measure of
Pyro's ``ProjectedNormal`` (:mod:`atlasdist.manifolds.sphere`). A flow :math:`f` pushes a
base density to :math:`p(y) = p_0(x) / R_f(x)`, :math:`x = f^{-1}(y)`, with :math:`R_f` the
differential volume ratio of :mod:`atlasdist.transforms.sphere`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import ProjectedNormal, TorchDistribution
from torch import nn
from torch.distributions import Distribution, Transform

from .._checks import check_count, check_sample_shape
from ..manifolds.sphere import check_on_sphere, sphere_projection, unit_sphere
from ..manifolds.sphere import log_sphere_area as log_sphere_area
from .chain import ChainDistribution, ChainFlow, ManifoldKind, check_value

# log_sphere_area lives in atlasdist.manifolds.sphere; it stays importable from here.
__all__ = ["UniformSphere", "SphereFlowDistribution", "SphereFlow"]

SPHERE = ManifoldKind(
    type(ProjectedNormal.support), "the unit sphere S^(n-1)", "UniformSphere or ProjectedNormal"
)


def _check_value(dist: Distribution, value: torch.Tensor, n: int) -> None:
    name = type(dist).__name__
    check_value(name, value, n, dist)
    check_on_sphere(value, name, "value", enabled=True)


class UniformSphere(TorchDistribution):
    r"""Uniform distribution on :math:`S^{n-1}`: density :math:`1/|S^{n-1}| =
    \Gamma(n/2) / (2\pi^{n/2})` w.r.t. the surface measure.

    Samples are normalized standard normal vectors, shape ``sample_shape + batch_shape +
    (n,)``. It has no parameters, so its dtype and device are given (default: torch's
    defaults). ``rsample`` is ``sample`` (nothing to differentiate).

    Arguments:
        features: :math:`n \ge 2`.
        batch_shape: batch shape.
        dtype, device: of samples and log-densities.

    Example:
        >>> d = UniformSphere(3)
        >>> d.sample((2,)).shape, d.log_prob(torch.tensor([0.0, 0.0, 1.0]))  # -log(4 pi)
        (torch.Size([2, 3]), tensor(-2.5310))
    """

    arg_constraints: dict = {}
    support = unit_sphere
    has_rsample = True

    def __init__(
        self,
        features: int,
        batch_shape: Sequence[int] = (),
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ):
        self.features = check_count(features, "features", "UniformSphere", minimum=2)
        self.dtype = dtype or torch.get_default_dtype()
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"UniformSphere: dtype must be torch.float32 or torch.float64, got {self.dtype}"
            )
        batch_shape = check_sample_shape(batch_shape, "UniformSphere", "batch_shape")
        # None follows torch's default device (torch.set_default_device), like torch.zeros.
        self.device = torch.empty(0).device if device is None else torch.device(device)
        super().__init__(
            torch.Size(batch_shape), torch.Size([self.features]), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(UniformSphere, _instance)
        new.features, new.dtype, new.device = self.features, self.dtype, self.device
        super(UniformSphere, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros(self._extended_shape(), dtype=self.dtype, device=self.device)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(check_sample_shape(sample_shape, "UniformSphere"))
        return sphere_projection(torch.randn(shape, dtype=self.dtype, device=self.device))

    def log_prob(self, value):
        if self._validate_args:
            _check_value(self, value, self.features)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return value.new_full(shape, -log_sphere_area(self.features))

    def entropy(self):
        return torch.full(
            self.batch_shape, log_sphere_area(self.features), dtype=self.dtype, device=self.device
        )


class SphereFlowDistribution(ChainDistribution):
    r"""The pushforward :math:`p(y) = p_0(x) \prod_k R_{f_k}(x_{k-1})^{-1}` of a distribution on
    :math:`S^{n-1}` by a chain of sphere flows, :math:`y = f_K \circ \dots \circ f_1(x)`.

    A density w.r.t. the surface measure of the sphere (as the base's must be: that of
    :class:`UniformSphere` and of Pyro's ``ProjectedNormal`` is). ``log_prob`` inverts the
    chain and subtracts the closed-form :math:`\log R_{f_k}`; ``sample``/``rsample`` run the
    chain forward (``rsample`` needs a reparametrizable base). Shapes follow
    ``torch.distributions``: values :math:`(*, \text{batch}, n)`, log-densities
    :math:`(*, \text{batch})`.

    **Validation.** With ``validate_args``, a value off the sphere by more than
    :func:`~atlasdist.manifolds.sphere_tolerance` raises ``ValueError`` stating the
    distance; otherwise values are projected radially, :math:`y \mapsto y / |y|`.

    Arguments:
        base: a distribution on :math:`S^{n-1}` with event shape :math:`(n,)`.
        transforms: sphere flows (:mod:`atlasdist.transforms.sphere`, or a
            :class:`~atlasdist.transforms.manifold.ManifoldTransform`), first applied first.

    Example:
        >>> from atlasdist.transforms.sphere import NormalizedTranslation
        >>> f = NormalizedTranslation(3, shift=torch.tensor([0.0, 0.0, 0.5]))
        >>> d = SphereFlowDistribution(UniformSphere(3), [f])
        >>> d.sample((4,)).shape
        torch.Size([4, 3])

    Cost: that of the flows (:math:`O(n^2)` per point each) plus the base.
    """

    min_features = 2
    manifold = SPHERE

    @property
    def support(self):
        return unit_sphere

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SphereFlowDistribution, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        n = self.event_shape[0]
        if self._validate_args:
            _check_value(self, value, n)
        x, log_prob = self.pull_back(sphere_projection(value))
        return log_prob + self.base_dist.log_prob(sphere_projection(x))


class SphereFlow(ChainFlow):
    r"""Learnable flow on :math:`S^{n-1}`: a lazy module
    (:class:`~atlasdist.lazy.LazyDistribution`) whose ``forward(c=None)`` returns a
    :class:`SphereFlowDistribution` (density w.r.t. the surface measure), :math:`p(x)` or,
    with ``context_features`` :math:`> 0`, :math:`p(x \mid c)`.

    Parameters live in the module, so ``.to(device)``, ``state_dict``, optimizers and
    ``pyro.module`` work; the distribution is rebuilt (cheaply) on every call, its base on the
    module's device and dtype.

    **Conditioning** (:class:`~atlasdist.distributions.chain.ChainFlow`): with
    ``context_features`` :math:`k > 0`, ``module(c)`` for :math:`c` of shape :math:`(B, k)` is
    :math:`p(x \mid c)` with batch shape :math:`(B,)`, the flows' parameters produced from
    :math:`c` by hypernetworks; the base does not depend on :math:`c`.

    Arguments:
        features: :math:`n`.
        transforms: sphere flows (``nn.Module`` transforms are registered), first applied first.
        base: ``"uniform"`` (:class:`UniformSphere`) or ``"projected_normal"`` (Pyro's
            ``ProjectedNormal`` with a learnable concentration vector, zero, i.e. uniform, at
            initialization; its ``log_prob`` exists for :math:`n \le 4` only).
        context_features: size :math:`k` of the conditioning input (0: none).
        hidden: hidden sizes of each flow's hypernetwork.

    Example:
        >>> from atlasdist.transforms.sphere import NormalizedAffine, NormalizedTranslation
        >>> flow = SphereFlow(3, [NormalizedAffine(3), NormalizedTranslation(3)])
        >>> x = flow().sample((64,))
        >>> loss = -flow().log_prob(x).mean()
        >>> loss.backward()
        >>> conditional = SphereFlow(3, [NormalizedAffine(3)], context_features=2)
        >>> p = conditional(torch.randn(5, 2))  # p(x | c) for 5 inputs c
        >>> tuple(p.batch_shape), p.sample((4,)).shape, p.log_prob(x[:5]).shape
        ((5,), torch.Size([4, 5, 3]), torch.Size([5]))
    """

    min_features = 2
    manifold = SPHERE

    def __init__(
        self,
        features: int,
        transforms: Sequence[Transform] = (),
        base: str = "uniform",
        *,
        context_features: int = 0,
        hidden: Sequence[int] = (32,),
    ):
        super().__init__(features, transforms, context_features, hidden)
        if base == "uniform":
            self.concentration = None
            # Carries the module's dtype and device to the parameter-free base.
            self.register_buffer("_anchor", torch.zeros(()))
        elif base == "projected_normal":
            if self.features not in ProjectedNormal._log_prob_impls:
                raise ValueError(
                    f"SphereFlow: Pyro's ProjectedNormal has log_prob for n in "
                    f"{sorted(ProjectedNormal._log_prob_impls)}, got n = {self.features}; use "
                    "base='uniform'"
                )
            self.concentration = nn.Parameter(torch.zeros(self.features))
        else:
            raise ValueError(
                f"SphereFlow: base must be 'uniform' or 'projected_normal', got {base!r}"
            )
        self.base = base

    def forward(
        self, c: torch.Tensor | None = None, *, validate_args: bool | None = None
    ) -> SphereFlowDistribution:
        r"""The distribution with the current parameters, :math:`p(x)` or :math:`p(x \mid c)`
        for ``c`` of shape :math:`(*B, k)` (batch shape :math:`(*B)`); ``flow(...)`` is an
        alias."""
        transforms, batch_shape = self.conditioned(c)
        if self.concentration is None:
            anchor = self._anchor
            base = UniformSphere(
                self.features, batch_shape, dtype=anchor.dtype, device=anchor.device
            )
        else:
            base = ProjectedNormal(self.concentration.expand(batch_shape + (self.features,)))
        return SphereFlowDistribution(base, transforms, validate_args=validate_args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base!r}"
