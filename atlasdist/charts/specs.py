r"""Chart specs: a kind of chart, :math:`K` of them, with their parameters as rows of per-chart
tables.

A chart of an atlas is :math:`g_k = c_k \circ h_k`; a spec gives the conformal embeddings
:math:`c_k`. ``spec.embedding(context)`` takes a
:class:`~atlasdist.transforms.ChartContext` (the features of the spec's charts and the chart
of each row) and returns one transform acting row-wise; everything that depends only on the
chart is computed once per chart. An atlas stacks specs (:class:`ChartStack`), so one atlas
can mix kinds of charts.

A new kind of chart is one subclass of :class:`ChartSpec` (usually a few lines: a
:class:`~atlasdist.transforms.ConditionalCompose` of
:class:`~atlasdist.transforms.Conditional` layers over :class:`~atlasdist.transforms.ChartTable`
s) and one line in the test registry (``tests/_atlases.py``, ``CHART_SPECS``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_count, check_parameter
from ..transforms import (
    ChartContext,
    Conditional,
    ConditionalCompose,
    ConditionalProduct,
    InjectiveTransform,
    InverseStereographic,
    Mobius,
    Scale,
    Shift,
    Similarity,
    StiefelEmbedding,
    condition,
    householder_stiefel_raw,
    is_conformal,
)

__all__ = [
    "ChartSpec",
    "ConditionedCharts",
    "SphereCharts",
    "PlaneCharts",
    "LearnedCharts",
    "SharedChart",
    "ChartStack",
    "as_charts",
]


class ChartSpec(nn.Module):
    r"""Base of chart specs: :math:`K` conformal (or injective) embeddings
    :math:`c_k: \mathbb{R}^d \to \mathbb{R}^D` of one kind.

    Subclasses set ``num_charts``, ``in_features`` (:math:`d`), ``out_features`` (:math:`D`)
    and implement :meth:`embedding`; :meth:`centres` says where each chart is least distorted
    (the default chart centres of an atlas's membership), or ``None``.
    """

    num_charts: int
    in_features: int
    out_features: int

    def embedding(self, context: ChartContext) -> InjectiveTransform:
        r"""The embedding of each row's chart: a transform acting on rows :math:`(*, B, d)`,
        :math:`B` = ``len(context)``, with ``context.index`` in :math:`[0, K)`."""
        raise NotImplementedError  # abstract

    def centres(self) -> torch.Tensor | None:
        r"""Points :math:`(K, D)` where the charts are least distorted, or ``None``."""
        return None

    def extra_repr(self) -> str:
        return f"charts={self.num_charts}, d={self.in_features}, D={self.out_features}"


class ConditionedCharts(ChartSpec):
    r"""Charts given by a conditional embedding (a
    :class:`~atlasdist.transforms.ConditionalCompose`, a
    :class:`~atlasdist.transforms.Conditional` layer or any Pyro conditional transform),
    conditioned on the chart context.

    Arguments:
        parts: the conditional embedding.
        num_charts: :math:`K`.
        in_features, out_features: :math:`d, D` (inferred from a probe when omitted).
    """

    def __init__(self, parts, num_charts: int, in_features=None, out_features=None):
        super().__init__()
        name = type(self).__name__
        num_charts = check_count(num_charts, "num_charts", name, minimum=0)
        if num_charts < 1:
            raise ValueError(f"{name}: needs at least one chart, got {num_charts}")
        self.parts = parts
        self.num_charts = num_charts
        if in_features is None or out_features is None:
            probe = self._probe()
            in_features, out_features = probe.in_features, probe.out_features
        self.in_features = check_count(in_features, "in_features", name)
        self.out_features = check_count(out_features, "out_features", name)

    table_names: tuple[str, ...] = ()

    def table(self, name: str) -> torch.Tensor:
        """The per-chart table of raw values of one layer (rows = charts), by name (see
        ``table_names``)."""
        if name not in self.table_names:
            raise KeyError(f"{type(self).__name__} has tables {self.table_names}, not {name!r}")
        return self.parts.parts[self.table_names.index(name)].source.table

    def _probe(self):
        c = getattr(self.parts, "context_features", None) or self.num_charts
        like = next(iter(self.parts.state_dict().values()), torch.zeros(()))
        features = torch.eye(self.num_charts, c, dtype=like.dtype, device=like.device)
        return self.embedding(ChartContext(features, torch.zeros(1, dtype=torch.long)))

    def embedding(self, context: ChartContext):
        return condition(self.parts, context)


def _log(values: torch.Tensor) -> torch.Tensor:
    return values.log().reshape(-1, 1)


class SphereCharts(ConditionedCharts):
    r"""Stereographic charts of known spheres: chart :math:`k` is the inverse stereographic
    projection from the pole :math:`p_k` onto the :math:`d`-sphere of centre :math:`o_k` and
    radius :math:`r_k`,

    .. math:: c_k(u) = o_k + r_k\, \sigma_{p_k}^{-1}(u), \qquad \lambda_k(u) =
        \frac{2 r_k}{1 + |u|^2}.

    One sphere covered from several poles, or several disjoint spheres (e.g. two circles).
    Least distorted at :math:`o_k - r_k p_k`, opposite the pole.

    Arguments:
        centres: :math:`o_k`, shape :math:`(K, d+1)`.
        radii: :math:`r_k > 0`, shape :math:`(K,)`.
        poles: unit vectors :math:`p_k`, shape :math:`(K, d+1)`.
        learnable: whether the tables are learned.

    Example:
        >>> charts = SphereCharts(torch.zeros(2, 3), torch.ones(2),
        ...                       torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]))
        >>> charts.centres()
        tensor([[ 0.,  0., -1.],
                [ 0.,  0.,  1.]])
    """

    table_names = ("pole", "log_radius", "centre")

    def __init__(self, centres, radii, poles, learnable: bool = False):
        centres, radii, poles = map(torch.as_tensor, (centres, radii, poles))
        dtype = torch.promote_types(torch.promote_types(centres.dtype, radii.dtype), poles.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"SphereCharts: centres, radii and poles have dtype {dtype}; the library computes "
                "in float32 or float64: convert them with .to(torch.float32) or .to(torch.float64)"
            )
        centres, radii, poles = (t.to(dtype) for t in (centres, radii, poles))
        if poles.dim() != 2 or poles.shape[-1] < 2:
            raise ValueError(
                f"SphereCharts: poles must have shape (K, d+1) with d >= 1, got "
                f"{tuple(poles.shape)}"
            )
        K, D = poles.shape
        if centres.shape != (K, D) or radii.shape != (K,):
            raise ValueError(
                f"SphereCharts: need centres and poles of shape (K, {D}) and radii (K,), got "
                f"{tuple(centres.shape)}, {tuple(poles.shape)}, {tuple(radii.shape)}"
            )
        check_parameter(centres, "centres", "SphereCharts")
        check_parameter(radii, "radii", "SphereCharts", positive=True)
        check_parameter(poles, "poles", "SphereCharts")
        norms = poles.norm(dim=-1)
        tol = max(1e-6, 1000 * torch.finfo(dtype).eps)
        if not bool(((norms - 1).abs() <= tol).all()):
            raise ValueError(
                "SphereCharts: poles must be unit vectors, got norms in "
                f"[{float(norms.min()):.6g}, {float(norms.max()):.6g}]; normalize them: "
                "poles / poles.norm(dim=-1, keepdim=True)"
            )
        north = torch.zeros(D, dtype=dtype)
        north[-1] = 1
        parts = ConditionalCompose(
            [
                Conditional(InverseStereographic, D - 1, table=poles - north, learnable=learnable),
                Conditional(Scale, D, table=_log(radii), learnable=learnable),
                Conditional(Shift, D, table=centres, learnable=learnable),
            ]
        )
        super().__init__(parts, K, D - 1, D)

    def centres(self) -> torch.Tensor:
        centre = self.table("centre")
        north = torch.zeros_like(centre)
        north[:, -1] = 1
        poles = nn.functional.normalize(self.table("pole") + north, dim=-1)
        return centre - self.table("log_radius").exp() * poles


class PlaneCharts(ConditionedCharts):
    r"""Learned conformal charts around centres with frames: a :math:`d`-plane with
    orientation :math:`W_k` that a special conformal map may bend into a sphere, scaled and
    shifted,

    .. math:: c_k(u) = o_k + s_k\, \mathrm{SCT}_{b_k}(W_k u), \qquad W_k^\top W_k = I_d,

    with :math:`\lambda_k(u) = s_k / \sigma_{b_k}(W_k u)`; :math:`b_k = 0` (``bend=False``)
    is a flat chart. Frames are kept per chart in compact WY form and applied to the rows
    grouped by chart (see :class:`~atlasdist.transforms.StiefelEmbedding`).

    Arguments:
        means: :math:`o_k`, shape :math:`(K, D)`.
        frames: initial :math:`W_k`, shape :math:`(K, D, d)` (any full-rank frames: their
            column spaces are kept).
        scales: :math:`s_k > 0`, shape :math:`(K,)`.
        bend: whether each chart has a learned Möbius bend :math:`b_k` (initialised at 0).
        learnable: whether the tables are learned.
    """

    def __init__(self, means, frames, scales, bend: bool = True, learnable: bool = True):
        names = ("frame", "bend", "log_scale", "shift")
        self.table_names = names if bend else tuple(n for n in names if n != "bend")
        means, frames, scales = map(torch.as_tensor, (means, frames, scales))
        if frames.dim() != 3 or means.shape != frames.shape[:2] or scales.shape != means.shape[:1]:
            raise ValueError(
                "PlaneCharts: need means (K, D), frames (K, D, d) and scales (K,), got "
                f"{tuple(means.shape)}, {tuple(frames.shape)}, {tuple(scales.shape)}"
            )
        check_parameter(means, "means", "PlaneCharts")
        check_parameter(frames, "frames", "PlaneCharts")
        check_parameter(scales, "scales", "PlaneCharts", positive=True)
        K, D, d = frames.shape
        if not 1 <= d <= D:
            raise ValueError(
                f"PlaneCharts: frames must have shape (K, D, d), 1 <= d <= D, got "
                f"{tuple(frames.shape)}"
            )
        # Only the column spaces are kept (householder_stiefel_raw): a frame of lower rank has
        # no d-dimensional column space, and its chart would silently be another plane.
        sv = torch.linalg.svdvals(frames)
        rank_tol = sv[..., :1] * max(D, d) * torch.finfo(frames.dtype).eps * 100
        if not bool((sv[..., -1:] > rank_tol).all()):
            raise ValueError(
                f"PlaneCharts: frames must have full column rank {d}; frame "
                f"{int((sv[..., -1:] <= rank_tol).nonzero()[0, 0])} has smallest singular value "
                f"{float(sv[..., -1].min()):.3g}"
            )
        layers = [
            Conditional(
                StiefelEmbedding, d, D, table=householder_stiefel_raw(frames), learnable=learnable
            )
        ]
        if bend:
            layers.append(
                Conditional(Mobius, D, table=torch.zeros_like(means), learnable=learnable)
            )
        layers += [
            Conditional(Scale, D, table=_log(scales), learnable=learnable),
            Conditional(Shift, D, table=means, learnable=learnable),
        ]
        super().__init__(ConditionalCompose(layers), K, d, D)

    def centres(self) -> torch.Tensor:
        return self.table("shift")


class LearnedCharts(ConditionedCharts):
    r"""Charts from shared weights, conditioned on each chart's features :math:`v_k` (by default
    the atlas's chart centres): inverse stereographic projection onto :math:`S^d` from a
    learned pole, an isometric embedding into :math:`\mathbb{R}^D`, a
    scale and a shift (one :class:`~atlasdist.transforms.Similarity`), all produced by
    hypernetworks of :math:`v_k`, once per chart. Each
    chart's image is a :math:`d`-sphere of learned radius, centre and orientation.

    Arguments:
        num_charts: :math:`K`.
        d, D: latent and ambient dimension.
        context_features: size of the chart features.
        hidden: hidden sizes of the hypernetworks.
    """

    def __init__(
        self, num_charts: int, d: int, D: int, context_features: int, hidden: Sequence[int] = (32,)
    ):
        for name, value in (("num_charts", num_charts), ("d", d), ("D", D)):
            check_count(value, name, "LearnedCharts")
        if not d < D:
            raise ValueError(f"LearnedCharts: needs d < D (a d-sphere in R^D), got d={d}, D={D}")
        c = check_count(context_features, "context_features", "LearnedCharts")
        layers = [
            Conditional(InverseStereographic, d, context_features=c, hidden=hidden),
            Conditional(Similarity, d + 1, D, context_features=c, hidden=hidden),
        ]
        super().__init__(ConditionalCompose(layers), num_charts, d, D)


class TorusCharts(ConditionedCharts):
    r"""Product charts of the flat torus :math:`T^n \subset \mathbb{R}^{2n}` (one
    :math:`(\cos\theta_j, \sin\theta_j)` pair per angle, as
    :func:`~atlasdist.datasets.flat_torus`): chart :math:`k` is the product of :math:`n`
    inverse stereographic projections of the unit circle from the poles
    :math:`q_{kj} = (\cos\phi_{kj}, \sin\phi_{kj})`,

    .. math:: c_k(u) = \big(\sigma_{q_{k1}}^{-1}(u_1), \dots,
        \sigma_{q_{kn}}^{-1}(u_n)\big), \qquad
        \tfrac12 \log\det J^\top J = \sum_j \log \frac{2}{1 + u_j^2}.

    Each chart covers the torus but the points with an angle at its pole; charts whose poles
    differ in every angle cover it together (:meth:`AtlasFlow.tori
    <atlasdist.AtlasFlow.tori>`).

    Arguments:
        poles: pole angles :math:`\phi_{kj}` in radians, shape :math:`(K, n)`, float32 or
            float64.
        learnable: whether the pole tables are learned.

    Example:
        >>> charts = TorusCharts(torch.tensor([[0.0, 0.0], [3.0, 1.5]]))
        >>> charts.centres().shape  # the points opposite the poles
        torch.Size([2, 4])
    """

    def __init__(self, poles, learnable: bool = False):
        poles = torch.as_tensor(poles)
        if poles.dim() != 2 or poles.shape[0] < 1 or poles.shape[1] < 1:
            raise ValueError(
                "TorusCharts: poles must be pole angles of shape (K, n), one row per chart, "
                f"got shape {tuple(poles.shape)}; for one chart of T^n pass shape (1, n)"
            )
        if poles.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"TorusCharts: poles have dtype {poles.dtype}; pass float32 or float64 "
                "angles in radians, e.g. poles.to(torch.float64)"
            )
        check_parameter(poles, "poles", "TorusCharts")
        K, n = poles.shape
        units = torch.stack([poles.cos(), poles.sin()], -1)  # (K, n, 2)
        north = units.new_tensor([0.0, 1.0])
        tables = (units - north).unbind(1)  # per angle, (K, 2): the raw pole of each chart
        parts = ConditionalProduct(
            [Conditional(InverseStereographic, 1, table=t, learnable=learnable) for t in tables]
        )
        super().__init__(parts, K, n, 2 * n)
        self.table_names = tuple(f"pole {j}" for j in range(n))

    def centres(self) -> torch.Tensor:
        north = self.table("pole 0").new_tensor([0.0, 1.0])
        poles = [nn.functional.normalize(self.table(n) + north, dim=-1) for n in self.table_names]
        return -torch.cat(poles, -1)


class SharedChart(ChartSpec):
    r"""One embedding :math:`c` shared by :math:`K` charts (their latent flows may still differ
    through the chart context): e.g. a single chart, or a product chart of a torus.

    Arguments:
        embedding: an :class:`~atlasdist.transforms.InjectiveTransform` (or any transform with
            ``in_features``/``out_features`` and a left inverse).
        num_charts: :math:`K`.
    """

    def __init__(self, embedding, num_charts: int = 1):
        super().__init__()
        num_charts = check_count(num_charts, "num_charts", "SharedChart", minimum=0)
        if num_charts < 1:
            raise ValueError(f"SharedChart: needs at least one chart, got {num_charts}")
        if not (hasattr(embedding, "in_features") and hasattr(embedding, "out_features")):
            raise TypeError(
                "SharedChart: embedding must be a transform with in_features and out_features "
                f"(an InjectiveTransform), got {type(embedding).__name__}"
            )
        self.shared = embedding
        self.num_charts = num_charts
        self.in_features, self.out_features = embedding.in_features, embedding.out_features

    def embedding(self, context: ChartContext):
        return self.shared


class _RowsByChartKind(InjectiveTransform):
    """The embeddings of a stack of specs, each applied to the rows of its charts."""

    def __init__(self, parts, rows, in_features, out_features):
        super().__init__(in_features, out_features)
        self.parts, self.rows = parts, rows
        self.order = torch.cat(rows).argsort()
        self.conformal = all(is_conformal(p) for p in parts)

    def _gather(self, fn, *tensors):
        return [
            fn(p, *(t.index_select(-2, r) for t in tensors))
            for p, r in zip(self.parts, self.rows, strict=True)
        ]

    def _combine(self, outs, dim):
        return torch.cat(outs, dim).index_select(dim, self.order)

    def _call(self, x):
        return self._combine(self._gather(lambda p, a: p(a), x), -2)

    def _inverse(self, y):
        return self._combine(self._gather(lambda p, b: p.inv(b), y), -2)

    def call_and_ladj(self, x):
        outs = self._gather(lambda p, a: p.call_and_ladj(a), x)
        y = self._combine([o[0] for o in outs], -2)
        return y, self._combine([o[1].expand(o[0].shape[:-1]) for o in outs], -1)

    def log_abs_det_jacobian(self, x, y):
        outs = self._gather(lambda p, a, b: p.log_abs_det_jacobian(a, b), x, y)
        return self._combine(outs, -1)

    def log_conformal_factor(self, x, y):
        outs = self._gather(lambda p, a, b: p.log_conformal_factor(a, b), x, y)
        return self._combine(outs, -1)


class ChartStack(nn.Module):
    r"""The charts of an atlas: specs stacked, chart numbers :math:`0..K_1-1` for the first,
    :math:`K_1..K_1+K_2-1` for the second, and so on.

    ``embedding(context)`` dispatches each row to its spec (one pass per spec, not per chart);
    with one spec it is that spec's embedding.

    Arguments:
        specs: :class:`ChartSpec` s with equal :math:`d` and :math:`D`.
    """

    def __init__(self, specs: Sequence[ChartSpec]):
        super().__init__()
        specs = list(specs)
        if not specs:
            raise ValueError("ChartStack: needs at least one chart spec")
        for i, spec in enumerate(specs):
            if not isinstance(spec, ChartSpec):
                raise TypeError(
                    f"ChartStack: spec {i} ({type(spec).__name__}) is not a ChartSpec (e.g. "
                    "SphereCharts, PlaneCharts, SharedChart)"
                )
        dims = {(s.in_features, s.out_features) for s in specs}
        if len(dims) > 1:
            raise ValueError(f"ChartStack: the specs disagree on (d, D): {sorted(dims)}")
        self.specs = nn.ModuleList(specs)
        ((self.in_features, self.out_features),) = dims
        sizes = [s.num_charts for s in specs]
        self.num_charts = sum(sizes)
        self.offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]

    def embedding(self, context: ChartContext):
        if len(self.specs) == 1:
            return self.specs[0].embedding(context)
        parts, rows = [], []
        for spec, lo, hi in zip(self.specs, self.offsets[:-1], self.offsets[1:], strict=True):
            mine = ((context.index >= lo) & (context.index < hi)).nonzero().squeeze(-1)
            if len(mine) == 0:
                continue
            local = ChartContext(context.features[lo:hi], context.index[mine] - lo)
            parts.append(spec.embedding(local))
            rows.append(mine)
        return _RowsByChartKind(parts, rows, self.in_features, self.out_features)

    def centres(self) -> torch.Tensor | None:
        """The specs' centres stacked, if every spec has them."""
        centres = [s.centres() for s in self.specs]
        if any(c is None for c in centres):
            return None
        return torch.cat(centres)


def as_charts(charts, num_charts: int | None = None) -> ChartStack:
    """A :class:`ChartStack` from a spec, a list of specs, a conditional embedding (conditioned
    on the chart context) or one shared injective transform."""
    if isinstance(charts, ChartStack):
        return charts
    if isinstance(charts, ChartSpec):
        return ChartStack([charts])
    if isinstance(charts, list | tuple):
        return ChartStack(charts)
    if num_charts is None:
        raise ValueError("as_charts: give num_charts for an embedding")
    from pyro.distributions.conditional import ConditionalTransform

    if isinstance(charts, ConditionalTransform):
        return ChartStack([ConditionedCharts(charts, num_charts)])
    return ChartStack([SharedChart(charts, num_charts)])
