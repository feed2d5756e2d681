r"""Distributions on the probability simplex :math:`\Delta^{n-1} \subset \mathbb{R}^n` built by
calibration flows.

**Measure.** Two measures on the simplex are in use (:mod:`atlasdist.manifolds.simplex`): the
Hausdorff (surface) measure :math:`\mathcal{H}^{n-1}` of :math:`\Delta^{n-1}` in
:math:`\mathbb{R}^n`, the measure of every other density in atlasdist, and torch's Lebesgue
measure :math:`dp_1 \cdots dp_{n-1}` of the first :math:`n-1` coordinates (``Dirichlet``).
Since :math:`d\mathcal{H}^{n-1} = \sqrt{n}\, dp_1 \cdots dp_{n-1}`,

.. math::
    \log p_{\mathcal{H}}(p) = \log p_\mathrm{Leb}(p) - \tfrac{1}{2}\log n

(:func:`~atlasdist.manifolds.simplex_hausdorff_log_factor`).

:class:`SimplexFlowDistribution` returns densities w.r.t. the Hausdorff measure by default
(``measure="hausdorff"``) and w.r.t. torch's Lebesgue measure with ``measure="lebesgue"``,
where a flow with no transforms reproduces ``Dirichlet.log_prob`` exactly. The volume ratios of
the flows do not depend on this choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import Dirichlet
from torch import nn
from torch.distributions import Distribution, Transform

from .._checks import check_parameter
from ..manifolds.simplex import check_on_simplex, unit_simplex
from ..manifolds.simplex import simplex_hausdorff_log_factor as simplex_hausdorff_log_factor
from .chain import ChainDistribution, ChainFlow, ManifoldKind, check_value

# simplex_hausdorff_log_factor lives in atlasdist.manifolds.simplex; it stays importable from
# here.
__all__ = ["SimplexFlowDistribution", "SimplexFlow"]

MEASURES = ("hausdorff", "lebesgue")

SIMPLEX = ManifoldKind(type(unit_simplex), "the simplex Delta^(n-1)", "Dirichlet")


class SimplexFlowDistribution(ChainDistribution):
    r"""The pushforward :math:`p(q) = p_0(p) \prod_k R_{f_k}(p_{k-1})^{-1}` of a distribution
    on :math:`\Delta^{n-1}` by a chain of calibration flows,
    :math:`q = f_K \circ \dots \circ f_1(p)`.

    ``log_prob`` is a density w.r.t. ``measure``: ``"hausdorff"`` (default, the surface measure
    of the simplex in :math:`\mathbb{R}^n`) or ``"lebesgue"`` (:math:`dp_1 \cdots dp_{n-1}`,
    torch's convention); they differ by :math:`\frac{1}{2}\log n` (see the module notes). The
    base's density is read w.r.t. its own ``measure`` attribute when it has one (a
    :class:`SimplexFlowDistribution`), else w.r.t. torch's Lebesgue measure (``Dirichlet``).
    Shapes: values :math:`(*, \text{batch}, n)`, log-densities :math:`(*, \text{batch})`.

    **Validation.** With ``validate_args``, a value with a negative entry or a sum off 1 by more
    than ``1e-6`` raises ``ValueError`` stating the distance; values on the boundary (an entry
    0) raise in the flows, which are defined on the open simplex.

    Arguments:
        base: a distribution on :math:`\Delta^{n-1}` with event shape :math:`(n,)`, e.g.
            ``Dirichlet``.
        transforms: simplex flows (:mod:`atlasdist.transforms.simplex`), first applied first.
        measure: ``"hausdorff"`` or ``"lebesgue"``.

    Example:
        >>> from atlasdist.transforms.simplex import Calibration
        >>> base = Dirichlet(torch.tensor([2.0, 3.0, 4.0]))
        >>> d = SimplexFlowDistribution(base, [], measure="lebesgue")
        >>> p = torch.tensor([0.2, 0.3, 0.5])
        >>> torch.allclose(d.log_prob(p), base.log_prob(p))
        True
        >>> h = SimplexFlowDistribution(base, [Calibration(3, temperature=2.0)])
        >>> h.sample((5,)).shape
        torch.Size([5, 3])

    Cost: that of the flows (:math:`O(n^2)` per point each) plus the base.
    """

    min_features = 2
    manifold = SIMPLEX

    def __init__(
        self,
        base: Distribution,
        transforms: Transform | Sequence[Transform] = (),
        measure: str = "hausdorff",
        validate_args: bool | None = None,
    ):
        if measure not in MEASURES:
            raise ValueError(f"SimplexFlowDistribution: measure must be one of {MEASURES}")
        super().__init__(base, transforms, validate_args=validate_args)
        n = self.event_shape[0]
        base_measure = getattr(base, "measure", "lebesgue")
        self.measure = measure
        # log(d base measure / d target measure): 1/2 log n from Lebesgue to Hausdorff.
        self._log_factor = simplex_hausdorff_log_factor(n) * (
            (measure == "hausdorff") - (base_measure == "hausdorff")
        )

    @property
    def support(self):
        return unit_simplex

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SimplexFlowDistribution, _instance)
        new.measure, new._log_factor = self.measure, self._log_factor
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        n = self.event_shape[0]
        if self._validate_args:
            name = type(self).__name__
            check_value(name, value, n, self)
            check_on_simplex(value, name, "value", open_=False, enabled=True)
        x, log_prob = self.pull_back(value)
        return log_prob + self.base_dist.log_prob(x) - self._log_factor


class SimplexFlow(ChainFlow):
    r"""Learnable flow on :math:`\Delta^{n-1}`: a lazy module
    (:class:`~atlasdist.lazy.LazyDistribution`) whose ``forward(c=None)`` returns a
    :class:`SimplexFlowDistribution` with a learnable ``Dirichlet`` base, :math:`p(x)` or,
    with ``context_features`` :math:`> 0`, :math:`p(x \mid c)`.

    The base concentration is :math:`\alpha = e^{\beta}` for an unconstrained parameter
    ``log_concentration`` :math:`\beta`. Parameters live in the module, so ``.to(device)``,
    ``state_dict``, optimizers and ``pyro.module`` work.

    **Conditioning** (:class:`~atlasdist.distributions.chain.ChainFlow`): with
    ``context_features`` :math:`k > 0`, ``module(c)`` for :math:`c` of shape :math:`(B, k)` is
    :math:`p(x \mid c)` with batch shape :math:`(B,)`, the flows' parameters produced from
    :math:`c` by hypernetworks; the base does not depend on :math:`c`.

    Arguments:
        features: :math:`n`.
        transforms: simplex flows (``nn.Module`` transforms are registered), first applied
            first.
        concentration: initial :math:`\alpha > 0` (scalar or shape :math:`(n,)`).
        measure: ``"hausdorff"`` (default) or ``"lebesgue"``, see
            :class:`SimplexFlowDistribution`.
        context_features: size :math:`k` of the conditioning input (0: none).
        hidden: hidden sizes of each flow's hypernetwork.

    Example:
        >>> from atlasdist.transforms.simplex import GeneralizedCalibration
        >>> flow = SimplexFlow(3, [GeneralizedCalibration(3)], concentration=2.0)
        >>> p = flow().sample((64,))
        >>> (-flow().log_prob(p).mean()).backward()
        >>> conditional = SimplexFlow(3, [GeneralizedCalibration(3)], context_features=2)
        >>> q = conditional(torch.randn(5, 2))  # p(x | c) for 5 inputs c
        >>> tuple(q.batch_shape), q.sample((4,)).shape, q.log_prob(p[:5]).shape
        ((5,), torch.Size([4, 5, 3]), torch.Size([5]))
    """

    min_features = 2
    manifold = SIMPLEX

    def __init__(
        self,
        features: int,
        transforms: Sequence[Transform] = (),
        concentration: float | torch.Tensor = 1.0,
        measure: str = "hausdorff",
        *,
        context_features: int = 0,
        hidden: Sequence[int] = (32,),
    ):
        super().__init__(features, transforms, context_features, hidden)
        check_parameter(concentration, "concentration", "SimplexFlow", positive=True)
        alpha = torch.as_tensor(concentration, dtype=torch.get_default_dtype())
        if alpha.dim() > 1 or alpha.numel() not in (1, self.features):
            raise ValueError(
                f"SimplexFlow: concentration must be a number or of shape ({self.features},), "
                f"got shape {tuple(alpha.shape)}"
            )
        self.log_concentration = nn.Parameter(alpha.log().expand(self.features).clone())
        if measure not in MEASURES:
            raise ValueError(f"SimplexFlow: measure must be one of {MEASURES}")
        self.measure = measure

    def forward(
        self, c: torch.Tensor | None = None, *, validate_args: bool | None = None
    ) -> SimplexFlowDistribution:
        r"""The distribution with the current parameters, :math:`p(x)` or :math:`p(x \mid c)`
        for ``c`` of shape :math:`(*B, k)` (batch shape :math:`(*B)`); ``flow(...)`` is an
        alias."""
        transforms, batch_shape = self.conditioned(c)
        alpha = self.log_concentration.exp().expand(batch_shape + (self.features,))
        base = Dirichlet(alpha)
        return SimplexFlowDistribution(base, transforms, self.measure, validate_args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, measure={self.measure!r}"
