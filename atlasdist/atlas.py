r"""``AtlasFlow``: the ``nn.Module`` that owns an atlas's learnable parts and builds its
:class:`~atlasdist.distributions.AtlasFlowDistribution` (the lazy-distribution pattern: the
module holds parameters, so ``.to(device)``, ``state_dict``, ``pyro.module`` and optimizers
work; the distribution is a cheap object built per call)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import pyro.distributions.transforms as pyro_t
import torch
from torch import nn
from torch.distributions import Distribution

from ._checks import check_count, check_features, check_parameter, check_sizes
from .charts import ChartMembership
from .charts.specs import (
    ChartSpec,
    ChartStack,
    LearnedCharts,
    PlaneCharts,
    SphereCharts,
    TorusCharts,
    as_charts,
)
from .distributions.atlas import AtlasFlowDistribution
from .lazy import LazyDistribution
from .transforms import ChartSpline, ChartSplineCoupling, Hypernet, chart_affine_coupling

__all__ = ["AtlasFlow", "default_latent_flow"]


def default_latent_flow(
    d: int,
    context_features: int,
    layers: int = 2,
    hidden: Sequence[int] = (64, 64),
    count_bins: int = 8,
    bound: float = 4.0,
    coupling: str = "affine",
) -> list:
    r"""Chart-conditioned latent flow :math:`h` on :math:`\mathbb{R}^d`: ``layers`` blocks of
    a conditional rational spline (elementwise, identity outside :math:`[-B, B]`; its
    parameters depend on the chart only and are computed once per chart) followed, for
    :math:`d > 1`, by a coupling of the coordinates and a permutation.

    ``coupling="affine"``: a conditional affine coupling (the chart part of its network's
    first layer computed once per chart). The splines then act on each coordinate alone, so
    the coordinates interact only through shifts and scales.
    ``coupling="spline_coupling"``: a chart-conditioned rational-spline coupling
    (:class:`~atlasdist.transforms.ChartSplineCoupling`) instead of the affine one: each
    coordinate of one half moves by a monotonic spline whose knots are a network of the other
    half and the chart: one network pass and one spline per layer, both ways (about 1.4 to 1.5
    times the affine coupling's time per step on the earth sets).
    ``coupling="spline"``: instead of both, Pyro's conditional rational-spline
    autoregressive transform, :math:`u_i \mapsto s_i(u_i;\ u_{<i}, v_k)`, a spline of each
    coordinate whose knots are a network of the previous coordinates and the chart features
    (Durkan et al. 2019): it can place sharp modes anywhere in the plane, at about three
    times the cost per step (its network runs per point and chart, and ``log_prob`` inverts
    it in :math:`d` passes).

    Example:
        >>> parts = default_latent_flow(2, context_features=3, layers=2, coupling="spline")
        >>> len(parts)  # (autoregressive spline, permutation) per layer
        4
    """
    if coupling not in ("affine", "spline", "spline_coupling"):
        raise ValueError(
            "default_latent_flow: coupling must be 'affine', 'spline' or 'spline_coupling', "
            f"got {coupling!r}"
        )
    parts: list = []
    for _ in range(layers):
        if coupling == "spline" and d > 1:
            parts.append(
                pyro_t.conditional_spline_autoregressive(
                    d, context_features, list(hidden), count_bins=count_bins, bound=bound
                )
            )
            parts.append(pyro_t.Permute(torch.arange(d - 1, -1, -1)))
            continue
        parts.append(ChartSpline(d, context_features, hidden, count_bins=count_bins, bound=bound))
        if d > 1 and coupling == "spline_coupling":
            parts.append(
                ChartSplineCoupling(
                    d, context_features, hidden, count_bins=count_bins, bound=bound
                )
            )
            parts.append(pyro_t.Permute(torch.arange(d - 1, -1, -1)))
        elif d > 1:
            parts.append(chart_affine_coupling(d, context_features, hidden))
            parts.append(pyro_t.Permute(torch.arange(d - 1, -1, -1)))
    return parts


class AtlasFlow(LazyDistribution):
    r"""An atlas of :math:`K` injective flows :math:`g_k = c_k \circ h_k: \mathbb{R}^d \to
    \mathbb{R}^D` with shared weights; calling the module (or ``flow()``) returns the
    :class:`~atlasdist.distributions.AtlasFlowDistribution`.

    The charts :math:`c_k` are chart specs (:mod:`atlasdist.charts.specs`) stacked in one
    :class:`~atlasdist.charts.ChartStack`; the latent flows :math:`h_k` share weights and are
    conditioned on each chart's features (``context``, default the chart centres). Every part
    is replaceable; the defaults suit toy data.

    Arguments:
        D: ambient dimension.
        d: latent (manifold) dimension, :math:`d < D`.
        charts: the number of charts :math:`K` (default charts:
            :class:`~atlasdist.charts.LearnedCharts`, or ``embedding``), or chart specs (one
            :class:`~atlasdist.charts.ChartSpec` or a list, stacked in order).
        centres: chart centres in code space for membership, shape :math:`(K, c)` (default:
            the specs' centres where they have them, else standard normal; code space = data
            space).
        learn_centres: whether the centres are parameters.
        context: fixed conditioning features per chart, shape :math:`(K, c')` (e.g. the
            identity); default: the centres.
        flows: latent flow parts (default :func:`default_latent_flow`).
        embedding: instead of specs, one embedding for all :math:`K` charts: a conditional
            embedding (:class:`~atlasdist.transforms.ConditionalCompose`), conditioned on the
            chart context, or a shared :class:`~atlasdist.transforms.InjectiveTransform`.
        base: base distribution on :math:`\mathbb{R}^d` (default standard normal, moved with
            the module).
        membership: chart membership (default ``ChartMembership(m=min(2, K))``).
        atol, noise_scale: see :class:`~atlasdist.distributions.AtlasFlowDistribution`.
        layers, hidden, count_bins: size of the default latent flow.
        code_features: width of the chart code: chart contexts wider than this are
            projected by a learned linear map, once per chart per call, to the features that
            condition the latent flows and learned charts (so their networks' cost does not
            grow with the context width, e.g. :math:`D` or :math:`K`). A conditioning input
            wider than this is projected the same way.
        context_features: size :math:`e` of a conditioning input :math:`c`, for
            :math:`p(x \mid c)` (0: none). Then ``atlas(c)`` with :math:`c` of shape
            :math:`(*B, e)` is a distribution of batch shape :math:`(*B)`: the mixture weights
            are :math:`\mathrm{softmax}(\ell + w(c))` with a network :math:`w` that starts at
            zero, and the default latent flows are conditioned on :math:`[v_k, c]`; the charts
            (the manifold) and the membership are shared by every :math:`c`. Custom ``flows``
            then take a context of the chart code's width plus :math:`\min(e,` ``code_features``
            :math:`)`.

    **Evaluation with fixed parameters.** Under ``torch.no_grad`` (or ``inference_mode``)
    the per-chart quantities (frames, knots, the chart part of the coupling networks) are
    computed once and kept until a parameter or buffer changes or an optimizer steps
    (:mod:`atlasdist.transforms.cache`): repeated ``log_prob`` or ``sample`` calls then skip
    all per-chart work. With gradients on, everything is computed per call, as training
    needs. Set ``atlas.cache_charts = False`` to turn the cache off; after changing
    parameters through ``.data`` outside an optimizer, call
    :func:`~atlasdist.transforms.clear_chart_cache`.

    Example:
        >>> atlas = AtlasFlow(D=3, d=2, charts=4)
        >>> p = atlas()
        >>> p.sample((2,)).shape
        torch.Size([2, 3])
        >>> conditional = AtlasFlow(D=3, d=2, charts=4, context_features=5)
        >>> p = conditional(torch.randn(7, 5))  # p(x | c) for 7 inputs c
        >>> x = p.sample((2,))
        >>> x.shape, p.log_prob(x).shape
        (torch.Size([2, 7, 3]), torch.Size([2, 7]))
    """

    cache_charts: bool = True  # keep per-chart quantities between gradient-free calls

    def __init__(
        self,
        D: int,
        d: int,
        charts: int | ChartSpec | Sequence[ChartSpec],
        *,
        centres: torch.Tensor | None = None,
        learn_centres: bool = True,
        context: torch.Tensor | None = None,
        flows: Sequence | None = None,
        embedding=None,
        base: Distribution | None = None,
        membership: ChartMembership | None = None,
        atol: float | None = None,
        noise_scale: float | None = None,
        layers: int = 2,
        hidden: Sequence[int] = (64, 64),
        count_bins: int = 8,
        code_features: int = 32,
        context_features: int = 0,
    ):
        super().__init__()
        if isinstance(context_features, bool) or int(context_features) < 0:
            raise ValueError(
                f"AtlasFlow: context_features must be an int >= 0, got {context_features}"
            )
        self.context_features = int(context_features)
        for name, value in (("D", D), ("d", d)):
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise TypeError(f"AtlasFlow: {name} must be an int, got {value!r}")
        D, d = operator.index(D), operator.index(d)
        if not 1 <= d < D:
            raise ValueError(f"AtlasFlow needs 1 <= d < D, got d={d}, D={D}")
        layers = check_count(layers, "layers", "AtlasFlow", minimum=0)
        hidden = check_sizes(hidden, "hidden", "AtlasFlow", nonempty=True)
        count_bins = check_count(count_bins, "count_bins", "AtlasFlow")
        code_features = check_count(code_features, "code_features", "AtlasFlow")
        stack = None
        if isinstance(charts, int) and not isinstance(charts, bool):
            if charts < 1:
                raise ValueError(f"AtlasFlow needs at least one chart, got {charts}")
            num_charts = charts
        elif not isinstance(charts, ChartSpec | ChartStack | Sequence):
            raise TypeError(
                "AtlasFlow: charts must be the number of charts (an int) or chart specs (a "
                f"ChartSpec or a sequence of them), got {charts!r}"
            )
        else:
            if embedding is not None:
                raise ValueError("AtlasFlow: give chart specs or an embedding, not both")
            stack = as_charts(
                charts if isinstance(charts, ChartSpec | ChartStack) else list(charts)
            )
            if (stack.in_features, stack.out_features) != (d, D):
                raise ValueError(
                    f"AtlasFlow: the charts map R^{stack.in_features} into "
                    f"R^{stack.out_features}, the atlas has d={d}, D={D}"
                )
            num_charts = stack.num_charts
        self.D, self.d, self.num_charts = D, d, num_charts
        if centres is None:
            spec_centres = None if stack is None else stack.centres()
            centres = torch.randn(num_charts, D) if spec_centres is None else spec_centres.detach()
        centres = torch.as_tensor(centres)
        check_parameter(centres, "centres", "AtlasFlow")
        if centres.dim() != 2 or centres.shape[0] != num_charts:
            raise ValueError(
                f"centres must have shape ({num_charts}, c), got {tuple(centres.shape)}"
            )
        if learn_centres:
            self.centres = nn.Parameter(centres.clone())
        else:
            self.register_buffer("centres", centres.clone())
        if context is not None:
            check_parameter(context, "context", "AtlasFlow")
            context = torch.as_tensor(context)
            if context.dim() != 2 or context.shape[0] != num_charts:
                raise ValueError(
                    f"AtlasFlow: context must have shape ({num_charts}, f), one row of "
                    f"features per chart, got {tuple(context.shape)}"
                )
            self.register_buffer("context", context.clone())
        else:
            self.context = None
        chart_features = (centres if context is None else self.context).shape[-1]
        if chart_features > code_features:
            self.chart_code = nn.Linear(chart_features, code_features, dtype=centres.dtype)
            chart_features = code_features
        else:
            self.chart_code = None
        input_features = 0
        if self.context_features:
            # p(x | c): c's features condition the latent flows next to the chart code, and a
            # network of c (zero at the start) shifts the mixture logits.
            input_features = min(self.context_features, code_features)
            self.input_code = (
                nn.Linear(self.context_features, code_features, dtype=centres.dtype)
                if self.context_features > code_features
                else None
            )
            self.weights_net = Hypernet(self.context_features, num_charts, hidden[:1]).to(
                centres.dtype
            )
        if flows is None:
            flows = default_latent_flow(
                d, chart_features + input_features, layers, hidden, count_bins
            )
        self.flow_parts = list(flows)
        self.flow_modules = nn.ModuleList([p for p in self.flow_parts if isinstance(p, nn.Module)])
        if stack is None:
            if embedding is None:
                embedding = LearnedCharts(num_charts, d, D, chart_features)
            stack = as_charts(embedding, num_charts)
        for spec in stack.specs:
            want = getattr(getattr(spec, "parts", None), "context_features", None)
            if want is not None and want != chart_features:
                raise ValueError(
                    f"AtlasFlow: {type(spec).__name__} takes chart features of width {want}, "
                    f"the atlas gives {chart_features} (its context, or centres, projected to "
                    f"at most code_features={code_features}); build the charts with "
                    f"context_features={chart_features} or pass a context of width {want}"
                )
        self.charts = stack
        self.base = base
        self.register_buffer("_base_loc", torch.zeros(d))
        self.membership = (
            ChartMembership(m=min(2, num_charts)) if membership is None else membership
        )
        self.logits = nn.Parameter(torch.zeros(num_charts))
        if atol is not None:
            check_parameter(atol, "atol", "AtlasFlow", nonnegative=True)
        if noise_scale is not None:
            check_parameter(noise_scale, "noise_scale", "AtlasFlow", positive=True)
        self.atol, self.noise_scale = atol, noise_scale

    @classmethod
    def spheres(
        cls,
        d: int,
        centres: torch.Tensor,
        radii: torch.Tensor,
        poles: torch.Tensor,
        learnable: bool = False,
        **kwargs,
    ) -> AtlasFlow:
        r"""An atlas of :class:`~atlasdist.charts.SphereCharts`: chart :math:`k` is the inverse
        stereographic projection from the pole :math:`p_k` onto the :math:`d`-sphere of centre
        :math:`o_k` and radius :math:`r_k` in :math:`\mathbb{R}^{d+1}` (one sphere covered
        from several poles, or several disjoint spheres, e.g. two circles).

        The latent flow is shared, conditioned on a one-hot chart context; the chart centres
        used for membership are the points opposite the poles, :math:`o_k - r_k p_k`, where
        each chart is least distorted. The dtype of the arguments is kept.

        Arguments:
            d: sphere dimension.
            centres: :math:`o_k`, shape :math:`(K, d+1)`.
            radii: :math:`r_k > 0`, shape :math:`(K,)`.
            poles: unit vectors :math:`p_k`, shape :math:`(K, d+1)`.
            learnable: whether the charts' tables are learned.
            kwargs: passed to :class:`AtlasFlow` (``membership``, ``layers``, ``hidden``...).

        Example:
            >>> north, south = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -1.0]])
            >>> circle = AtlasFlow.spheres(1, torch.zeros(2, 2), torch.ones(2),
            ...                            torch.cat([north, south]))
            >>> circle().sample((3,)).norm(dim=-1).allclose(torch.ones(3))
            True
        """
        charts = SphereCharts(centres, radii, poles, learnable=learnable)
        if charts.in_features != d:
            raise ValueError(
                f"spheres: need centres and poles of shape (K, {d + 1}), got poles of shape "
                f"(K, {charts.out_features})"
            )
        K = charts.num_charts
        kwargs.setdefault("membership", ChartMembership(m=min(2, K)))
        dtype = charts.centres().dtype
        return cls(
            d + 1,
            d,
            charts,
            learn_centres=False,
            context=torch.eye(K, dtype=dtype),
            **kwargs,
        ).to(dtype)

    @classmethod
    def tori(cls, poles: torch.Tensor, **kwargs) -> AtlasFlow:
        r"""An atlas of product charts of the flat torus :math:`T^n \subset \mathbb{R}^{2n}`
        (one :math:`(\cos\theta_j, \sin\theta_j)` pair per angle, as
        :func:`~atlasdist.datasets.flat_torus`): chart :math:`k` is the product of :math:`n`
        inverse stereographic projections of the unit circle from the poles
        :math:`(\cos\phi_{kj}, \sin\phi_{kj})`,

        .. math:: c_k(u) = \big(\sigma_{\phi_{k1}}^{-1}(u_1), \dots,
            \sigma_{\phi_{kn}}^{-1}(u_n)\big), \qquad
            \tfrac12 \log\det J^\top J = \sum_j \log \frac{2}{1 + u_j^2}.

        One product chart misses the points with *any* angle at its pole, and its density
        vanishes as an angle approaches it (the latent point runs off to infinity), so a test
        point near a pole of the only chart gets an arbitrarily poor log-density. With several
        charts whose poles differ in every angle, every point is far from all poles of some
        chart; the density is the mixture :math:`p(x) = \sum_k \pi_k p_k(x)` over **all**
        :math:`K` charts (membership ``m = K``: each chart covers the torus but a null set,
        so this is the normalized mixture), a density w.r.t. :math:`d\theta_1 \cdots
        d\theta_n` (the volume of the flat torus). Cost: :math:`K` latent-flow passes per
        point. The latent flows share weights, conditioned on a one-hot chart context; the
        chart centres are the points opposite the poles, :math:`\phi_{kj} + \pi`.

        Arguments:
            poles: pole angles :math:`\phi_{kj}` in radians, shape :math:`(K, n)`; its dtype
                (float32 or float64) is the atlas's.
            kwargs: passed to :class:`AtlasFlow` (``layers``, ``hidden``, ``count_bins``...).

        Example:
            >>> poles = torch.tensor([[0.0, 0.0], [3.1416, 3.1416]])  # two charts of T^2
            >>> torus = AtlasFlow.tori(poles)
            >>> x = torus().sample((3,))
            >>> x.shape, x.unflatten(-1, (2, 2)).norm(dim=-1).allclose(torch.ones(3, 2))
            (torch.Size([3, 4]), True)
        """
        charts = TorusCharts(poles)  # checks the poles
        K, n = charts.num_charts, charts.in_features
        kwargs.setdefault("membership", ChartMembership(m=K))
        return cls(
            2 * n,
            n,
            charts,
            centres=charts.centres(),
            learn_centres=False,
            context=torch.eye(K, dtype=charts.centres().dtype),
            **kwargs,
        ).to(charts.centres().dtype)

    @classmethod
    def from_autoencoder(
        cls,
        vq,
        data: torch.Tensor,
        d: int,
        *,
        m: int = 2,
        eps: float = 0.0,
        cap: int | None = None,
        learn_geometry: bool = True,
        **kwargs,
    ) -> AtlasFlow:
        r"""An atlas of :class:`~atlasdist.charts.PlaneCharts` at the codes of a trained
        :class:`~atlasdist.charts.VQAutoencoder` (reference/000, "The chart maps").

        - Membership: the autoencoder's regions :math:`U_k` (its encoder, its codebook as the
          chart centres, ``m``, ``eps``, ``cap``).
        - Chart :math:`k`: :math:`g_k(z) = o_k + s_k\, \mathrm{SCT}_{b_k}(W_k h_k(z))`, a
          :math:`d`-plane with orientation :math:`W_k` that a special conformal map may bend
          into a sphere, scaled and shifted. Initialised from the data the autoencoder
          assigns to code :math:`k` (local PCA): :math:`o_k` their mean, :math:`W_k` their
          top-:math:`d` principal directions, :math:`s_k` their spread along them,
          :math:`b_k = 0` (flat); then learned (``learn_geometry``) as per-chart tables.
        - Latent flows: shared weights, conditioned on ``[one-hot(k), v_k]``.
        - Mixture weights: initialised at the codes' occupancy.

        Arguments:
            vq: a trained :class:`~atlasdist.charts.VQAutoencoder`.
            data: the training points :math:`(N, D)`, for the initialisation.
            d: manifold dimension.
            kwargs: passed to :class:`AtlasFlow` (``layers``, ``hidden``, ``noise_scale``...).
        """
        D, K = vq.D, vq.num_charts
        with torch.no_grad():
            codebook = vq.codebook.detach().clone()
            labels = vq.assign(data)
            means = vq.decoder(codebook).to(data.dtype)
            like = {"dtype": data.dtype, "device": data.device}
            frames = torch.linalg.qr(torch.randn(K, D, d, **like)).Q
            spread = torch.full((K,), float(data.std(0).mean()), **like)
            counts = torch.bincount(labels, minlength=K)
            for k in range(K):  # initialisation only
                xk = data[labels == k]
                if len(xk) > d:
                    means[k] = xk.mean(0)
                    _, sv, vt = torch.linalg.svd(xk - means[k], full_matrices=False)
                    frames[k] = vt[:d].T
                    spread[k] = (sv[:d].pow(2).mean() / len(xk)).sqrt().clamp_min(1e-3)
        charts = PlaneCharts(means, frames, spread, bend=True, learnable=learn_geometry)
        atlas = cls(
            D,
            d,
            charts,
            centres=codebook,
            learn_centres=False,
            context=torch.cat([torch.eye(K, **like), codebook.to(**like)], -1),
            membership=vq.membership(m=m, eps=eps, cap=cap),
            **kwargs,
        )
        with torch.no_grad():
            atlas.logits.copy_((counts.to(atlas.logits.dtype) + 1).log())
        return atlas.to(data.dtype)

    def forward(
        self,
        c: torch.Tensor | None = None,
        *,
        noise_scale: float | None = ...,
        validate_args: bool | None = None,
    ) -> AtlasFlowDistribution:
        r"""The distribution with the current parameters, :math:`p(x)` or, for an atlas built
        with ``context_features``, :math:`p(x \mid c)` (``noise_scale`` overrides the
        module's); ``flow(...)`` is an alias."""
        logits, inputs = self.logits, None
        if not self.context_features:
            self._no_context(c)
        else:
            if c is None:
                raise ValueError(
                    f"AtlasFlow: built with context_features={self.context_features}, so it "
                    f"models p(x | c): call it with c of shape (*, {self.context_features})"
                )
            check_features(c, self.context_features, "AtlasFlow", "c")
            if c.dtype != self.logits.dtype or c.device != self.logits.device:
                raise ValueError(
                    f"AtlasFlow: c has dtype {c.dtype} on {c.device}, the atlas's parameters "
                    f"have dtype {self.logits.dtype} on {self.logits.device}; convert c with "
                    ".to(...)"
                )
            logits = self.logits + self.weights_net(c)
            inputs = c if self.input_code is None else self.input_code(c)
        return AtlasFlowDistribution(
            self.base_distribution(),
            self.flow_parts,
            self.charts,
            self.centres,
            logits,
            self.membership,
            context=self.context,
            chart_code=self.chart_code,
            inputs=inputs,
            atol=self.atol,
            noise_scale=self.noise_scale if noise_scale is ... else noise_scale,
            validate_args=validate_args,
            cache=self if self.cache_charts else None,
        )
