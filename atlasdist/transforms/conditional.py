r"""Conditioning: one wrapper turns a context into a layer's declared parameters.

A conditionable layer declares the shapes of its raw parameters (``parameter_shapes``) and
builds itself from a batch of them (``from_parameters``). :class:`Conditional` produces the
raw parameters from a context, with a shared-weight :class:`Hypernet` (zero-initialised output,
so every conditioned layer starts at a fixed map) or a per-chart :class:`ChartTable`, and
``condition(context)`` returns the layer, following Pyro's ``ConditionalTransformModule``
("a hypernetwork that builds an unconditional transform").

Contexts:

- a tensor of shape :math:`(B, c)` (or :math:`(c,)`): one parameter set per row, for inputs of
  shape :math:`(*, B, n)`; a :class:`ChartTable` takes integer chart numbers :math:`(B,)`;
- a :class:`ChartContext` (what an atlas passes): the features of all :math:`K` charts and the
  chart of each input row. Everything that depends only on the chart is computed once per
  chart and gathered by index (frames are applied by index without a per-row copy).

The latent flows of an atlas are Pyro conditional transforms; :class:`ChartDenseNN` (in a
Pyro affine coupling) and :class:`ChartSpline` are chart-aware (the context part of a coupling
network's first layer, and all of a spline's knots, computed once per chart).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyro.distributions.transforms as pyro_t
import torch
from pyro.distributions.conditional import ConditionalTransform, ConditionalTransformModule
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import nn

from .._checks import (
    check_count,
    check_features,
    check_parameter,
    check_sizes,
    trusted_parameters,
)
from .cache import _functorch_active, cached, keeps
from .conformal import ConformalEmbedding
from .injective import InjectiveCompose, is_conformal
from .product import ProductEmbedding
from .spline import OnePassBijection, RationalQuadraticSpline, spline_knots

__all__ = [
    "ChartContext",
    "Hypernet",
    "ChartTable",
    "Conditional",
    "ConditionalCompose",
    "ConditionalProduct",
    "ChartDenseNN",
    "ChartSpline",
    "ChartSplineCoupling",
    "SplineCoupling",
    "chart_affine_coupling",
    "condition",
]


@dataclass(frozen=True)
class ChartContext:
    r"""The context of a chart-conditioned evaluation: per-chart features, the chart of each
    row and, optionally, per-row inputs.

    The context of row :math:`i` is :math:`[v_{k_i}, e_i]`: the features of its chart
    :math:`k_i` followed by its own inputs :math:`e_i` (e.g. the conditioning input :math:`c`
    of an atlas modelling :math:`p(x \mid c)`). Chart-aware layers compute what depends only
    on :math:`v_k` once per chart and add the per-row part.

    Arguments:
        features: features of every chart, shape :math:`(K, f)` (computed once per call).
        index: chart of each input row, integer tensor of shape :math:`(B,)`.
        inputs: per-row inputs, shape :math:`(B, e)`, or ``None``.

    Example:
        >>> ctx = ChartContext(torch.eye(2), torch.tensor([1, 1, 0]), torch.ones(3, 1))
        >>> ctx.rows()
        tensor([[0., 1., 1.],
                [0., 1., 1.],
                [1., 0., 1.]])
    """

    features: torch.Tensor
    index: torch.Tensor
    inputs: torch.Tensor | None = None

    def __post_init__(self):
        # Metadata only (no values): free on the per-call path.
        if not isinstance(self.features, torch.Tensor) or self.features.dim() != 2:
            raise ValueError(
                "ChartContext: features must be a tensor of shape (K, f), got "
                f"{getattr(self.features, 'shape', type(self.features).__name__)}"
            )
        index = self.index
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point():
            raise TypeError(
                "ChartContext: index must be an integer tensor of shape (B,) (chart numbers), "
                f"got {getattr(index, 'dtype', type(index).__name__)} of shape "
                f"{tuple(getattr(index, 'shape', ()))}"
            )
        if self.inputs is not None and (
            not isinstance(self.inputs, torch.Tensor)
            or self.inputs.dim() != 2
            or self.inputs.shape[0] != index.shape[0]
        ):
            raise ValueError(
                f"ChartContext: inputs must have shape ({index.shape[0]}, e), one row per index, "
                f"got {tuple(getattr(self.inputs, 'shape', ()))}"
            )

    def rows(self) -> torch.Tensor:
        r"""The context of each row, :math:`(B, f + e)`: for conditional transforms that do
        not know charts (any Pyro ``ConditionalTransform``)."""
        rows = self.features.index_select(0, self.index)
        return rows if self.inputs is None else torch.cat([rows, self.inputs], -1)

    @property
    def per_chart(self) -> bool:
        """Whether the context depends on the chart only (no per-row inputs)."""
        return self.inputs is None

    def distinct(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The distinct charts among the rows, sorted, shape :math:`(U,)`, and the position of
        each row's chart among them, :math:`(B,)` (``torch.unique``; computed once per
        context)."""
        memo = self.__dict__.get("_distinct")
        version = self.index._version  # an index changed in place is looked at again
        if memo is None or memo[0] != version:
            memo = (version, torch.unique(self.index, return_inverse=True))
            object.__setattr__(self, "_distinct", memo)
        return memo[1]

    def charts_in_use(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The features a chart-aware layer computes its per-chart quantities from, and the
        row of each input row among them.

        With gradients on and nothing kept between calls (training, where the chart cache
        keeps nothing), the charts the rows use only:
        ``(features[used], position)`` (:meth:`distinct`), so a call pays per-chart work
        (hypernetworks, knots, frames) for the charts it touches, not for all :math:`K`.
        Otherwise ``(features, index)``: all :math:`K`, which the chart cache can keep for
        later calls (the two agree to rounding, not bitwise; gradient-free calls with the cache
        off compute all :math:`K` too, so cached and uncached values stay identical).
        """
        if (
            torch.is_grad_enabled()
            and not _functorch_active()  # torch.unique has a data-dependent size
            and not keeps((self.features,))
        ):
            superset = self.__dict__.get("_superset")
            if superset is None:
                used, position = self.distinct()
            else:  # the charts of all the rows this context was selected from
                context, rows = superset
                used, position = context.distinct()
                position = position.index_select(0, rows)
            if used.shape[0] < self.features.shape[0]:
                return self.features.index_select(0, used), position
        return self.features, self.index

    def subset(self, rows: torch.Tensor) -> ChartContext:
        r"""The context of some of the rows (``rows``, indices of shape :math:`(B',)`) whose
        per-chart quantities are computed for the charts in use by all the rows
        (:meth:`charts_in_use`): layers conditioned on it give, on those rows, bitwise the
        values of the layers conditioned on the whole context (an atlas runs its latent flows
        on the pairs whose point lies on the chart's image only, and keeps the values of
        evaluating every pair)."""
        inputs = None if self.inputs is None else self.inputs.index_select(0, rows)
        sub = ChartContext(self.features, self.index.index_select(0, rows), inputs)
        object.__setattr__(sub, "_superset", (self, rows))
        return sub

    def chart_only(self) -> ChartContext:
        """The same context without the per-row inputs."""
        return self if self.inputs is None else ChartContext(self.features, self.index)

    def __len__(self) -> int:
        return self.index.shape[0]


def _accepts_chart_context(part) -> bool:
    # Chart-aware classes say so (chart_aware = True); a Pyro coupling is chart-aware when its
    # network is.
    return getattr(part, "chart_aware", False) or getattr(
        getattr(part, "nn", None), "chart_aware", False
    )


def condition(part, context):
    """``part`` conditioned on ``context`` (a tensor or a :class:`ChartContext`); transforms
    that are not conditional are returned as they are. A Pyro conditional transform that does
    not know charts gets the per-row features ``context.rows()``."""
    if not isinstance(part, ConditionalTransform):
        return part
    if isinstance(context, ChartContext) and not _accepts_chart_context(part):
        return part.condition(context.rows())
    return part.condition(context)


class Hypernet(nn.Module):
    """MLP ``context (*, c) -> parameters (*, p)`` whose output layer starts at weight zero and
    bias ``initial`` (default zero): at the start it gives ``initial`` for every context."""

    def __init__(
        self,
        context_features: int,
        out_features: int,
        hidden: Sequence[int] = (32,),
        initial: torch.Tensor | None = None,
    ):
        super().__init__()
        self.context_features = check_count(context_features, "context_features", "Hypernet")
        self.out_features = check_count(out_features, "out_features", "Hypernet", minimum=0)
        sizes = [self.context_features, *check_sizes(hidden, "hidden", "Hypernet")]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        last = nn.Linear(sizes[-1], out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        if initial is not None:
            initial = torch.as_tensor(initial).reshape(-1)
            if initial.shape != (out_features,):
                raise ValueError(
                    f"Hypernet: initial must have {out_features} entries, got {initial.numel()}"
                )
            check_parameter(initial, "initial", "Hypernet")
            with torch.no_grad():
                last.bias.copy_(initial)
        self.net = nn.Sequential(*layers, last)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        check_features(context, self.context_features, "condition", "context")
        return self.net(context)


class ChartTable(nn.Module):
    r"""A table of per-chart parameters indexed by chart number: ``table(k)`` is row
    :math:`k`, ``table()`` all :math:`K` rows.

    Use it as the source of a :class:`Conditional` layer to give each of :math:`K` charts its
    own free (or fixed, ``learnable=False``) parameters instead of shared weights, e.g. known
    stereographic poles, or a circle's centre and radius per chart. The values are the raw
    parameters of the layer (see each layer's ``from_parameters``).

    Arguments:
        table: tensor of shape :math:`(K, p)`.
        learnable: whether the table is an ``nn.Parameter``.

    Example:
        >>> table = ChartTable(torch.tensor([[1.0], [2.0], [3.0]]), learnable=False)
        >>> table(torch.tensor([2, 0]))
        tensor([[3.],
                [1.]])
    """

    def __init__(self, table: torch.Tensor, learnable: bool = True):
        super().__init__()
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.shape[0] < 1:
            raise ValueError(
                f"ChartTable: table must have shape (K, p) with K >= 1, got {tuple(table.shape)}"
            )
        check_parameter(table, "table", "ChartTable")
        if learnable:
            self.table = nn.Parameter(table.clone())
        else:
            self.register_buffer("table", table.clone())
        self.num_charts, self.out_features = table.shape

    def forward(self, charts: torch.Tensor | None = None) -> torch.Tensor:
        if charts is None:
            return self.table
        if not isinstance(charts, torch.Tensor) or charts.is_floating_point():
            raise TypeError(
                "ChartTable: index it by chart numbers (an integer tensor), got "
                f"{getattr(charts, 'dtype', type(charts).__name__)}"
            )
        return self.table[charts]

    def extra_repr(self) -> str:
        return f"charts={self.num_charts}, features={self.out_features}"


class Conditional(ConditionalTransformModule):
    r"""A layer whose parameters come from a context: ``condition(v)`` returns
    ``layer.from_parameters(*args, params(v))``.

    The layer declares its raw parameters (``layer.parameter_shapes(*args, **options)``); their
    source is a shared-weight :class:`Hypernet` of the context (``context_features``,
    ``hidden``) or a per-chart :class:`ChartTable` (``table``: a :math:`(K, p)` tensor of raw
    values, a dict of them by name, or a ``ChartTable``).

    Under a :class:`ChartContext` the parameters are computed for the :math:`K` charts once
    and the layer is indexed by the rows' charts. With gradients on (training, where nothing
    is kept between calls), a hypernet source runs on the distinct charts of the rows only
    (:meth:`ChartContext.distinct`): the layer then holds the parameter rows of those charts,
    in sorted chart order, and its ``index`` gives each row's position among them.

    Arguments:
        layer: a layer class with ``parameter_shapes`` and ``from_parameters`` (e.g.
            :class:`~atlasdist.transforms.Shift`, :class:`~atlasdist.transforms.StiefelEmbedding`).
        args: the layer's dimensions.
        context_features: size :math:`c` of the context (hypernet source).
        hidden: hidden sizes of the hypernet.
        table: per-chart raw parameters (table source).
        learnable: whether a table given as a tensor is learnable.
        initial: with a hypernet, the raw parameters it gives every context at the start
            (flattened, in ``parameter_shapes`` order; default zero, the layer's fixed map).
        options: further keyword arguments of the layer (e.g. ``radius`` of a Möbius map).

    Example:
        >>> from atlasdist.transforms import Shift
        >>> shift = Conditional(Shift, 3, context_features=4)
        >>> shift.condition(torch.randn(8, 4))(torch.zeros(8, 3)).shape  # starts at zero
        torch.Size([8, 3])
    """

    chart_aware = True  # takes a ChartContext

    def __init__(
        self,
        layer: type,
        *args,
        context_features: int | None = None,
        hidden: Sequence[int] = (32,),
        table=None,
        learnable: bool = True,
        initial: torch.Tensor | None = None,
        **options,
    ):
        super().__init__()
        if not (hasattr(layer, "parameter_shapes") and hasattr(layer, "from_parameters")):
            raise TypeError(
                f"Conditional: layer must be a layer class with parameter_shapes and "
                f"from_parameters (e.g. Shift, StiefelEmbedding), got {layer!r}"
            )
        if context_features is not None:
            context_features = check_count(
                context_features, "context_features", f"Conditional({layer.__name__})"
            )
        self.layer, self.args, self.options = layer, args, options
        self.shapes = dict(layer.parameter_shapes(*args, **options))
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        self.sizes = sizes
        total = sum(sizes)
        if table is not None:
            if isinstance(table, dict):
                missing = set(self.shapes) ^ set(table)
                if missing:
                    raise ValueError(
                        f"Conditional({layer.__name__}): table entries {sorted(table)} do not "
                        f"match the parameters {sorted(self.shapes)}"
                    )
                table = torch.cat(
                    [torch.as_tensor(table[k]).reshape(len(table[k]), -1) for k in self.shapes],
                    -1,
                )
            source = table if isinstance(table, ChartTable) else ChartTable(table, learnable)
        elif context_features is None:
            raise ValueError(
                f"Conditional({layer.__name__}): give context_features (a hypernet of the "
                "context) or a per-chart table"
            )
        else:
            source = Hypernet(context_features, total, hidden, initial=initial)
        if source.out_features != total:
            raise ValueError(
                f"Conditional({layer.__name__}): the source gives {source.out_features} "
                f"parameters, the layer takes {total}"
            )
        self.source = source

    @property
    def context_features(self) -> int | None:
        """Size of the context (``None`` for a per-chart table, indexed by chart number)."""
        return getattr(self.source, "context_features", None)

    def raw_parameters(self, context) -> dict[str, torch.Tensor]:
        """The layer's raw parameters for ``context``, split by name: one row per context row,
        or per chart under a :class:`ChartContext` (per row when the context has per-row
        ``inputs`` and the source is a hypernet; a table is per chart and ignores them)."""
        if isinstance(self.source, ChartTable) and isinstance(context, ChartContext):
            return cached(self, "raw", (), lambda: self._split(self.source()))
        if isinstance(context, ChartContext) and context.per_chart:
            features = context.features
            return cached(self, "raw", (features,), lambda: self._split(self.source(features)))
        if isinstance(context, ChartContext):
            return self._split(self.source(context.rows()))
        return self._split(self.source(context))

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self.sizes, -1)
        return {
            name: part.reshape(part.shape[:-1] + shape)
            for (name, shape), part in zip(self.shapes.items(), parts, strict=True)
        }

    def condition(self, context):
        index = None
        if isinstance(context, ChartContext) and (
            context.per_chart or isinstance(self.source, ChartTable)
        ):
            index = context.index
        if index is not None and isinstance(self.source, Hypernet):
            # In training the hypernet and what the layer builds per chart (e.g. a frame's WY
            # form) run for the charts the rows use only (ChartContext.charts_in_use).
            features, position = context.charts_in_use()
            if features is not context.features:
                params = self._split(self.source(features))
                return self.layer.from_parameters(
                    *self.args, params, index=position, **self.options
                )
        params = self.raw_parameters(context)
        return self.layer.from_parameters(*self.args, params, index=index, **self.options)

    def extra_repr(self) -> str:
        return f"{self.layer.__name__}{tuple(self.args)}"


class ConditionalCompose(ConditionalTransformModule):
    r"""Conditional composition: ``condition(v)`` conditions every conditional part and composes
    the results (unconditional parts are used as they are) into a
    :class:`~atlasdist.transforms.ConformalEmbedding` when every part is conformal, an
    :class:`~atlasdist.transforms.InjectiveCompose` otherwise.

    Example:
        >>> from atlasdist.transforms import Scale, Shift, StiefelEmbedding
        >>> c = ConditionalCompose([
        ...     Conditional(StiefelEmbedding, 2, 3, context_features=4),
        ...     Conditional(Scale, 3, context_features=4),
        ...     Conditional(Shift, 3, context_features=4)])
        >>> v = torch.randn(8, 4)  # one chart centre per row
        >>> c.condition(v)(torch.randn(8, 2)).shape
        torch.Size([8, 3])
    """

    chart_aware = True  # takes a ChartContext

    def __init__(self, parts, in_features: int | None = None):
        super().__init__()
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("ConditionalCompose needs at least one part")
        self.in_features = in_features
        self.part_modules = nn.ModuleList([p for p in self.parts if isinstance(p, nn.Module)])
        contexts = {p.context_features for p in self.parts if getattr(p, "context_features", None)}
        if len(contexts) > 1:
            raise ValueError(f"parts disagree on context_features: {sorted(contexts)}")

    @property
    def context_features(self) -> int | None:
        sizes = [getattr(p, "context_features", None) for p in self.parts]
        return next((c for c in sizes if c), None)

    def condition(self, context):
        parts = [condition(p, context) for p in self.parts]
        compose = ConformalEmbedding if all(map(is_conformal, parts)) else InjectiveCompose
        return compose(parts, in_features=self.in_features)


class ConditionalProduct(ConditionalCompose):
    r"""Conditional product embedding: ``condition(v)`` conditions every conditional part and
    combines the results into a :class:`~atlasdist.transforms.ProductEmbedding`,
    :math:`(u_1, \dots, u_n) \mapsto (c_1(u_1), \dots, c_n(u_n))` (e.g. the product charts
    of a torus, one stereographic circle per angle with a pole per chart).

    Example:
        >>> from atlasdist.transforms import InverseStereographic
        >>> c = ConditionalProduct([
        ...     Conditional(InverseStereographic, 1, table=torch.zeros(3, 2)),
        ...     Conditional(InverseStereographic, 1, table=torch.zeros(3, 2))])
        >>> ctx = ChartContext(torch.eye(3), torch.tensor([0, 2]))
        >>> c.condition(ctx)(torch.zeros(2, 2)).shape
        torch.Size([2, 4])
    """

    def condition(self, context):
        return ProductEmbedding([condition(p, context) for p in self.parts])


class ChartDenseNN(ConditionalDenseNN):
    r"""Pyro's ``ConditionalDenseNN`` (an MLP of ``[context, x]``) that, under a
    :class:`ChartContext`, computes the context part of its first layer once per chart,
    :math:`W_c v_k + b` (:math:`K` rows), and gathers it for the rows: per row it only runs
    :math:`W_x x` (plus :math:`W_e e` for per-row inputs :math:`e`) and the layers after the
    first. Same parameters, same values as the plain network on ``context.rows()``."""

    chart_aware = True  # takes a ChartContext

    def forward(self, x, context):
        if not isinstance(context, ChartContext):
            return super().forward(x, context)
        first = self.layers[0]
        c = self.context_dim
        f = context.features.shape[-1]
        e = 0 if context.inputs is None else context.inputs.shape[-1]
        if f + e != c:
            raise ValueError(
                f"ChartDenseNN: the network takes a context of {c} features, the chart context "
                f"gives {f} chart features and {e} inputs"
            )
        # The chart part per chart (for the charts in use only, in training), gathered.
        features, index = context.charts_in_use()
        per_chart = cached(
            self,
            "chart terms",
            (features,),
            lambda: nn.functional.linear(features, first.weight[:, :f], first.bias),
        )
        rows = per_chart.index_select(0, index)
        # The gathered rows are a fresh tensor that autograd does not keep (index_select saves
        # only its index), so the products accumulate into it in place: out-of-place addmm
        # would first copy the (rows, hidden) term into a new allocation. torch.func
        # transforms get the out-of-place form (the rows may be unbatched where x is not).
        in_place = not _functorch_active()
        if e:
            rows = (rows.addmm_ if in_place else rows.addmm)(
                context.inputs, first.weight[:, f:c].mT
            )
        if x.dim() == 2:  # the chart part enters the product as its added term
            # (out of place when one context row broadcasts over the rows of x)
            in_place = in_place and rows.shape[0] == x.shape[0]
            h = (rows.addmm_ if in_place else rows.addmm)(x, first.weight[:, c:].mT)
        else:
            h = nn.functional.linear(x, first.weight[:, c:]) + rows
        # A ReLU in place: h is a fresh product that autograd does not keep (a linear layer
        # saves its input, not its output), and a fresh (rows, hidden) allocation per layer is
        # a measurable share of the time.
        relu = type(self.f) is nn.ReLU
        for layer in self.layers[1:]:
            h = layer(torch.relu_(h) if relu else self.f(h))
        if self.output_multiplier == 1 or self.count_params == 1:
            return h
        return tuple(h[..., s] for s in self.param_slices)


def chart_affine_coupling(
    features: int, context_features: int, hidden: Sequence[int] = (64, 64)
) -> pyro_t.ConditionalAffineCoupling:
    r"""Pyro's conditional affine coupling on :math:`\mathbb{R}^d` with a :class:`ChartDenseNN`
    (same map as ``pyro.distributions.transforms.conditional_affine_coupling``)."""
    name = "chart_affine_coupling"
    features = check_count(features, "features", name, minimum=2)  # both halves non-empty
    context_features = check_count(context_features, "context_features", name)
    hidden = check_sizes(hidden, "hidden", name, nonempty=True)  # Pyro's networks need one
    split = features // 2
    net = ChartDenseNN(split, context_features, list(hidden), [features - split, features - split])
    return pyro_t.ConditionalAffineCoupling(split, net)


class _ChartSplineLayer(ConditionalTransformModule):
    # A chart-conditioned spline layer: checks and keeps its options, then builds its knot
    # network (``_network(hidden)``).

    chart_aware = True  # takes a ChartContext
    _min_features = 1

    def __init__(
        self,
        features: int,
        context_features: int,
        hidden: Sequence[int] = (64, 64),
        count_bins: int = 8,
        bound: float = 3.0,
    ):
        super().__init__()
        name = type(self).__name__
        self.features = check_count(features, "features", name, minimum=self._min_features)
        self.context_features = check_count(context_features, "context_features", name)
        self.count_bins = check_count(count_bins, "count_bins", name)
        check_parameter(bound, "bound", name, positive=True)
        self.bound = float(bound)
        self.nn = self._network(list(check_sizes(hidden, "hidden", name, nonempty=True)))

    def _network(self, hidden: list) -> nn.Module:
        raise NotImplementedError  # abstract


class ChartSpline(_ChartSplineLayer):
    r"""Conditional elementwise rational-quadratic spline
    (:class:`~atlasdist.transforms.RationalQuadraticSpline`) whose knots are an MLP of the
    context: under a :class:`ChartContext` they are computed once per chart and looked up by
    chart index (per row when the context has per-row inputs).

    Arguments:
        features: :math:`d`.
        context_features: size of the chart features.
        hidden: hidden sizes of the knot network.
        count_bins: spline segments :math:`S`.
        bound: the spline is the identity outside :math:`[-B, B]`.
    """

    def _network(self, hidden: list) -> nn.Module:
        d, bins = self.features, self.count_bins
        return DenseNN(
            self.context_features, hidden, param_dims=[d * bins, d * bins, d * (bins - 1)]
        )

    def knots(self, context: torch.Tensor):
        """Knot tables ``(xs, ys, ds)`` of shape :math:`(R, d, S + 1)` for contexts
        :math:`(R, c)`."""
        check_features(context, self.context_features, "ChartSpline", "context")
        context = context.reshape(-1, self.context_features)
        widths, heights, derivatives = self.nn(context)
        d, bins = self.features, self.count_bins
        return spline_knots(
            widths.reshape(-1, d, bins),
            heights.reshape(-1, d, bins),
            derivatives.reshape(-1, d, bins - 1),
            self.bound,
        )

    def condition(self, context):
        # Knots from spline_knots are valid by construction: not checked per call.
        index = None
        if not isinstance(context, ChartContext):
            knots = self.knots(context)
        elif not context.per_chart:  # knots depend on each row's inputs
            knots = self.knots(context.rows())
        else:  # per chart: for the charts in use only, in training
            features, index = context.charts_in_use()
            knots = cached(self, "knots", (features,), lambda: self.knots(features))
        with trusted_parameters():
            return RationalQuadraticSpline(*knots, bound=self.bound, index=index)


class SplineCoupling(OnePassBijection):
    r"""Rational-quadratic spline coupling of :math:`\mathbb{R}^d` (Durkan et al. 2019):
    :math:`(x_a, x_b) \mapsto (x_a,\ s(x_b;\ \theta(x_a)))`, :math:`x_a` the first
    ``split`` coordinates, :math:`s` a monotonic rational-quadratic spline of each coordinate
    of :math:`x_b` (:class:`~atlasdist.transforms.RationalQuadraticSpline`, the identity
    outside :math:`[-B, B]`) whose knots are a function of :math:`x_a`;
    :math:`\log|\det J| = \sum_i \log s_i'(x_{b,i})`. Inverse: the same knots from
    :math:`y_a = x_a`, the closed-form inverse spline. Built by
    :class:`ChartSplineCoupling` (knots from a chart-conditioned network).

    Arguments:
        features: :math:`d \ge 2`.
        split: size of :math:`x_a`, :math:`1 \le` ``split`` :math:`< d`.
        knots_of: maps :math:`x_a` :math:`(*, \text{split})` to knot tables ``(xs, ys, ds)``
            of shape :math:`(\prod *, d - \text{split}, S + 1)`, one per row
            (:func:`~atlasdist.transforms.spline_knots`; trusted, not checked).
        bound: :math:`B`.
        network: the module ``knots_of`` runs, if any: the layer computes in its dtype and on
            its device (and refuses inputs in others).
    """

    def __init__(
        self, features: int, split: int, knots_of, bound: float, network: nn.Module | None = None
    ):
        super().__init__(features, features)
        if not 1 <= split < features:
            raise ValueError(f"SplineCoupling: split must be in [1, {features}), got {split}")
        self.split, self.knots_of, self.bound = split, knots_of, float(bound)
        self.network = network

    def _map(self, x, inverse: bool):
        a, b = x[..., : self.split], x[..., self.split :]
        knots = self.knots_of(a)
        flat = b.reshape(-1, b.shape[-1])  # one knot table per row
        if knots[0].shape[0] != flat.shape[0]:  # shapes only: no device sync
            raise ValueError(
                f"SplineCoupling: the knot network gave {knots[0].shape[0]} knot tables for "
                f"{flat.shape[0]} input rows; the input must have one row per row of the "
                "context (e.g. per chart index)"
            )
        with trusted_parameters():
            spline = RationalQuadraticSpline(*knots, bound=self.bound)
        out, ladj = spline._map(flat, inverse=inverse)
        y = torch.cat([a, out.reshape(b.shape)], -1)
        return y, ladj.reshape(b.shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.in_features}, split={self.split}, bound={self.bound}"


class ChartSplineCoupling(_ChartSplineLayer):
    r"""Chart-conditioned rational-quadratic spline coupling: ``condition(context)`` is the
    :class:`SplineCoupling` whose knots for :math:`x_b` are a :class:`ChartDenseNN` of
    :math:`[v, x_a]` (chart features, and per-row inputs when the context has them), so each
    coordinate's spline depends on the other half and on the chart. Under a
    :class:`ChartContext` the chart part of the network's first layer is computed once per
    chart. Where :func:`chart_affine_coupling` links the halves only through a shift and a
    scale, this moves each coordinate of :math:`x_b` by a monotonic spline of :math:`x_a`:
    sharp, many-peaked conditionals at the cost of one network pass and one spline per layer
    (the inverse is closed-form too, unlike an autoregressive spline's :math:`d` passes).

    Arguments:
        features: :math:`d \ge 2` (the first :math:`\lfloor d/2 \rfloor` coordinates
            condition the rest).
        context_features: size of the context (chart features plus per-row inputs).
        hidden: hidden sizes of the knot network.
        count_bins: spline segments :math:`S`.
        bound: the splines are the identity outside :math:`[-B, B]`.

    Example:
        >>> coupling = ChartSplineCoupling(2, 3, hidden=(8,), count_bins=4)
        >>> context = ChartContext(torch.randn(5, 3), torch.tensor([0, 4, 4]))
        >>> f = coupling.condition(context)
        >>> x = torch.randn(3, 2)
        >>> torch.allclose(f.inv(f(x)), x, atol=1e-5)
        True
    """

    _min_features = 2  # both halves non-empty

    def _network(self, hidden: list) -> nn.Module:
        self.split = self.features // 2
        rest, bins = self.features - self.split, self.count_bins
        param_dims = [rest * bins, rest * bins, rest * (bins - 1)]
        return ChartDenseNN(self.split, self.context_features, hidden, param_dims)

    def condition(self, context):
        rest, bins = self.features - self.split, self.count_bins

        def knots_of(a):
            widths, heights, derivatives = self.nn(a, context)
            return spline_knots(
                widths.reshape(-1, rest, bins),
                heights.reshape(-1, rest, bins),
                derivatives.reshape(-1, rest, bins - 1),
                self.bound,
            )

        return SplineCoupling(self.features, self.split, knots_of, self.bound, network=self.nn)
