r"""``AtlasFlow``: the ``nn.Module`` that owns an atlas's learnable parts and builds its
:class:`~atlasdist.distributions.AtlasFlowDistribution` (the lazy-distribution pattern: the
module holds parameters, so ``.to(device)``, ``state_dict``, ``pyro.module`` and optimizers
work; the distribution is a cheap object built per call)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions.transforms as pyro_t
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from .charts import ChartMembership
from .distributions.atlas import AtlasFlowDistribution
from .transforms import (
    ChartTable,
    ConditionalConformalEmbedding,
    ConditionalInverseStereographic,
    ConditionalMobius,
    ConditionalScale,
    ConditionalShift,
    ConditionalStiefelEmbedding,
    householder_stiefel_raw,
)

__all__ = ["AtlasFlow", "default_latent_flow", "default_embedding"]


def default_latent_flow(
    d: int,
    context_features: int,
    layers: int = 2,
    hidden: Sequence[int] = (64, 64),
    count_bins: int = 8,
    bound: float = 4.0,
) -> list:
    r"""Chart-conditioned latent flow :math:`h` on :math:`\mathbb{R}^d`: ``layers`` blocks of
    a conditional rational spline (elementwise, identity outside :math:`[-B, B]`) followed,
    for :math:`d > 1`, by a conditional affine coupling and a permutation."""
    if count_bins == d:
        count_bins += 1  # Pyro's ConditionalSpline misreads its parameter shapes when bins == d
    parts: list = []
    for _ in range(layers):
        parts.append(
            pyro_t.conditional_spline(
                d, context_features, hidden_dims=list(hidden), count_bins=count_bins, bound=bound
            )
        )
        if d > 1:
            parts.append(
                pyro_t.conditional_affine_coupling(d, context_features, hidden_dims=list(hidden))
            )
            parts.append(pyro_t.Permute(torch.arange(d - 1, -1, -1)))
    return parts


def default_embedding(d: int, D: int, context_features: int, hidden: Sequence[int] = (32,)):
    r"""Chart-conditioned conformal embedding :math:`c`: inverse stereographic projection onto
    :math:`S^d`, an isometric embedding into :math:`\mathbb{R}^D` (when :math:`D > d+1`), a
    scale and a shift, all produced from the chart context. Each chart's image is a
    :math:`d`-sphere of learned radius, centre and orientation."""
    parts = [ConditionalInverseStereographic(d, context_features, hidden)]
    if D > d + 1:
        parts.append(ConditionalStiefelEmbedding(d + 1, D, context_features, hidden))
    parts += [
        ConditionalScale(D, context_features, hidden),
        ConditionalShift(D, context_features, hidden),
    ]
    return ConditionalConformalEmbedding(parts)


class AtlasFlow(nn.Module):
    r"""An atlas of :math:`K` injective flows :math:`g_k = c_k \circ h_k: \mathbb{R}^d \to
    \mathbb{R}^D` with shared weights; ``flow()`` (or calling the module) returns the
    :class:`~atlasdist.distributions.AtlasFlowDistribution`.

    Every part is replaceable; the defaults suit toy data.

    Arguments:
        D: ambient dimension.
        d: latent (manifold) dimension, :math:`d < D`.
        charts: number of charts :math:`K`.
        centres: initial chart centres in code space, shape :math:`(K, c)` (default: standard
            normal, code space = data space).
        learn_centres: whether the centres are parameters.
        context: fixed conditioning context per chart, shape :math:`(K, c')` (e.g. the
            identity for per-chart tables, :class:`~atlasdist.transforms.ChartTable`);
            default: the centres.
        flows: latent flow parts (default :func:`default_latent_flow`).
        embedding: conformal embedding (default :func:`default_embedding`).
        base: base distribution on :math:`\mathbb{R}^d` (default standard normal, moved with
            the module).
        membership: chart membership (default ``ChartMembership(m=min(2, K))``).
        atol, noise_scale: see :class:`~atlasdist.distributions.AtlasFlowDistribution`.

    Example:
        >>> atlas = AtlasFlow(D=3, d=2, charts=4)
        >>> p = atlas.flow()
        >>> p.sample((2,)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        D: int,
        d: int,
        charts: int,
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
    ):
        super().__init__()
        if not 1 <= d < D:
            raise ValueError(f"AtlasFlow needs 1 <= d < D, got d={d}, D={D}")
        if charts < 1:
            raise ValueError(f"AtlasFlow needs at least one chart, got {charts}")
        self.D, self.d, self.num_charts = D, d, charts
        centres = torch.randn(charts, D) if centres is None else torch.as_tensor(centres)
        if centres.dim() != 2 or centres.shape[0] != charts:
            raise ValueError(f"centres must have shape ({charts}, c), got {tuple(centres.shape)}")
        if learn_centres:
            self.centres = nn.Parameter(centres.clone())
        else:
            self.register_buffer("centres", centres.clone())
        if context is not None:
            self.register_buffer("context", torch.as_tensor(context).clone())
        else:
            self.context = None
        context_features = (centres if context is None else self.context).shape[-1]
        if flows is None:
            flows = default_latent_flow(d, context_features, layers, hidden, count_bins)
        self.flow_parts = list(flows)
        self.flow_modules = nn.ModuleList([p for p in self.flow_parts if isinstance(p, nn.Module)])
        self.embedding = (
            default_embedding(d, D, context_features) if embedding is None else embedding
        )
        self.base = base
        self.register_buffer("_base_loc", torch.zeros(d))
        self.membership = ChartMembership(m=min(2, charts)) if membership is None else membership
        self.logits = nn.Parameter(torch.zeros(charts))
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
        r"""An atlas whose chart :math:`k` is the inverse stereographic projection from the
        pole :math:`p_k` onto the :math:`d`-sphere of centre :math:`o_k` and radius
        :math:`r_k` in :math:`\mathbb{R}^{d+1}`: the exact charts of known spheres (one sphere
        covered from several poles, or several disjoint spheres, e.g. two circles).

        Charts are conditioned on a one-hot context through
        :class:`~atlasdist.transforms.ChartTable` s (fixed unless ``learnable``); the latent
        flow is shared (conditioned on the same one-hot context). The chart centres used for
        membership are the points opposite the poles, :math:`o_k - r_k p_k`, where each chart
        is least distorted.

        Arguments:
            d: sphere dimension.
            centres: :math:`o_k`, shape :math:`(K, d+1)`.
            radii: :math:`r_k > 0`, shape :math:`(K,)`.
            poles: unit vectors :math:`p_k`, shape :math:`(K, d+1)`.
            kwargs: passed to :class:`AtlasFlow` (``membership``, ``layers``, ``hidden``...).

        Example:
            >>> north, south = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -1.0]])
            >>> circle = AtlasFlow.spheres(1, torch.zeros(2, 2), torch.ones(2),
            ...                            torch.cat([north, south]))
            >>> circle.flow().sample((3,)).norm(dim=-1)
            tensor([1.0000, 1.0000, 1.0000])
        """
        centres, radii, poles = (
            torch.as_tensor(t, dtype=torch.get_default_dtype()) for t in (centres, radii, poles)
        )
        K, D = poles.shape
        if D != d + 1 or centres.shape != (K, D) or radii.shape != (K,):
            raise ValueError(
                f"spheres: need centres and poles of shape (K, {d + 1}) and radii (K,), got "
                f"{tuple(centres.shape)}, {tuple(poles.shape)}, {tuple(radii.shape)}"
            )
        if not bool((radii > 0).all()):
            raise ValueError(f"spheres: radii must be > 0, got {radii.tolist()}")
        north = torch.zeros(D)
        north[-1] = 1
        embedding = ConditionalConformalEmbedding(
            [
                ConditionalInverseStereographic(
                    d, K, hypernet=ChartTable(poles - north, learnable=learnable)
                ),
                ConditionalScale(D, K, hypernet=ChartTable(radii.log()[:, None], learnable)),
                ConditionalShift(D, K, hypernet=ChartTable(centres, learnable)),
            ]
        )
        kwargs.setdefault("membership", ChartMembership(m=min(2, K)))
        return cls(
            D,
            d,
            K,
            centres=centres - radii[:, None] * poles,
            learn_centres=False,
            context=torch.eye(K),
            embedding=embedding,
            **kwargs,
        )

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
        r"""An atlas whose charts are the codes of a trained
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
            frames = torch.linalg.qr(torch.randn(K, D, d, dtype=data.dtype)).Q
            spread = torch.full((K,), float(data.std(0).mean()), dtype=data.dtype)
            counts = torch.bincount(labels, minlength=K)
            for k in range(K):  # initialisation only
                xk = data[labels == k]
                if len(xk) > d:
                    means[k] = xk.mean(0)
                    _, sv, vt = torch.linalg.svd(xk - means[k], full_matrices=False)
                    frames[k] = vt[:d].T
                    spread[k] = (sv[:d].pow(2).mean() / len(xk)).sqrt().clamp_min(1e-3)
        context = torch.cat([torch.eye(K, dtype=data.dtype), codebook.to(data.dtype)], -1)
        c = context.shape[-1]

        def table(values):
            return ChartTable(values, learnable=learn_geometry, context_features=c)

        embedding = ConditionalConformalEmbedding(
            [
                ConditionalStiefelEmbedding(
                    d, D, c, hypernet=table(householder_stiefel_raw(frames))
                ),
                ConditionalMobius(D, c, hypernet=table(torch.zeros(K, D, dtype=data.dtype))),
                ConditionalScale(D, c, hypernet=table(spread.log()[:, None])),
                ConditionalShift(D, c, hypernet=table(means)),
            ]
        )
        atlas = cls(
            D,
            d,
            K,
            centres=codebook,
            learn_centres=False,
            context=context,
            embedding=embedding,
            membership=vq.membership(m=m, eps=eps, cap=cap),
            **kwargs,
        )
        with torch.no_grad():
            atlas.logits.copy_((counts.to(atlas.logits.dtype) + 1).log())
        return atlas.to(data.dtype)

    def base_distribution(self) -> Distribution:
        if self.base is not None:
            return self.base
        loc = self._base_loc
        return Independent(Normal(loc, torch.ones_like(loc)), 1)

    def flow(self, noise_scale: float | None = ..., validate_args: bool | None = None):
        """The distribution with the current parameters (``noise_scale`` overrides the
        module's)."""
        return AtlasFlowDistribution(
            self.base_distribution(),
            self.flow_parts,
            self.embedding,
            self.centres,
            self.logits,
            self.membership,
            context=self.context,
            atol=self.atol,
            noise_scale=self.noise_scale if noise_scale is ... else noise_scale,
            validate_args=validate_args,
        )

    def forward(self) -> AtlasFlowDistribution:
        return self.flow()
