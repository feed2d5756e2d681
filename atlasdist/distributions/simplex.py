r"""Distributions on the probability simplex :math:`\Delta^{n-1} \subset \mathbb{R}^n` built by
calibration flows.

**Measure.** Two measures on the simplex are in use, and they differ by a constant:

- the **Hausdorff (surface) measure** :math:`\mathcal{H}^{n-1}` of :math:`\Delta^{n-1}` as a
  subset of :math:`\mathbb{R}^n` (the :math:`(n-1)`-dimensional volume on the manifold, the
  measure of every other density in atlasdist; :math:`\mathcal{H}^{n-1}(\Delta^{n-1}) =
  \sqrt{n} / (n-1)!`);
- the **Lebesgue measure** :math:`dp_1 \cdots dp_{n-1}` of the first :math:`n-1`
  coordinates, torch's convention (``Dirichlet.log_prob``, ``StickBreakingTransform``).

Since :math:`d\mathcal{H}^{n-1} = \sqrt{n}\, dp_1 \cdots dp_{n-1}` (reference/003, "Simplex
flow"),

.. math::
    \log p_{\mathcal{H}}(p) = \log p_\mathrm{Leb}(p) - \tfrac{1}{2}\log n

(:func:`simplex_hausdorff_log_factor`).

:class:`SimplexFlowDistribution` returns densities w.r.t. the Hausdorff measure by default
(``measure="hausdorff"``) and w.r.t. torch's Lebesgue measure with ``measure="lebesgue"``,
where a flow with no transforms reproduces ``Dirichlet.log_prob`` exactly. The volume ratios of
the flows do not depend on this choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions import Dirichlet, TransformedDistribution
from torch import nn
from torch.distributions import Distribution, Transform, constraints

from .._checks import check_features
from ..transforms.simplex import check_on_simplex
from .sphere import check_chain

__all__ = ["SimplexFlowDistribution", "SimplexFlow", "simplex_hausdorff_log_factor"]

MEASURES = ("hausdorff", "lebesgue")


def simplex_hausdorff_log_factor(features: int) -> float:
    r""":math:`\log \frac{d\mathcal{H}^{n-1}}{dp_1 \cdots dp_{n-1}} = \frac{1}{2}\log n`,
    :math:`n` = ``features``: subtract it from a log-density w.r.t. the Lebesgue measure of the
    first :math:`n-1` coordinates (torch's ``Dirichlet``) to get one w.r.t. the Hausdorff
    measure of the simplex."""
    return 0.5 * math.log(features)


class SimplexFlowDistribution(TransformedDistribution):
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

    def __init__(
        self,
        base: Distribution,
        transforms: Transform | Sequence[Transform] = (),
        measure: str = "hausdorff",
        validate_args: bool | None = None,
    ):
        if measure not in MEASURES:
            raise ValueError(f"SimplexFlowDistribution: measure must be one of {MEASURES}")
        transforms = check_chain("SimplexFlowDistribution", base, transforms, min_features=2)
        n = base.event_shape[0]
        base_measure = getattr(base, "measure", "lebesgue")
        self.measure = measure
        # log(d base measure / d target measure): 1/2 log n from Lebesgue to Hausdorff.
        self._log_factor = simplex_hausdorff_log_factor(n) * (
            (measure == "hausdorff") - (base_measure == "hausdorff")
        )
        super().__init__(base, transforms, validate_args=validate_args)

    @property
    def support(self):
        return constraints.simplex

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SimplexFlowDistribution, _instance)
        new.measure, new._log_factor = self.measure, self._log_factor
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        n = self.event_shape[0]
        if self._validate_args:
            name = type(self).__name__
            check_features(value, n, name, "value")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: value holds non-finite (NaN or inf) entries")
            check_on_simplex(value, name, "value", open_=False, enabled=True)
        y = value
        log_prob = 0.0
        for t in reversed(self.transforms):
            x = t.inv(y)
            log_prob = log_prob - t.log_abs_det_jacobian(x, y)
            y = x
        return log_prob + self.base_dist.log_prob(y) - self._log_factor


class SimplexFlow(nn.Module):
    r"""Learnable flow on :math:`\Delta^{n-1}`: an ``nn.Module`` whose ``forward()`` returns a
    :class:`SimplexFlowDistribution` with a learnable ``Dirichlet`` base.

    The base concentration is :math:`\alpha = e^{\beta}` for an unconstrained parameter
    ``log_concentration`` :math:`\beta`. Parameters live in the module, so ``.to(device)``,
    ``state_dict``, optimizers and ``pyro.module`` work.

    Arguments:
        features: :math:`n`.
        transforms: simplex flows (``nn.Module`` transforms are registered), first applied
            first.
        concentration: initial :math:`\alpha > 0` (scalar or shape :math:`(n,)`).
        measure: ``"hausdorff"`` (default) or ``"lebesgue"``, see
            :class:`SimplexFlowDistribution`.

    Example:
        >>> from atlasdist.transforms.simplex import GeneralizedCalibration
        >>> flow = SimplexFlow(3, [GeneralizedCalibration(3)], concentration=2.0)
        >>> p = flow().sample((64,))
        >>> (-flow().log_prob(p).mean()).backward()
    """

    def __init__(
        self,
        features: int,
        transforms: Sequence[Transform] = (),
        concentration: float | torch.Tensor = 1.0,
        measure: str = "hausdorff",
    ):
        super().__init__()
        self.features = int(features)
        self.transforms = list(transforms)
        self.transform_modules = nn.ModuleList(
            [t for t in self.transforms if isinstance(t, nn.Module)]
        )
        alpha = torch.as_tensor(concentration, dtype=torch.get_default_dtype())
        if not bool((alpha > 0).all()):
            raise ValueError("SimplexFlow: concentration must be > 0")
        self.log_concentration = nn.Parameter(alpha.log().expand(self.features).clone())
        if measure not in MEASURES:
            raise ValueError(f"SimplexFlow: measure must be one of {MEASURES}")
        self.measure = measure

    def forward(self) -> SimplexFlowDistribution:
        base = Dirichlet(self.log_concentration.exp())
        return SimplexFlowDistribution(base, self.transforms, measure=self.measure)

    def extra_repr(self) -> str:
        return f"features={self.features}, measure={self.measure!r}"

    def flow(self) -> SimplexFlowDistribution:
        """The distribution with the current parameters (same as calling the module; the
        name the other lazy modules use, e.g. for :func:`atlasdist.training.fit`)."""
        return self()
