r"""An exact mixture of injective flows over a chart atlas (reference/000, eq. 1-2).

Chart :math:`k` maps latent :math:`z \in \mathbb{R}^d` to :math:`x = g_k(z) = c_k(h_k(z))` with
a bijective flow :math:`h_k` and an injective conformal embedding :math:`c_k`, both conditioned
on the chart's context (by default its centre :math:`v_k`), so that all charts share weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransform
from torch.distributions import Categorical, Transform

from .._checks import (
    check_batch,
    check_features,
    check_floating,
    check_parameter,
    check_sample_shape,
    no_validation,
    validation_enabled,
)
from ..charts.specs import as_charts
from ..geometry import batched_jacobian
from ..transforms import ChartContext, condition
from ..transforms.cache import cached, chart_cache_scope
from .embedded import EmbeddedDistribution, latent_dim_of

__all__ = ["AtlasFlowDistribution"]

_EMPTY = torch.Size()


def _in_cache_scope(method):
    # Per-chart quantities computed inside may be kept between calls (transforms.cache).
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with chart_cache_scope(self.cache):
            return method(self, *args, **kwargs)

    return wrapper


class AtlasFlowDistribution(EmbeddedDistribution):
    r"""Mixture of injective flows over an atlas of :math:`K` charts,
    :math:`P = \sum_k \pi_k (g_k)_\# q`, with the exact density

    .. math::
        p(x) = \sum_{k:\, x \in S_k} \pi_k\, p_k(x), \qquad
        \log p_k(x) = \log q(z) - \log|\det J_{h_k}(z)| - d \log\lambda_k(h_k(z)),
        \quad z = f_k(x),

    w.r.t. the :math:`d`-dimensional volume (Hausdorff) measure on the support
    :math:`\bigcup_k S_k`, :math:`S_k = g_k(\mathbb{R}^d)`. (For a non-conformal embedding the
    last term is its :math:`\frac12\log\det J^\top J`.)

    **Which charts are summed.** Candidates come from the chart membership (``cap`` charts
    per point, nearest centres in code space); a candidate counts when :math:`x` lies on its
    image, :math:`|g_k(f_k(x)) - x| \le \text{atol}\,(1 + |x|)`. The sum is the exact density
    whenever the candidates include every chart whose image contains :math:`x`: always when
    ``cap`` :math:`\ge K`, and when the chart images are confined to their regions (e.g.
    disjoint components). :meth:`missed_mass` estimates, by sampling, the probability mass
    whose generating chart is not proposed; it bounds the normalization error otherwise. A
    sum over charts that do not contain :math:`x`, each at its own projection of :math:`x`,
    would count mass several times and is never used.

    **Off the support.** :meth:`project` gives the nearest chart image point and its
    distance; with ``noise_scale`` :math:`\sigma`, the model is the mixture of thickened
    charts (what ``sample`` draws: :math:`x = g_k(z) + \sigma\,\nu`, :math:`\nu` standard
    normal in the :math:`D - d` directions normal to chart :math:`k`), and ``log_prob`` is
    its density on :math:`\mathbb{R}^D`

    .. math::
        p_\sigma(x) = \sum_{k} \pi_k\, p_k(\hat x_k)\,
        \mathcal{N}(|x - \hat x_k|; 0, \sigma^2 I_{D-d}), \qquad \hat x_k = g_k(f_k(x)),

    with :math:`\hat x_k` chart :math:`k`'s projection (its own left inverse: the nearest
    point for flat and spherical charts). Where the chart images coincide (or are disjoint)
    near :math:`x` this is :math:`p(\pi(x))\,\mathcal{N}(x - \pi(x); 0, \sigma^2 I_{D-d})`.
    It is normalized only approximately: exactly for flat charts, up to
    :math:`O(\sigma^2 \kappa^2)` for curvature :math:`\kappa` (a tube's volume differs from
    the product measure). Without ``noise_scale``, ``log_prob`` of an off-support point is
    :math:`-\infty`, or a ``ValueError`` giving its distance under ``validate_args``.

    **Conditional atlas** :math:`p(x \mid c)`. With ``logits`` of shape :math:`(*B, K)` the
    mixture weights :math:`\pi_k(c)` differ per batch element; with ``inputs`` of shape
    :math:`(*B, e)` (features of :math:`c`) the latent flows are conditioned on
    :math:`[v_k, e]`, chart features and inputs (:class:`~atlasdist.transforms.ChartContext`),
    so :math:`h_k = h_k(\cdot\,; c)`. The charts (the manifold) and the membership do not
    depend on :math:`c`. The batch shape is :math:`(*B)`; every formula above holds for each
    :math:`c`, so each batch element is an exact, normalized density.

    **Gradients.** ``rsample`` is pathwise for every continuous parameter (base, flows,
    embeddings, contexts/centres); the chart index is discrete, so the mixture logits get no
    gradient from ``rsample`` (train them through ``log_prob``).

    Cost: ``log_prob`` evaluates ``cap`` charts per point (one batched call of the
    conditioned flows over all (point, candidate) pairs); ``sample`` evaluates only the
    drawn chart of each draw. Work that depends only on the chart (embedding frames, poles,
    scales, shifts, the chart part of the latent flows' networks) is done once per chart per
    call and gathered by chart index (:class:`~atlasdist.transforms.ChartContext`); with
    ``cache``, evaluation without gradients keeps that work between calls while the
    parameters do not change (:mod:`atlasdist.transforms.cache`).

    Arguments:
        base: :math:`q`, a distribution with event shape :math:`(d,)` and batch shape ``()``.
        flows: the latent flow :math:`h` as transforms of :math:`\mathbb{R}^d`, first applied
            first; conditional ones (Pyro ``ConditionalTransformModule``) are conditioned on
            the chart context.
        charts: the embeddings :math:`c_k`: a :class:`~atlasdist.charts.ChartStack`, a
            :class:`~atlasdist.charts.ChartSpec` (or a list of them), a conditional embedding
            (conditioned on the chart context) or one
            :class:`~atlasdist.transforms.InjectiveTransform` shared by all charts.
        centres: chart centres :math:`v_k` in code space, shape :math:`(K, c)`.
        logits: mixture logits, shape :math:`(K,)`, or :math:`(*B, K)` for weights that
            depend on a conditioning input.
        membership: a :class:`~atlasdist.charts.ChartMembership`.
        context: conditioning context of each chart, shape :math:`(K, c')`; default
            ``centres``.
        chart_code: optional map of the contexts to the chart features the flows and charts
            are conditioned on (e.g. a learned linear projection), applied once per call.
        inputs: per-batch-element features that condition the latent flows, shape
            :math:`(*B, e)`, or ``None``.
        atol: on-image tolerance (relative to :math:`1 + |x|`); default :math:`10^{-4}` in
            float32 and :math:`10^{-6}` in float64 (loose enough for data normalized in float32
            and cast to float64, like :func:`~atlasdist.manifolds.sphere_tolerance`).
        noise_scale: :math:`\sigma` of the thickened density, or ``None`` (exact density).
        cache: the ``nn.Module`` holding every parameter and buffer the flows, charts,
            contexts and chart code depend on (an :class:`~atlasdist.AtlasFlow` passes
            itself), so per-chart quantities are kept between calls while they do not
            change (:mod:`atlasdist.transforms.cache`); ``None``: computed on every call.

    Example:
        >>> from atlasdist import AtlasFlow
        >>> p = AtlasFlow(D=3, d=2, charts=4).flow()
        >>> x = p.sample((5,))
        >>> x.shape, p.log_prob(x).shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        base: torch.distributions.Distribution,
        flows: Sequence,
        charts,
        centres: torch.Tensor,
        logits: torch.Tensor,
        membership,
        context: torch.Tensor | None = None,
        chart_code=None,
        inputs: torch.Tensor | None = None,
        atol: float | None = None,
        noise_scale: float | None = None,
        batch_shape: torch.Size | None = None,
        validate_args: bool | None = None,
        cache: torch.nn.Module | None = None,
    ):
        d = latent_dim_of(base)
        if centres.dim() != 2:
            raise ValueError(f"centres must have shape (K, c), got {tuple(centres.shape)}")
        num_charts = centres.shape[0]
        check_features(logits, num_charts, "AtlasFlowDistribution", "logits")
        if inputs is not None and inputs.dim() < 1:
            raise ValueError("AtlasFlowDistribution: inputs must have shape (*B, e), got ()")
        if batch_shape is None:
            batch_shape = torch.broadcast_shapes(
                logits.shape[:-1], () if inputs is None else inputs.shape[:-1]
            )
        context = centres if context is None else context
        if context.dim() != 2 or context.shape[0] != num_charts:
            raise ValueError(
                f"context must have shape ({num_charts}, c'), got {tuple(context.shape)}"
            )
        if noise_scale is not None:
            check_parameter(noise_scale, "noise_scale", "AtlasFlowDistribution", positive=True)
        if atol is not None:
            check_parameter(atol, "atol", "AtlasFlowDistribution", nonnegative=True)
        for i, part in enumerate(flows):
            if not isinstance(part, Transform | ConditionalTransform):
                raise TypeError(f"flows[{i}] is not a (conditional) transform: {type(part)}")
        charts = as_charts(charts, num_charts)
        if charts.num_charts != num_charts:
            raise ValueError(
                f"the charts number {charts.num_charts}, the centres and logits {num_charts}"
            )
        self.base, self.flows, self.charts = base, list(flows), charts
        self.centres, self.logits, self.context = centres, logits, context
        self.chart_code, self.inputs = chart_code, inputs
        self.membership, self.cache = membership, cache
        self.latent_dim = d
        self.atol, self.noise_scale = atol, noise_scale
        self.ambient_dim = charts.out_features
        if charts.in_features != d:
            raise ValueError(
                f"the embedding takes {charts.in_features} latent features, the base has {d}"
            )
        super().__init__(
            batch_shape=torch.Size(batch_shape),
            event_shape=torch.Size([self.ambient_dim]),
            validate_args=validate_args,
        )

    # -- structure -----------------------------------------------------------------------

    @property
    def num_charts(self) -> int:
        return self.centres.shape[0]

    @property
    def mixture_log_weights(self) -> torch.Tensor:
        r""":math:`\log \pi_k`, shape :math:`(K,)` (or :math:`(*B, K)` when they depend on a
        conditioning input)."""
        return self.logits.log_softmax(-1)

    def _conditioning(self, shape: torch.Size):
        """Per-row mixture log weights (N, K) (or (K,) when shared) and flow inputs (N, e) (or
        None) for the N = prod(shape) flat rows of a batch of that shape."""
        log_weights = self.mixture_log_weights
        if log_weights.dim() > 1:
            log_weights = log_weights.expand(shape + log_weights.shape[-1:]).reshape(
                -1, self.num_charts
            )
        inputs = self.inputs
        if inputs is not None:
            inputs = inputs.expand(shape + inputs.shape[-1:]).reshape(-1, inputs.shape[-1])
        return log_weights, inputs

    @_in_cache_scope
    def chart_maps(self, charts: torch.Tensor, inputs: torch.Tensor | None = None):
        r"""The latent flow :math:`h` and embedding :math:`c` of the given charts, conditioned
        row-wise: ``charts`` of shape :math:`(N,)` (and the latent flows' per-row ``inputs``
        :math:`(N, e)`) gives transforms acting on :math:`(N, \cdot)`. Per-chart quantities
        are computed once for the :math:`K` charts and gathered by ``charts``.
        """
        features = self._chart_features()
        return self._latent_flows(features, charts, inputs), self._embedding(features, charts)

    def _chart_features(self) -> torch.Tensor:
        # The features that condition the flows and charts, (K, f): once per call.
        if self.chart_code is None:
            return self.context
        return cached(
            self.chart_code, "features", (self.context,), lambda: self.chart_code(self.context)
        )

    def _latent_flows(self, features, charts, inputs, rows=None):
        # With ``rows``: the flows of those rows only, their per-chart quantities computed for
        # the charts of all the rows (ChartContext.subset), so their values are bitwise those
        # of the flows of all the rows.
        ctx = ChartContext(features, charts, inputs)
        if rows is not None:
            ctx = ctx.subset(rows)
        return [condition(part, ctx) for part in self.flows]

    def _embedding(self, features, charts):
        return self.charts.embedding(ChartContext(features, charts))

    # -- sampling ------------------------------------------------------------------------

    def decode(self, z: torch.Tensor, charts: torch.Tensor) -> torch.Tensor:
        r""":math:`x = g_k(z)`: ``z`` :math:`(*, d)`, ``charts`` :math:`(*)` :math:`\to (*, D)`
        (:math:`(*)` broadcast with the batch shape for a conditional atlas)."""
        shape = torch.broadcast_shapes(z.shape[:-1], charts.shape, self.batch_shape)
        return self._decode_flat(
            z.expand(shape + z.shape[-1:]).reshape(-1, self.latent_dim),
            charts.expand(shape).reshape(-1),
            self._conditioning(shape)[1],
        ).reshape(shape + (self.ambient_dim,))

    @_in_cache_scope
    def _decode_flat(self, flat_z, charts, inputs):
        flows, emb = self.chart_maps(charts, inputs)
        u = flat_z
        for t in flows:
            u = t(u)
        return emb(u)

    def rsample_with_charts(self, sample_shape=_EMPTY):
        r"""Draws :math:`k \sim \pi`, :math:`z \sim q`, :math:`x = g_k(z)`; returns
        ``(x, k)`` of shapes ``sample_shape + batch_shape + (D,)`` and ``... + ()``."""
        shape = self._extended_shape(check_sample_shape(sample_shape, "AtlasFlowDistribution"))
        n = math.prod(shape[:-1])
        if n == 0:  # an empty sample
            x = self.logits.new_zeros(shape)
            return x, torch.zeros(shape[:-1], dtype=torch.long, device=x.device)
        log_weights, inputs = self._conditioning(shape[:-1])
        if log_weights.dim() == 1:
            charts = Categorical(logits=log_weights).sample((n,))
        else:
            charts = Categorical(logits=log_weights).sample()
        z = self.base.rsample((n,))
        x = self._decode_flat(z, charts, inputs)
        if self.noise_scale is not None:
            x = x + self.noise_scale * self._normal_noise(z, charts, inputs)
        return x.reshape(shape), charts.reshape(shape[:-1])

    def _normal_noise(self, z, charts, inputs):
        # Isotropic noise in the (D - d)-dimensional normal space of the chart at g_k(z).
        jac = batched_jacobian(lambda w: self._decode_flat(w, charts, inputs), z.detach())
        q = torch.linalg.qr(jac, mode="complete").Q[..., self.latent_dim :]
        eps = torch.randn(q.shape[:-2] + q.shape[-1:], dtype=z.dtype, device=z.device)
        return (q @ eps.unsqueeze(-1)).squeeze(-1)

    def rsample(self, sample_shape=_EMPTY):
        return self.rsample_with_charts(sample_shape)[0]

    def sample(self, sample_shape=_EMPTY):
        with torch.no_grad():
            return self.rsample(sample_shape)

    # -- evaluation over (point, candidate chart) pairs ----------------------------------

    def _check_value(self, x: torch.Tensor) -> torch.Tensor:
        check_floating(x, "AtlasFlowDistribution", "value", like=self.logits)
        check_features(x, self.ambient_dim, "AtlasFlowDistribution", "value")
        if validation_enabled() and not bool(torch.isfinite(x).all()):
            raise ValueError("AtlasFlowDistribution: value holds NaN or infinite entries")
        return x

    def _latent_log_prob(self, u: torch.Tensor, flows: list):
        r"""Inverts the latent flow once: :math:`z = h^{-1}(u)` and
        :math:`\log q(z) - \log|\det J_h(z)|`, the density of :math:`u = h(z)`."""
        z, log_det = u, 0.0
        for t in reversed(flows):
            previous = t.inv(z)
            term = t.log_abs_det_jacobian(previous, z)
            log_det = log_det + (term.sum(-1) if t.domain.event_dim == 0 else term)
            z = previous
        if getattr(self.base, "_validate_args", False) and not bool(torch.isfinite(z).all()):
            # The chart coordinates were finite: the latent flows made the NaN (their
            # parameters), which the base distribution's own check would call a bad value.
            raise ValueError(
                "AtlasFlowDistribution: the latent flows map chart coordinates to NaN or "
                "infinite values: the model's flow parameters hold NaN or infinite entries, "
                "or the flows overflow"
            )
        return z, self.base.log_prob(z) - log_det

    @_in_cache_scope
    def _pairs(self, x: torch.Tensor, shape: torch.Size, on_image_only: bool = False):
        """Evaluates every (point, candidate chart) pair of flat points ``x`` (N, D), a batch of
        shape ``shape``, in one batched pass; returns per-pair tensors of shape (N, C, ...).

        With ``on_image_only`` (the exact density) the latent flows run only on the pairs
        whose point lies in the chart's region and on its image (the embedding decides that,
        for every pair, before any latent flow runs); the other pairs, which carry no density,
        get ``z`` NaN and ``log_joint`` -inf, and ``recon`` is None. The exact density is the
        same; a point on one chart's image costs one latent-flow pass instead of one per
        candidate."""
        charts, region = self.membership.candidates(x, self.centres)
        n, c = charts.shape
        if n == 0:  # an empty batch (Pyro's couplings cannot reshape zero rows)
            return {
                "charts": charts,
                "region": region,
                "z": x.new_zeros(0, c, self.latent_dim),
                "recon": x.new_zeros(0, c, self.ambient_dim),
                "error": x.new_zeros(0, c),
                "log_joint": x.new_zeros(0, c),
                "on_image": region,
            }
        # The point of each pair, (N * C, D): a copy, made only where rows must be compared.
        xs = None if on_image_only else x.repeat_interleave(c, 0)
        log_weights, inputs = self._conditioning(shape)
        if inputs is not None:
            inputs = inputs.repeat_interleave(c, 0)
        flat_charts = charts.reshape(-1)
        features = self._chart_features()
        emb = self._embedding(features, flat_charts)
        # Points outside a chart's domain (a stereographic pole, a Möbius pole) are not on
        # that chart's image: the atlas decides membership itself, so layer checks are off.
        # Only the exact density is needed: the embedding finds each pair's distance to the
        # chart image without reconstructing the point (InjectiveTransform.inverse_and_error).
        recon_needed = not on_image_only
        with no_validation():
            if recon_needed:
                u = emb.inv(xs)
            else:  # the pairs' rows are read from x, not from the copies in xs
                u, error, ladj_embedding = emb.inverse_and_error(x, repeats=c)
            # A point at the pole of a chart's left inverse has no chart coordinates: its pair
            # is evaluated at a harmless stand-in (the chart's image of z = 0) and then marked
            # "not on this chart" (error inf, density 0), so no NaN reaches values or gradients.
            defined = torch.isfinite(u).all(-1)
            all_defined = bool(defined.all())
            if not all_defined:
                anchor = emb(torch.zeros_like(u)).detach()
                if not bool(torch.isfinite(anchor).all()):
                    raise ValueError(
                        "AtlasFlowDistribution: the charts map z = 0 to NaN or infinite points; "
                        "the model's chart parameters hold NaN or infinite entries"
                    )
                xs = x.repeat_interleave(c, 0) if xs is None else xs
                stand_in = torch.where(defined.unsqueeze(-1), xs, anchor)
                if recon_needed:
                    u = emb.inv(stand_in)
                else:
                    u, error, ladj_embedding = emb.inverse_and_error(stand_in)
            if recon_needed:
                recon, ladj_embedding = emb.call_and_ladj(u)
        if recon_needed:
            error = (recon - xs).norm(dim=-1)
        if not all_defined:
            error = error.masked_fill(~defined, math.inf)
        # The tolerance depends on |x| only: once per point, not per pair.
        near = region & (error.reshape(n, c) <= self._tolerance(x).unsqueeze(-1))
        near = near.reshape(-1)
        with no_validation():
            if on_image_only and not bool(near.all()):
                keep = near.nonzero().squeeze(-1)
                z = u.new_full(u.shape[:-1] + (self.latent_dim,), math.nan)
                log_latent = u.new_full(u.shape[:-1], -math.inf)
                if keep.numel():
                    flows = self._latent_flows(features, flat_charts, inputs, rows=keep)
                    z_kept, log_kept = self._latent_log_prob(u.index_select(0, keep), flows)
                    z = z.index_copy(0, keep, z_kept)
                    log_latent = log_latent.index_copy(0, keep, log_kept)
            else:
                flows = self._latent_flows(features, flat_charts, inputs)
                z, log_latent = self._latent_log_prob(u, flows)
        log_chart = (log_latent - ladj_embedding).masked_fill(~defined, -math.inf)
        if not all_defined:
            z = z.masked_fill(~defined.unsqueeze(-1), math.nan)
            if recon_needed:
                recon = recon.masked_fill(~defined.unsqueeze(-1), math.nan)
        return {
            "charts": charts,
            "region": region,
            "z": z.reshape(n, c, self.latent_dim),
            "recon": recon.reshape(n, c, self.ambient_dim) if recon_needed else None,
            "error": error.reshape(n, c),
            "log_joint": (
                (log_weights[charts] if log_weights.dim() == 1 else log_weights.gather(1, charts))
                + log_chart.reshape(n, c)
            ),
            "on_image": (near & torch.isfinite(log_chart)).reshape(n, c),
        }

    def _flat(self, x: torch.Tensor):
        x = self._check_value(x)
        shape = check_batch(x.shape[:-1], self.batch_shape, "AtlasFlowDistribution")
        x = x.expand(shape + (self.ambient_dim,))
        return x.reshape(-1, self.ambient_dim), shape

    def _exact_log_prob(self, flat, shape, raise_off_support: bool) -> torch.Tensor:
        pairs = self._pairs(flat, shape, on_image_only=True)
        log_joint = pairs["log_joint"].masked_fill(~pairs["on_image"], -math.inf)
        lp = log_joint.logsumexp(-1)
        if raise_off_support:
            if bool(torch.isnan(lp).any()):
                raise ValueError(
                    "AtlasFlowDistribution: log_prob is NaN; the model's parameters (mixture "
                    "logits, flows or charts) hold NaN or infinite entries"
                )
            off = ~pairs["on_image"].any(-1)
            if bool(off.any()):
                dist = (
                    pairs["error"].detach().masked_fill(~pairs["region"], math.inf).min(-1).values
                )
                raise ValueError(
                    f"AtlasFlowDistribution: {int(off.sum())} points lie off the model's "
                    f"support (distance to the nearest candidate chart image up to "
                    f"{float(dist[off].max()):.3g}, tolerance "
                    f"{float(self._tolerance(flat)[off].max()):.3g})"
                )
        return lp

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log density of ``value`` (shape ``(*, D)``), see the class docstring for the
        measure; returns shape ``broadcast(*, batch_shape)``."""
        flat, shape = self._flat(value)
        if self.noise_scale is None:
            lp = self._exact_log_prob(flat, shape, raise_off_support=bool(self._validate_args))
            return lp.reshape(shape)
        pairs = self._pairs(flat, shape)
        codim = self.ambient_dim - self.latent_dim
        sigma = self.noise_scale
        log_normal = -0.5 * codim * math.log(2 * math.pi * sigma**2) - pairs["error"].pow(2) / (
            2 * sigma**2
        )
        terms = (pairs["log_joint"] + log_normal).masked_fill(~pairs["region"], -math.inf)
        return terms.logsumexp(-1).reshape(shape)

    def chart_terms(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""Per-candidate terms of each point, each chart at its *own* projection of the point:
        ``charts``, ``region`` (in :math:`U_k`), ``z`` (:math:`f_k(x)`), ``recon``
        (:math:`g_k(f_k(x))`), ``error`` (:math:`|x - g_k(f_k(x))|`), ``log_joint``
        (:math:`\log\pi_k + \log p_k(g_k(f_k(x)))`) and ``on_image``; shapes
        :math:`(*, C, \dots)`. A point at the pole of a chart's left inverse (e.g. a Möbius
        pole) has no coordinates in that chart: ``z`` and ``recon`` are NaN, ``error`` is
        :math:`\infty` and ``log_joint`` :math:`-\infty` there.

        These are training and diagnostic quantities: summed over charts that do not contain
        :math:`x` they count mass several times, so their log-sum-exp is *not* a normalized
        density (that is :meth:`log_prob`).
        """
        flat, shape = self._flat(value)
        return {k: v.reshape(shape + v.shape[1:]) for k, v in self._pairs(flat, shape).items()}

    # -- off the support -----------------------------------------------------------------

    def _project_flat(self, flat, shape):
        pairs = self._pairs(flat, shape)
        error = pairs["error"].masked_fill(~pairs["region"], math.inf)
        best = error.argmin(-1, keepdim=True)
        recon = pairs["recon"].gather(1, best.unsqueeze(-1).expand(-1, 1, self.ambient_dim))
        return recon[:, 0], error.gather(1, best)[:, 0], pairs["charts"].gather(1, best)[:, 0]

    def project(self, value: torch.Tensor):
        r"""Nearest candidate chart image point :math:`\pi(x) = g_k(f_k(x))`.

        Returns:
            ``(projection (*, D), distance (*), chart (*))``: the candidate chart whose own
            projection of :math:`x` is closest, and that distance (the reconstruction
            error).
        """
        flat, shape = self._flat(value)
        x, dist, charts = self._project_flat(flat, shape)
        return x.reshape(shape + (self.ambient_dim,)), dist.reshape(shape), charts.reshape(shape)

    def distance_to_support(self, value: torch.Tensor) -> torch.Tensor:
        """Distance from ``value`` to the nearest candidate chart image, shape ``(*)``."""
        return self.project(value)[1]

    def chart_log_posterior(self, value: torch.Tensor):
        r"""Chart posterior :math:`\log p(k \mid x)` over the candidate charts.

        On the support, :math:`p(k|x) \propto \pi_k p_k(x)` over the charts whose image
        contains :math:`x`. Off it, with ``noise_scale`` :math:`\sigma`, each candidate is
        weighted by its thickened likelihood
        :math:`\pi_k p_k(\pi_k(x)) \exp(-|x - \pi_k(x)|^2 / 2\sigma^2)`; without it, the
        candidate of least reconstruction error gets probability one.

        Returns:
            ``(charts, log_posterior)``, both of shape :math:`(*, C)`; entries of charts that
            are not candidates for the point hold :math:`-\infty`.
        """
        flat, shape = self._flat(value)
        post, pairs = self._posterior(flat, shape)
        c = post.shape[-1]
        return pairs["charts"].reshape(shape + (c,)), post.reshape(shape + (c,))

    def _posterior(self, flat, shape):
        pairs = self._pairs(flat, shape)
        on = pairs["on_image"]
        if self.noise_scale is not None:
            error = pairs["error"].masked_fill(~pairs["region"], math.inf)
            weights = pairs["log_joint"] - error.pow(2) / (2 * self.noise_scale**2)
            weights = torch.where(
                on.any(-1, keepdim=True), weights.masked_fill(~on, -math.inf), weights
            )
        else:
            error = pairs["error"].masked_fill(~pairs["region"], math.inf)
            nearest = torch.zeros_like(on).scatter_(1, error.argmin(-1, keepdim=True), True)
            keep = torch.where(on.any(-1, keepdim=True), on, nearest)
            weights = pairs["log_joint"].masked_fill(~keep, -math.inf)
        return weights - weights.logsumexp(-1, keepdim=True), pairs

    def encode(self, value: torch.Tensor, stochastic: bool = False):
        r"""Latent coordinates of :math:`x`.

        Deterministic: :math:`z = \sum_k p(k|x) f_k(x)` over the candidates. Stochastic:
        :math:`k \sim p(k|x)`, :math:`z = f_k(x)`.

        Returns:
            ``(z, charts)``: :math:`(*, d)` and, for the stochastic form, the drawn chart of
            shape :math:`(*)` (the most probable chart for the deterministic form).
        """
        flat, shape = self._flat(value)
        post, pairs = self._posterior(flat, shape)
        if stochastic:
            pick = Categorical(logits=post).sample().unsqueeze(-1)
        else:
            pick = post.argmax(-1, keepdim=True)
        charts = pairs["charts"].gather(1, pick)[:, 0]
        if stochastic:
            z = pairs["z"].gather(1, pick.unsqueeze(-1).expand(-1, 1, self.latent_dim))[:, 0]
        else:
            z = (post.exp().unsqueeze(-1) * pairs["z"].nan_to_num()).sum(1)
        return z.reshape(shape + (self.latent_dim,)), charts.reshape(shape)

    def missed_mass(self, num_samples: int = 4096) -> torch.Tensor:
        r"""Monte Carlo estimate of :math:`P(k \notin C(x))`, :math:`(x, k)` drawn from the
        model and :math:`C(x)` the candidate charts of :math:`x`: the fraction of mass
        ``log_prob`` would not count (zero when ``cap`` :math:`\ge K`)."""
        with torch.no_grad():
            x, charts = self.rsample_with_charts((num_samples,))
            x = x.reshape(-1, self.ambient_dim)
            candidates, region = self.membership.candidates(x, self.centres)
            hit = ((candidates == charts.reshape(-1, 1)) & region).any(-1)
            return 1 - hit.to(x.dtype).mean()
