r"""Pyro latent variables on manifolds: a reparameterizer that lets Pyro's autoguides
(``AutoNormal``, ``AutoMultivariateNormal``, ``AutoDelta``) handle sample sites whose prior lives
on a sphere, a simplex or an atlas, and a learnable guide on the manifold itself.

**Why a reparameterizer.** An autoguide works in an unconstrained space
:math:`\mathbb{R}^m` and needs a bijection onto the site's support; a sphere has none (Pyro
refuses spherical sites) and an atlas's support is a learned manifold. :class:`ManifoldReparam`
replaces a manifold site :math:`x \sim p` by an auxiliary site ``{name}_unconstrained``,
:math:`u \sim \tilde p` on :math:`\mathbb{R}^m`, and a deterministic :math:`x = \phi(u)`.
Each :math:`\tilde p` below is **exact**: the law of :math:`\phi(u)` under :math:`\tilde p` is
:math:`p` itself, so the reparameterized model has the same marginal over :math:`x` (and the
same posterior) as the original one.

- :class:`SphereLift` (sphere, :math:`m = n`): :math:`\phi(u) = u / |u|` with the radial lift
  :math:`\tilde p(u) = p(u/|u|)\, \rho(|u|) / |u|^{n-1}`.
- :class:`SimplexPullback` (simplex, :math:`m = n - 1`): :math:`\phi` = torch's stick-breaking
  bijection, :math:`\tilde p(u) = p_\mathrm{Leb}(\phi(u))\, |\det J_\phi(u)|`.
- :class:`ChartPullback` (atlas, :math:`m = d`): :math:`\phi = g_j`, one chart chosen
  deterministically, :math:`\tilde p(z) = p(g_j(z))\, \sqrt{\det J_{g_j}^\top J_{g_j}}(z)`, with
  :math:`p` the atlas's full mixture density (every chart containing :math:`x` counted).
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.distributions import constraints as pyro_constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.infer.reparam.reparam import Reparam
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import to_pyro_module_
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import AffineTransform, StickBreakingTransform

from ._checks import no_validation
from .distributions.atlas import AtlasFlowDistribution
from .distributions.embedded import _OnSupport
from .distributions.simplex import SimplexFlowDistribution
from .manifolds.simplex import simplex_hausdorff_log_factor
from .manifolds.sphere import sphere_projection

__all__ = [
    "SphereLift",
    "SimplexPullback",
    "ChartPullback",
    "ChartNormal",
    "ManifoldReparam",
    "ManifoldGuide",
    "manifold_kind",
]

_EMPTY = torch.Size()
_SPHERE = type(pyro_constraints.sphere)
_SIMPLEX = type(constraints.simplex)


def manifold_kind(fn) -> str | None:
    """``"sphere"``, ``"simplex"`` or ``"atlas"`` for a distribution on one of them (its support
    a sphere or simplex constraint, or an exact :class:`~atlasdist.AtlasFlowDistribution`), else
    ``None``."""
    if isinstance(fn, AtlasFlowDistribution):
        return "atlas" if fn.noise_scale is None else None
    support = fn.support
    if isinstance(support, _SPHERE):
        return "sphere"
    if isinstance(support, _SIMPLEX):
        return "simplex"
    return None


class _Punctured(constraints.Constraint):
    r""":math:`\mathbb{R}^n \setminus \{0\}` (``event_dim`` 1). Its bijection from
    :math:`\mathbb{R}^n` is the shift by :math:`(1, \dots, 1)/\sqrt{n}`, so that Pyro's
    ``init_to_feasible`` (the image of 0) starts on the unit sphere, not at the origin where
    the direction is undefined."""

    event_dim = 1

    def __init__(self, features: int):
        self.features = features
        super().__init__()

    def check(self, value):
        return value.norm(dim=-1) > 0


@biject_to.register(_Punctured)
@transform_to.register(_Punctured)
def _shift_to_punctured(constraint):
    return AffineTransform(constraint.features**-0.5, 1.0, event_dim=1)


class _ChartOntoSupport(torch.distributions.Transform):
    r""":math:`\mathbb{R}^D \to` an atlas's support, :math:`y \mapsto g_k(y_{1..d})` through
    the chart :math:`k` of largest weight (inverse: :math:`x \mapsto (f_k(x), 0)`). Only what
    ``transform_to`` needs: Pyro's ``init_to_feasible`` maps 0 through it (to
    :math:`g_k(0)`, where the chart is least distorted) before :class:`ManifoldReparam` sees
    the site."""

    domain = constraints.real_vector
    bijective = False

    def __init__(self, constraint):
        super().__init__()
        atlas = constraint.dist
        weights = atlas.mixture_log_weights.reshape(-1, atlas.num_charts).mean(0)
        self.codomain = constraint
        self.maps = _ChartMaps(atlas, int(weights.argmax()), "transform_to(atlas support)")

    def _call(self, y):
        return self.maps.decode(y[..., : self.maps.atlas.latent_dim])[0]

    def _inverse(self, x):
        z = self.maps.coordinates(x)[0]
        pad = x.shape[-1] - z.shape[-1]
        return torch.cat([z, z.new_zeros(z.shape[:-1] + (pad,))], -1)


@transform_to.register(_OnSupport)
def _chart_to_support(constraint):
    return _ChartOntoSupport(constraint)


def _unwrap(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


class SphereLift(TorchDistribution):
    r"""The radial lift of a distribution :math:`p` on :math:`S^{n-1}` to
    :math:`\mathbb{R}^n \setminus \{0\}`: :math:`u = r x`, :math:`x \sim p`, :math:`r \sim \rho`
    independent, with density (w.r.t. Lebesgue measure)

    .. math::
        \tilde p(u) = p(u / |u|)\, \frac{\rho(|u|)}{|u|^{n-1}}, \qquad
        \rho = \mathrm{LogNormal}(n\sigma^2, \sigma).

    **Exact.** In polar coordinates :math:`du = r^{n-1}\, dr\, dA(x)`, so
    :math:`\tilde p(u)\, du = p(x)\, dA(x)\, \rho(r)\, dr`: :math:`x = u/|u|` has law :math:`p`
    for every normalized :math:`\rho` (``p.log_prob`` must be a density w.r.t. the surface
    measure, as every sphere density in atlasdist and Pyro's ``ProjectedNormal`` are). The
    choice :math:`\mu = n\sigma^2` puts the radial mode of :math:`\tilde p` at :math:`|u| = 1`,
    so a MAP estimate (``AutoDelta``) in :math:`u` stays away from the origin; the direction of
    that MAP is the MAP of :math:`p` times the likelihood on the sphere.

    Arguments:
        base: :math:`p`, event shape :math:`(n,)`, any batch shape.
        radial_scale: :math:`\sigma > 0`.

    Example:
        >>> from atlasdist import UniformSphere
        >>> lift = SphereLift(UniformSphere(3))
        >>> u = lift.sample((4,))
        >>> u.shape, lift.log_prob(u).shape, lift.project(u).norm(dim=-1)
        (torch.Size([4, 3]), torch.Size([4]), tensor([1.0000, 1.0000, 1.0000, 1.0000]))

    Cost: one ``base.log_prob`` (or sample) plus :math:`O(n)` per point.
    """

    arg_constraints: dict = {}

    def __init__(self, base, radial_scale: float = 0.25, validate_args=None):
        if len(base.event_shape) != 1:
            raise ValueError(
                f"SphereLift: base must have event shape (n,), got {tuple(base.event_shape)}"
            )
        if not (isinstance(radial_scale, int | float) and math.isfinite(radial_scale)):
            raise ValueError(
                f"SphereLift: radial_scale must be a finite float, got {radial_scale}"
            )
        if radial_scale <= 0:
            raise ValueError(f"SphereLift: radial_scale must be > 0, got {radial_scale}")
        self.base, self.radial_scale = base, float(radial_scale)
        n = base.event_shape[0]
        self.radial_loc = n * self.radial_scale**2
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def has_rsample(self):
        return self.base.has_rsample

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self):
        return _Punctured(self.event_shape[0])

    def expand(self, batch_shape, _instance=None):
        return SphereLift(self.base.expand(batch_shape), self.radial_scale)

    def log_radial(self, r: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \rho(r)`, the log-normal radial density."""
        s, t = self.radial_scale, r.log()
        return (
            -t
            - math.log(s)
            - 0.5 * math.log(2 * math.pi)
            - (t - self.radial_loc) ** 2 / (2 * s**2)
        )

    def _draw(self, x):
        eps = torch.randn(x.shape[:-1], dtype=x.dtype, device=x.device)
        return x * (self.radial_loc + self.radial_scale * eps).exp().unsqueeze(-1)

    def rsample(self, sample_shape=_EMPTY):
        return self._draw(self.base.rsample(sample_shape))

    def sample(self, sample_shape=_EMPTY):
        with torch.no_grad():
            return self._draw(self.base.sample(sample_shape))

    def log_prob(self, value):
        r = value.norm(dim=-1)
        n = self.event_shape[0]
        return self.base.log_prob(value / r.unsqueeze(-1)) + self.log_radial(r) - (n - 1) * r.log()

    def project(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`x = u / |u|`."""
        return sphere_projection(u)

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        """A point :math:`u` with ``project(u) = x`` (:math:`u = x`)."""
        return x


class SimplexPullback(TorchDistribution):
    r"""A distribution :math:`p` on the open simplex :math:`\Delta^{n-1}` pulled back to
    :math:`\mathbb{R}^{n-1}` by torch's stick-breaking bijection :math:`\phi`
    (``biject_to(constraints.simplex)``):

    .. math::
        \tilde p(u) = p_\mathrm{Leb}(\phi(u))\, |\det J_\phi(u)|,

    with :math:`p_\mathrm{Leb}` the density w.r.t. :math:`dp_1 \cdots dp_{n-1}`
    (:math:`\log p_\mathrm{Leb} = \log p_\mathcal{H} + \frac12 \log n` for a base with
    ``measure="hausdorff"``). Exact: the change of variables of a bijection. (Pyro's autoguides
    already do this for simplex sites; the class makes :class:`ManifoldReparam` uniform.)

    Example:
        >>> from pyro.distributions import Dirichlet
        >>> q = SimplexPullback(Dirichlet(torch.ones(3)))
        >>> u = q.sample((2,))
        >>> u.shape, q.project(u).sum(-1)
        (torch.Size([2, 2]), tensor([1., 1.]))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, base, validate_args=None):
        if len(base.event_shape) != 1 or base.event_shape[0] < 2:
            raise ValueError(
                f"SimplexPullback: base must have event shape (n,), n >= 2, got "
                f"{tuple(base.event_shape)}"
            )
        self.base, self.transform = base, StickBreakingTransform()
        n = base.event_shape[0]
        hausdorff = getattr(base, "measure", "lebesgue") == "hausdorff"
        self._log_factor = simplex_hausdorff_log_factor(n) if hausdorff else 0.0
        super().__init__(base.batch_shape, torch.Size([n - 1]), validate_args=validate_args)

    @property
    def has_rsample(self):
        return self.base.has_rsample

    def expand(self, batch_shape, _instance=None):
        return SimplexPullback(self.base.expand(batch_shape))

    def rsample(self, sample_shape=_EMPTY):
        return self.transform.inv(self.base.rsample(sample_shape))

    def sample(self, sample_shape=_EMPTY):
        with torch.no_grad():
            return self.transform.inv(self.base.sample(sample_shape))

    def log_prob(self, value):
        x = self.transform(value)
        ladj = self.transform.log_abs_det_jacobian(value, x)
        return self.base.log_prob(x) + self._log_factor + ladj

    def project(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`x = \phi(u)`."""
        return self.transform(u)

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`u = \phi^{-1}(x)`."""
        return self.transform.inv(x)


class _ChartMaps:
    """Chart ``chart`` of an atlas as row-wise maps: decode with its log volume, and the left
    inverse with the reconstruction error (existing public atlas methods only)."""

    def __init__(self, atlas: AtlasFlowDistribution, chart: int, name: str):
        if not isinstance(atlas, AtlasFlowDistribution):
            raise TypeError(f"{name}: expected an AtlasFlowDistribution, got {type(atlas)}")
        if atlas.noise_scale is not None:
            raise ValueError(
                f"{name}: the atlas has noise_scale={atlas.noise_scale}, a density on R^D that "
                "autoguides handle as it is; build it with noise_scale=None for the manifold"
            )
        if (
            isinstance(chart, bool)
            or not isinstance(chart, int)
            or not 0 <= chart < atlas.num_charts
        ):
            raise ValueError(
                f"{name}: chart must be an int in [0, {atlas.num_charts}), got {chart!r}"
            )
        self.atlas, self.chart = atlas, chart

    def _maps(self, shape: torch.Size):
        a = self.atlas
        n = math.prod(shape)
        charts = torch.full((n,), self.chart, dtype=torch.long, device=a.logits.device)
        return a.chart_maps(charts, a._conditioning(shape)[1])

    def decode(self, z: torch.Tensor):
        r""":math:`x = g_j(z)` and :math:`\frac12 \log\det J_{g_j}^\top J_{g_j}(z)`."""
        a = self.atlas
        shape = torch.broadcast_shapes(z.shape[:-1], a.batch_shape)
        u = z.expand(shape + z.shape[-1:]).reshape(-1, a.latent_dim)
        flows, emb = self._maps(shape)
        log_det = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        for t in flows:
            v = t(u)
            term = t.log_abs_det_jacobian(u, v)
            log_det = log_det + (term.sum(-1) if t.domain.event_dim == 0 else term)
            u = v
        x, ladj = emb.call_and_ladj(u)
        return x.reshape(shape + (a.ambient_dim,)), (log_det + ladj).reshape(shape)

    def coordinates(self, x: torch.Tensor):
        r""":math:`z = f_j(x)` and :math:`|g_j(f_j(x)) - x|`."""
        a = self.atlas
        shape = torch.broadcast_shapes(x.shape[:-1], a.batch_shape)
        flat = x.expand(shape + x.shape[-1:]).reshape(-1, a.ambient_dim)
        flows, emb = self._maps(shape)
        # A point off chart j (e.g. at its pole) has no coordinates: measured, not raised.
        with no_validation():
            u = emb.inv(flat)
            error = (emb(u) - flat).norm(dim=-1)
            z = u
            for t in reversed(flows):
                z = t.inv(z)
        error = torch.where(torch.isfinite(error), error, torch.full_like(error, math.inf))
        return z.reshape(shape + (a.latent_dim,)), error.reshape(shape)

    def missed_mass(self, num_samples: int) -> torch.Tensor:
        with torch.no_grad():
            x = self.atlas.sample((num_samples,))
            _, error = self.coordinates(x)
            return (~(error <= self.atlas._tolerance(x))).to(x.dtype).mean()


class ChartPullback(TorchDistribution):
    r"""An atlas distribution :math:`p = \sum_k \pi_k (g_k)_\# q` pulled back to the latent
    space of one chart :math:`j`:

    .. math::
        \tilde p(z) = p(g_j(z))\, \sqrt{\det J_{g_j}^\top J_{g_j}(z)}, \qquad z \in \mathbb{R}^d,

    with :math:`p` the atlas's exact mixture density (``log_prob``: every chart whose image
    contains :math:`x` counted) and the closed-form volume term of chart :math:`j` (latent flow
    and conformal embedding). Sampling draws :math:`x \sim p` and returns :math:`f_j(x)`.

    **Exact when chart** :math:`j` **covers the support.** By the area formula,
    :math:`g_j` pushes :math:`\tilde p` forward to :math:`p` restricted to the image
    :math:`S_j`, so :math:`x = g_j(z)` has law :math:`p` iff :math:`P(S_j) = 1`: true for the
    charts of :meth:`~atlasdist.AtlasFlow.spheres` on one sphere (each misses one point) and
    for a chart that is a bijection onto the support; false when the support has parts that
    chart :math:`j` does not reach (disjoint components). :meth:`missed_mass` estimates
    :math:`1 - P(S_j)`. A discrete chart index cannot be given to a Gaussian guide, and fixing
    one covering chart avoids it without approximation: the mixture over charts is inside
    :math:`p`, not in the latent.

    Arguments:
        atlas: an :class:`~atlasdist.AtlasFlowDistribution` without ``noise_scale``.
        chart: :math:`j`.

    Example:
        >>> from atlasdist import AtlasFlow
        >>> poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
        >>> atlas = AtlasFlow.spheres(2, torch.zeros(2, 3), torch.ones(2), poles, layers=1)
        >>> q = ChartPullback(atlas(), 0)
        >>> z = q.sample((5,))
        >>> z.shape, q.log_prob(z).shape, float(q.missed_mass(256))
        (torch.Size([5, 2]), torch.Size([5]), 0.0)

    Cost: ``log_prob`` is one decode through chart :math:`j` and one atlas ``log_prob``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, atlas: AtlasFlowDistribution, chart: int, validate_args=None):
        self.maps = _ChartMaps(atlas, chart, "ChartPullback")
        self.atlas, self.chart = atlas, chart
        super().__init__(
            atlas.batch_shape, torch.Size([atlas.latent_dim]), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        return ChartPullback(self.atlas.expand(batch_shape), self.chart)

    def rsample(self, sample_shape=_EMPTY):
        return self.maps.coordinates(self.atlas.rsample(sample_shape))[0]

    def log_prob(self, value):
        x, log_volume = self.maps.decode(value)
        return self.atlas.log_prob(x) + log_volume

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`x = g_j(z)`."""
        return self.maps.decode(z)[0]

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`z = f_j(x)`; ``ValueError`` if :math:`x` is off chart :math:`j`'s image."""
        z, error = self.maps.coordinates(x)
        off = ~(error <= self.atlas._tolerance(x.expand(error.shape + x.shape[-1:])))
        if bool(off.any()):
            raise ValueError(
                f"ChartPullback: {int(off.sum())} point(s) off the image of chart {self.chart} "
                f"(distance up to {float(error[off].max()):.3g}); choose a chart that covers them"
            )
        return z

    def missed_mass(self, num_samples: int = 4096) -> torch.Tensor:
        r"""Monte Carlo estimate of :math:`1 - P(S_j)`: the fraction of ``num_samples`` atlas
        draws off chart :math:`j`'s image (zero when the pullback is exact)."""
        return self.maps.missed_mass(num_samples)


class ManifoldReparam(Reparam):
    r"""Reparameterizer (``poutine.reparam``) for latent sites whose prior is on a sphere, a
    simplex or an atlas: the site :math:`x \sim p` becomes ``{name}_unconstrained``
    :math:`u \sim \tilde p` on :math:`\mathbb{R}^m` and a deterministic :math:`x = \phi(u)`,
    with :math:`\tilde p` = :class:`SphereLift`, :class:`SimplexPullback` or
    :class:`ChartPullback` (see their exactness statements: in each case :math:`\phi(u)` has
    law :math:`p`, so the model's marginal over :math:`x` is unchanged). All density bookkeeping
    is in :math:`\tilde p`'s ``log_prob``; the site :math:`x` becomes a ``Delta`` with no log
    density, as in Pyro's ``ProjectedNormalReparam``. Pyro's ``AutoNormal``,
    ``AutoMultivariateNormal`` and ``AutoDelta`` then fit :math:`u`.

    For an atlas, ``chart`` is :math:`j` (default: the chart of largest mixture weight); at the
    first use per site, :meth:`ChartPullback.missed_mass` is estimated from
    ``coverage_samples`` draws and a ``ValueError`` is raised if any draw is off chart
    :math:`j` (the pullback would not be the prior). Works for latent sites only.

    **MAP (``AutoDelta``).** A MAP estimate depends on the coordinates. On a sphere the lift's
    radial factor separates, so the MAP direction is the manifold's own; on an atlas the
    reparameterized MAP is that of the chart coordinates (the volume term tilts it). For the
    MAP on the atlas w.r.t. its volume measure, run ``AutoDelta`` on the original model
    (importing this module registers ``transform_to`` for the atlas's support, through the
    chart of largest weight).

    Arguments:
        chart: the atlas chart :math:`j`, or ``None``.
        radial_scale: :math:`\sigma` of :class:`SphereLift`.
        check_coverage: whether to check the atlas chart's coverage.
        coverage_samples: draws for that check.

    Example:
        >>> import pyro
        >>> from pyro import poutine
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from atlasdist import SphereFlow
        >>> prior = SphereFlow(3)
        >>> def model():
        ...     return pyro.sample("x", prior())
        >>> model = poutine.reparam(model, config={"x": ManifoldReparam()})
        >>> guide = AutoNormal(model)
        >>> guide()["x_unconstrained"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        chart: int | None = None,
        radial_scale: float = 0.25,
        check_coverage: bool = True,
        coverage_samples: int = 4096,
    ):
        self.chart, self.radial_scale = chart, radial_scale
        self.check_coverage, self.coverage_samples = check_coverage, int(coverage_samples)
        self._checked: set[str] = set()

    def unconstrained(self, fn, name: str = "x"):
        r""":math:`\tilde p` for a manifold distribution ``fn`` (``TypeError`` otherwise)."""
        kind = manifold_kind(fn)
        if kind == "sphere":
            return SphereLift(fn, self.radial_scale)
        if kind == "simplex":
            return SimplexPullback(fn)
        if kind == "atlas":
            chart = self.chart
            if chart is None:
                weights = fn.mixture_log_weights.reshape(-1, fn.num_charts).mean(0)
                chart = int(weights.argmax())
            pullback = ChartPullback(fn, chart)
            if self.check_coverage and name not in self._checked:
                missed = float(pullback.missed_mass(self.coverage_samples))
                if missed > 0:
                    raise ValueError(
                        f"ManifoldReparam: site {name!r}: {missed:.3g} of {self.coverage_samples}"
                        f" prior draws lie off the image of chart {chart}, so the pullback "
                        "through it would not be the prior; pass chart=<a chart whose image "
                        "covers the support>, or check_coverage=False if the misses are "
                        "rounding at the chart's pole"
                    )
                self._checked.add(name)
            return pullback
        raise TypeError(
            f"ManifoldReparam: site {name!r} has a {type(fn).__name__}, not a distribution on "
            "a sphere, a simplex or an exact atlas (AtlasFlowDistribution with noise_scale="
            "None); reparameterize only such sites (poutine.reparam config={name: ...})"
        )

    def apply(self, msg):
        name, fn, value, is_observed = msg["name"], msg["fn"], msg["value"], msg["is_observed"]
        if is_observed:
            raise ValueError(
                f"ManifoldReparam: site {name!r} is observed; it reparameterizes latent sites "
                "only (leave observed sites out of the config)"
            )
        event_dim = fn.event_dim
        lifted = self.unconstrained(_unwrap(fn), name)
        value_u = None if value is None else lifted.lift(value)
        u = pyro.sample(
            f"{name}_unconstrained",
            lifted.to_event(event_dim - 1) if event_dim > 1 else lifted,
            obs=value_u,
            infer={"is_observed": is_observed},
        )
        if value is None:
            value = lifted.project(u)
        new_fn = dist.Delta(value, event_dim=event_dim).mask(False)
        return {"fn": new_fn, "value": value, "is_observed": True}


class ChartNormal(TorchDistribution):
    r"""A normal distribution in the latent space of atlas chart :math:`j`, pushed onto the
    manifold: :math:`x = g_j(z)`, :math:`z \sim \mathcal{N}(m, \mathrm{diag}(s^2))`, with the
    density w.r.t. the :math:`d`-dimensional volume on :math:`S_j` (the atlas's measure)

    .. math::
        \log p(x) = \log \mathcal{N}(f_j(x); m, s^2) - \tfrac12\log\det J_{g_j}^\top J_{g_j}
        (f_j(x)),

    :math:`-\infty` off chart :math:`j`'s image (``ValueError`` under ``validate_args``).

    Arguments:
        atlas: an :class:`~atlasdist.AtlasFlowDistribution` without ``noise_scale``.
        chart: :math:`j`.
        loc, scale: :math:`m` and :math:`s > 0`, shape :math:`(*B, d)`.
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, atlas, chart: int, loc, scale, validate_args=None):
        self.maps = _ChartMaps(atlas, chart, "ChartNormal")
        self.atlas, self.chart = atlas, chart
        self.loc, self.scale = loc, scale
        batch = torch.broadcast_shapes(loc.shape[:-1], scale.shape[:-1], atlas.batch_shape)
        super().__init__(batch, torch.Size([atlas.ambient_dim]), validate_args=validate_args)

    @property
    def support(self):
        return self.atlas.support

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        return ChartNormal(
            self.atlas, self.chart, self.loc.expand(shape), self.scale.expand(shape)
        )

    def rsample(self, sample_shape=_EMPTY):
        shape = torch.Size(sample_shape) + self.batch_shape + self.loc.shape[-1:]
        z = self.loc + self.scale * torch.randn(
            shape, dtype=self.loc.dtype, device=self.loc.device
        )
        return self.maps.decode(z)[0]

    def log_prob(self, value):
        z, error = self.maps.coordinates(value)
        _, log_volume = self.maps.decode(z)
        off = ~(error <= self.atlas._tolerance(value.expand(error.shape + value.shape[-1:])))
        if self._validate_args and bool(off.any()):
            raise ValueError(
                f"ChartNormal: {int(off.sum())} value(s) off the image of chart {self.chart} "
                f"(distance up to {float(error[off].max()):.3g})"
            )
        lp = dist.Normal(self.loc, self.scale).log_prob(z).sum(-1) - log_volume
        return lp.masked_fill(off, -math.inf)


class ManifoldGuide(AutoGuide):
    r"""A learnable guide on the manifold itself for every latent site of ``model`` whose prior
    is on a sphere, a simplex or an atlas, each with its own parameters per batch element:

    - sphere :math:`S^{n-1}`, :math:`n \le 4`: Pyro's ``ProjectedNormal`` with concentration
      vector :math:`c = e^{\ell}\, m / |m|` (direction :math:`m`, log-norm :math:`\ell`, so
      the concentration grows geometrically under Adam; angular spread
      :math:`\approx 1/|c|`), initialised at the site's initial value with
      :math:`|c|` = ``init_concentration``;
    - simplex: a ``Dirichlet`` with :math:`\alpha = e^{\beta}`, initialised at
      :math:`\alpha = n\,` ``init_concentration`` :math:`x_0`, read w.r.t. the prior's measure
      (:class:`~atlasdist.distributions.SimplexFlowDistribution`);
    - atlas: :class:`ChartNormal` in chart :math:`j` (``chart``, default the chart of largest
      weight), initialised at :math:`f_j(x_0)` with scale 1 / ``init_concentration``. The
      guide keeps the prototype's atlas distribution: fine for an unconditional atlas (its
      parameters are the module's, updated in place); not for a conditional one.

    Every guide density is w.r.t. the prior's measure, so the ELBO is exact. Other sites raise
    ``ValueError``: combine with ``AutoNormal`` in an ``AutoGuideList`` (blocking the manifold
    sites from it). Subsampled plates are not supported.

    Arguments:
        model: a Pyro model.
        init_concentration: see above.
        chart: atlas chart :math:`j` or ``None``.
        init_loc_fn: Pyro initialisation (default: a prior sample).

    Example:
        >>> import pyro
        >>> from atlasdist import SphereFlow
        >>> prior = SphereFlow(3)
        >>> def model():
        ...     return pyro.sample("x", prior())
        >>> guide = ManifoldGuide(model, init_concentration=5.0)
        >>> x = guide()["x"]
        >>> x.shape, torch.isclose(x.norm(), torch.tensor(1.0)).item()
        (torch.Size([3]), True)
    """

    def __init__(
        self,
        model,
        *,
        init_concentration: float = 2.0,
        chart: int | None = None,
        init_loc_fn=init_to_sample,
        create_plates=None,
    ):
        if not init_concentration > 0:
            raise ValueError(
                f"ManifoldGuide: init_concentration must be > 0, got {init_concentration}"
            )
        self.init_concentration, self.chart = float(init_concentration), chart
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.params = PyroModule()
        self._kinds, self._charts = {}, {}
        c0 = self.init_concentration
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = _unwrap(site["fn"])
            kind = manifold_kind(fn)
            x0 = site["value"].detach()
            if kind is None:
                raise ValueError(
                    f"ManifoldGuide: site {name!r} has a {type(fn).__name__}, not a prior on a "
                    "sphere, a simplex or an atlas; guide it with AutoNormal in an AutoGuideList"
                )
            n = x0.shape[-1]
            if kind == "sphere":
                if n not in dist.ProjectedNormal._log_prob_impls:
                    raise ValueError(
                        f"ManifoldGuide: site {name!r} is on S^{n - 1}; ProjectedNormal has a "
                        f"log_prob for n in {sorted(dist.ProjectedNormal._log_prob_impls)} only: "
                        "use ManifoldReparam with AutoNormal"
                    )
                init = {"direction": x0, "log_norm": torch.full_like(x0[..., 0], math.log(c0))}
            elif kind == "simplex":
                init = {"log_alpha": (n * c0 * x0).log()}
            else:
                chart = self.chart
                if chart is None:
                    weights = fn.mixture_log_weights.reshape(-1, fn.num_charts).mean(0)
                    chart = int(weights.argmax())
                self._charts[name] = (fn, chart)
                z0 = ChartPullback(fn, chart).lift(x0)
                init = {"loc": z0, "log_scale": torch.full_like(z0, -math.log(c0))}
            self._kinds[name] = kind
            module = PyroModule()
            for key, value in init.items():
                setattr(module, key, PyroParam(value.clone()))
            setattr(self.params, name.replace(".", "_"), module)
        to_pyro_module_(self.params)

    def distribution(self, name: str):
        """The current guide distribution of site ``name`` (event shape of the manifold)."""
        p = getattr(self.params, name.replace(".", "_"))
        kind = self._kinds[name]
        if kind == "sphere":
            return dist.ProjectedNormal(
                p.log_norm.exp().unsqueeze(-1) * sphere_projection(p.direction)
            )
        if kind == "simplex":
            prior = _unwrap(self.prototype_trace.nodes[name]["fn"])
            measure = getattr(prior, "measure", "lebesgue")
            return SimplexFlowDistribution(dist.Dirichlet(p.log_alpha.exp()), [], measure)
        atlas, chart = self._charts[name]
        return ChartNormal(atlas, chart, p.loc, p.log_scale.exp())

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                fn = self.distribution(name)
                extra = site["fn"].event_dim - 1
                result[name] = pyro.sample(name, fn.to_event(extra) if extra else fn)
        return result
