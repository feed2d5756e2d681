r"""Chart-conditioned conformal layers.

Each class is a Pyro ``ConditionalTransformModule``: a small network (the *hypernetwork*) maps
a context vector :math:`v` (a chart centre) to the parameters of a conformal layer, and
``.condition(v)`` returns that layer with the parameters fixed. With a batch of contexts of
shape :math:`(B, c)` the returned layer holds :math:`B` parameter sets and acts row-wise on
inputs of shape :math:`(*, B, n)`: this is how every chart of an atlas gets its own embedding
from one set of shared weights.

The hypernetworks' last layer starts at zero, so every conditioned layer starts at a fixed
map (the identity for shifts, scales and Möbius maps; :math:`[I_d; 0]` for the Stiefel and
orthogonal maps; the north pole for the stereographic chart).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn

from .._checks import check_features
from .conformal import (
    ConformalEmbedding,
    InverseStereographic,
    Mobius,
    Orthogonal,
    Scale,
    Shift,
    StiefelEmbedding,
)
from .injective import InjectiveCompose

__all__ = [
    "Hypernet",
    "ChartTable",
    "householder_stiefel",
    "householder_stiefel_raw",
    "ConditionalShift",
    "ConditionalScale",
    "ConditionalOrthogonal",
    "ConditionalStiefelEmbedding",
    "ConditionalMobius",
    "ConditionalInverseStereographic",
    "ConditionalInjectiveCompose",
    "ConditionalConformalEmbedding",
]


class Hypernet(nn.Module):
    """MLP ``context (*, c) -> parameters (*, p)`` with zero-initialised output layer."""

    def __init__(self, context_features: int, out_features: int, hidden: Sequence[int] = (32,)):
        super().__init__()
        if int(context_features) < 1:
            raise ValueError(f"context_features must be >= 1, got {context_features}")
        self.context_features = int(context_features)
        sizes = [self.context_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.SiLU()]
        last = nn.Linear(sizes[-1], out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        check_features(context, self.context_features, "condition", "context")
        return self.net(context)


class ChartTable(nn.Module):
    r"""A table of per-chart parameters, looked up by a one-hot chart context:
    ``context (*, K) -> context @ table (*, p)``.

    Use it as the ``hypernet`` of a conditional layer to give each of :math:`K` charts its own
    free (or fixed, ``learnable=False``) parameters instead of shared weights, e.g. known
    stereographic poles, or a circle's centre and radius per chart. The values are the raw
    parameters of the layer (see each layer). With ``context_features`` larger than
    :math:`K`, the context is ``[one-hot (K), anything else]`` and only its first :math:`K`
    entries are read (so the same context can also feed shared-weight layers).

    Arguments:
        table: tensor of shape :math:`(K, p)`.
        learnable: whether the table is an ``nn.Parameter``.
        context_features: total context size (default :math:`K`).
    """

    def __init__(
        self, table: torch.Tensor, learnable: bool = True, context_features: int | None = None
    ):
        super().__init__()
        if table.dim() != 2:
            raise ValueError(f"ChartTable: table must have shape (K, p), got {tuple(table.shape)}")
        if learnable:
            self.table = nn.Parameter(table.clone())
        else:
            self.register_buffer("table", table.clone())
        self.context_features = table.shape[0] if context_features is None else context_features
        if self.context_features < table.shape[0]:
            raise ValueError(
                f"ChartTable: context_features ({self.context_features}) < number of charts "
                f"({table.shape[0]})"
            )
        self.out_features = table.shape[1]

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        check_features(context, self.context_features, "ChartTable", "one-hot context")
        return context[..., : self.table.shape[0]] @ self.table


def householder_stiefel(raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r"""A matrix with orthonormal columns from unconstrained parameters, as a product of
    Householder reflections.

    ``raw`` of shape :math:`(*, p)` with :math:`p = \sum_{j<k} (n - 1 - j)` fills the strictly
    lower-triangular part of the :math:`n\times k` reflector matrix :math:`V` (unit diagonal
    implied); reflector :math:`j` gets :math:`\tau_j = 2/|v_j|^2`, which makes it an exact
    reflection. Returns :math:`-H_1\cdots H_k [I_k; 0]`, shape :math:`(*, n, k)`, which is
    :math:`[I_k; 0]` at ``raw = 0``. Cost :math:`O(n k^2)`.
    """
    rows_idx, cols_idx = torch.tril_indices(rows, cols, offset=-1, device=raw.device)
    v = raw.new_zeros(raw.shape[:-1] + (rows, cols))
    v[..., rows_idx, cols_idx] = raw
    tau = 2 / (1 + v.pow(2).sum(-2))
    eye = torch.eye(rows, cols, dtype=raw.dtype, device=raw.device)
    return -torch.linalg.householder_product(v + eye, tau)


def householder_stiefel_raw(w: torch.Tensor) -> torch.Tensor:
    r"""Raw parameters whose :func:`householder_stiefel` spans the same column space as ``w``
    (shape :math:`(*, n, k)`, full column rank): the Householder vectors of the QR
    factorisation of ``w`` (LAPACK ``geqrf``). The columns may come out with other signs or
    rotated within the span; use it to initialise a chart's orientation."""
    a, _ = torch.geqrf(w)
    rows, cols = torch.tril_indices(w.shape[-2], w.shape[-1], offset=-1, device=w.device)
    return a[..., rows, cols]


def _num_reflector_params(rows: int, cols: int) -> int:
    return sum(rows - 1 - j for j in range(cols))


class _ConditionalLayer(ConditionalTransformModule):
    def __init__(self, context_features, num_params, hidden, hypernet=None):
        super().__init__()
        if hypernet is None:
            hypernet = Hypernet(context_features, num_params, hidden)
        elif getattr(hypernet, "out_features", num_params) != num_params:
            raise ValueError(
                f"{type(self).__name__}: the hypernet gives {hypernet.out_features} parameters, "
                f"the layer takes {num_params}"
            )
        self.hypernet = hypernet

    @property
    def context_features(self) -> int:
        return self.hypernet.context_features


class ConditionalShift(_ConditionalLayer):
    r""":math:`x \mapsto x + b(v)`; ``condition(v)`` gives a :class:`Shift`."""

    def __init__(
        self,
        features: int,
        context_features: int,
        hidden: Sequence[int] = (32,),
        hypernet: nn.Module | None = None,
    ):
        super().__init__(context_features, features, hidden, hypernet)
        self.features = features

    def condition(self, context):
        return Shift(self.features, shift=self.hypernet(context))


class ConditionalScale(_ConditionalLayer):
    r""":math:`x \mapsto e^{s(v)} x`; ``condition(v)`` gives a :class:`Scale`."""

    def __init__(
        self,
        features: int,
        context_features: int,
        hidden: Sequence[int] = (32,),
        hypernet: nn.Module | None = None,
    ):
        super().__init__(context_features, 1, hidden, hypernet)
        self.features = features

    def condition(self, context):
        return Scale(self.features, log_scale=self.hypernet(context)[..., 0])


class ConditionalOrthogonal(_ConditionalLayer):
    r""":math:`x \mapsto Q(v) x` with :math:`Q(v)` orthogonal (:func:`householder_stiefel`);
    ``condition(v)`` gives an :class:`Orthogonal`."""

    def __init__(
        self,
        features: int,
        context_features: int,
        hidden: Sequence[int] = (32,),
        hypernet: nn.Module | None = None,
    ):
        super().__init__(
            context_features, _num_reflector_params(features, features), hidden, hypernet
        )
        self.features = features

    def condition(self, context):
        q = householder_stiefel(self.hypernet(context), self.features, self.features)
        return Orthogonal(self.features, weight=q)


class ConditionalStiefelEmbedding(_ConditionalLayer):
    r""":math:`u \mapsto W(v) u`, :math:`W(v)^\top W(v) = I_d` (:func:`householder_stiefel`);
    ``condition(v)`` gives a :class:`StiefelEmbedding`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        context_features: int,
        hidden: Sequence[int] = (32,),
        hypernet: nn.Module | None = None,
    ):
        if out_features < in_features:
            raise ValueError(
                f"an injective map needs in_features <= out_features, "
                f"got d={in_features} > D={out_features}"
            )
        super().__init__(
            context_features, _num_reflector_params(out_features, in_features), hidden, hypernet
        )
        self.in_features, self.out_features = in_features, out_features

    def condition(self, context):
        w = householder_stiefel(self.hypernet(context), self.out_features, self.in_features)
        return StiefelEmbedding(self.in_features, self.out_features, weight=w)


class ConditionalMobius(_ConditionalLayer):
    r"""Special conformal transformation with :math:`b(v)`; ``condition(v)`` gives a
    :class:`Mobius` (with ``radius``, :math:`|b(v)| < 1/R` for every context)."""

    def __init__(
        self,
        features: int,
        context_features: int,
        radius: float | None = None,
        hidden: Sequence[int] = (32,),
        hypernet: nn.Module | None = None,
    ):
        super().__init__(context_features, features, hidden, hypernet)
        self.features, self.radius = features, radius

    def condition(self, context):
        return Mobius(self.features, radius=self.radius, raw=self.hypernet(context))


class ConditionalInverseStereographic(_ConditionalLayer):
    r"""Inverse stereographic projection from the pole
    :math:`p(v) = (e_{d+1} + r(v)) / |e_{d+1} + r(v)|`; ``condition(v)`` gives an
    :class:`InverseStereographic`."""

    def __init__(
        self,
        in_features: int,
        context_features: int,
        hidden: Sequence[int] = (32,),
        hypernet: nn.Module | None = None,
    ):
        super().__init__(context_features, in_features + 1, hidden, hypernet)
        self.in_features = in_features

    def condition(self, context):
        raw = self.hypernet(context)
        north = torch.zeros_like(raw)
        north[..., -1] = 1
        pole = nn.functional.normalize(north + raw, dim=-1)
        return InverseStereographic(self.in_features, pole=pole)


class ConditionalInjectiveCompose(ConditionalTransformModule):
    r"""Conditional composition: ``condition(v)`` conditions every conditional part and
    returns an :class:`~atlasdist.transforms.InjectiveCompose` of the results (unconditional
    parts are used as they are)."""

    _compose = InjectiveCompose

    def __init__(self, parts, in_features: int | None = None):
        super().__init__()
        self.parts = list(parts)
        self.in_features = in_features
        self.part_modules = nn.ModuleList([p for p in self.parts if isinstance(p, nn.Module)])
        self._check_parts()

    def _check_parts(self):
        contexts = {p.context_features for p in self.parts if hasattr(p, "context_features")}
        if len(contexts) > 1:
            raise ValueError(f"parts disagree on context_features: {sorted(contexts)}")

    def condition(self, context):
        parts = [
            p.condition(context) if isinstance(p, ConditionalTransformModule) else p
            for p in self.parts
        ]
        return self._compose(parts, in_features=self.in_features)


class ConditionalConformalEmbedding(ConditionalInjectiveCompose):
    r"""Conditional :class:`~atlasdist.transforms.ConformalEmbedding`.

    Example:
        >>> c = ConditionalConformalEmbedding([
        ...     ConditionalStiefelEmbedding(2, 3, context_features=4),
        ...     ConditionalScale(3, context_features=4), ConditionalShift(3, context_features=4)])
        >>> v = torch.randn(8, 4)  # one chart centre per row
        >>> c.condition(v)(torch.randn(8, 2)).shape
        torch.Size([8, 3])
    """

    _compose = ConformalEmbedding
