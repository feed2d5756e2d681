r"""Learned manifold priors: a Gaussian base :math:`\mathcal{N}(0, R\,S^2R^\top + \sigma^2 I)`
with learnable per-dimension scales :math:`S = \mathrm{diag}(s_1, \dots, s_D)`, and the
full-dimensional flow built on it. Scales that collapse (:math:`s_i \to 0`) mark directions
the data do not fill; the number that stay large is the intrinsic dimension.

Everything here is a density on :math:`\mathbb{R}^D` with respect to Lebesgue measure.

References:
    reference/001 (anonymous ICLR 2021 submission, *On the latent space of flow-based
    models*), Sections 1-2: a standard normal prior makes the latent space of manifold data
    "curl up" (Figure 1, :math:`x_2 = \sin(2 x_1)`); a learned prior whose spectrum collapses
    avoids it and reveals :math:`\mathrm{Indim}(P_d)`. Published as Zhang, Sun, Zhang &
    McDonagh, *Spread flows for manifold modelling*, AISTATS 2023 (arXiv:2109.14216), which
    trains with the spread divergence (Gaussian noise of fixed :math:`\sigma`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as pyro_t
import torch
from pyro.nn import ConditionalDenseNN
from torch import nn
from torch.distributions import Transform, constraints

from .._checks import (
    check_batch,
    check_count,
    check_features,
    check_finite,
    check_floating,
    check_parameter,
    check_sample_shape,
    check_sizes,
    model_tensor,
)
from .._linalg import matrix_exp
from ..lazy import LazyDistribution

__all__ = [
    "ManifoldPrior",
    "ManifoldPriorFlow",
    "largest_gap_dimension",
    "spread_negative_log_likelihood",
]


def largest_gap_dimension(scales: torch.Tensor, min_ratio: float = 2.5) -> torch.Tensor:
    r""":math:`\hat d = \arg\max_k \log(s_{(k)} / s_{(k+1)})` over the scales sorted in
    decreasing order, or :math:`D` when no ratio reaches ``min_ratio``.

    The threshold rule for a learned spectrum. After training, the scales form two groups:
    the :math:`d` tangent scales (the extent of the data along the manifold, of the order of
    the chart size) and the :math:`D - d` collapsed ones (what noise and left-over curvature
    leave, of the order of the noise). The boundary is the widest gap in log-scale. The rule
    is scale free (multiplying all scales by :math:`c > 0` changes nothing) and needs no
    noise level; ``min_ratio`` is the smallest gap taken as a collapse: without one, a
    full-dimensional spectrum (all ratios near 1) would still be cut at its widest ratio.
    Ties (gaps equal up to a few roundings of the input's dtype) go to the smallest
    :math:`k`. Zero scales count as :math:`10^{-30}`.

    Arguments:
        scales: non-negative scales of shape :math:`(*, D)`, in any order.
        min_ratio: the smallest ratio :math:`s_{(k)} / s_{(k+1)}` read as a collapse,
            :math:`> 1`.

    Returns:
        Integer tensor of shape :math:`(*)`, values in :math:`1..D`.

    Cost: a sort, :math:`O(D \log D)` per spectrum.

    Example:
        >>> largest_gap_dimension(torch.tensor([0.9, 0.02, 1.1, 0.03]))
        tensor(2)
        >>> largest_gap_dimension(torch.tensor([1.0, 0.8, 0.7]))
        tensor(3)
    """
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales: expected a torch.Tensor, got {type(scales).__name__}")
    if scales.dim() < 1 or scales.shape[-1] < 1:
        raise ValueError(f"scales must have shape (*, D) with D >= 1, got {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError("scales must be finite and >= 0")
    if not min_ratio > 1 or not math.isfinite(min_ratio):
        raise ValueError(f"min_ratio must be a finite number > 1, got {min_ratio}")
    D = scales.shape[-1]
    if D == 1:
        return torch.ones(scales.shape[:-1], dtype=torch.long, device=scales.device)
    # gaps within a few roundings of the input's precision are ties
    tol = 8 * torch.finfo(scales.dtype if scales.is_floating_point() else torch.float32).eps
    logs = scales.double().clamp_min(1e-30).log().sort(-1, descending=True).values
    gaps = logs[..., :-1] - logs[..., 1:]
    best = gaps.max(-1, keepdim=True).values
    k = (gaps >= best - tol).to(torch.int8).argmax(-1)  # the first of the widest gaps
    best = best.squeeze(-1)
    return torch.where(best >= math.log(min_ratio) - tol, k + 1, torch.full_like(k, D))


class _Orthogonal(Transform):
    r""":math:`y = c\,Q x + b` with :math:`Q` orthogonal, of shape :math:`(*, D, D)`."""

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, matrix, loc=None, scale: float = 1.0):
        super().__init__(cache_size=0)
        self.matrix, self.loc, self.scale = matrix, loc, float(scale)

    def _call(self, x):
        y = self.scale * (self.matrix @ x.unsqueeze(-1)).squeeze(-1)
        return y if self.loc is None else y + self.loc

    def _inverse(self, y):
        y = y if self.loc is None else y - self.loc
        return (self.matrix.mT @ y.unsqueeze(-1)).squeeze(-1) / self.scale

    def log_abs_det_jacobian(self, x, y):
        value = self.matrix.shape[-1] * math.log(self.scale)
        shape = torch.broadcast_shapes(x.shape[:-1], self.matrix.shape[:-2])
        return x.new_full(shape, value)


def _rotation(skew: torch.Tensor) -> torch.Tensor:
    upper = skew.triu(1)
    return matrix_exp(upper - upper.mT)


class ManifoldPriorDistribution(dist.TransformedDistribution):
    r"""Pyro's ``TransformedDistribution`` with the library's input checks
    (:doc:`/input_checks`): what :class:`ManifoldPrior` and :class:`ManifoldPriorFlow` return.
    Values are checked for type, dtype, device, shape, batch shape and finiteness under
    ``validate_args``; empty batches give empty results."""

    def log_prob(self, value):
        if self._validate_args:
            name = type(self).__name__
            check_floating(value, name, "value", model_tensor(self))
            check_features(value, self.event_shape[0], name, "value")
            check_batch(value.shape[:-1], self.batch_shape, name)
            check_finite(value, name, "value")
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        if math.prod(shape) == 0:
            return value.new_zeros(shape)
        return super().log_prob(value)

    def rsample(self, sample_shape=()):
        sample_shape = check_sample_shape(sample_shape, type(self).__name__)
        shape = self._extended_shape(sample_shape)
        if math.prod(shape) == 0:
            return model_tensor(self).new_zeros(shape)
        return super().rsample(sample_shape)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.rsample(sample_shape)


class ManifoldPrior(LazyDistribution):
    r"""The learnable base :math:`q = \mathcal{N}(0,\; R\,\mathrm{diag}(s^2)\,R^\top +
    \sigma^2 I_D)`, :math:`s_i = \exp(\ell_i)`; calling the module (a
    :class:`~atlasdist.lazy.LazyDistribution`, without a conditioning input) returns the
    distribution.

    - ``rotation=False``: :math:`R = I`, a diagonal Gaussian with learnable log-scales.
    - ``rotation=True``: :math:`R = \exp(A - A^\top)` is a learnable rotation, so the
      covariance is :math:`W W^\top + \sigma^2 I` with :math:`W = R\,\mathrm{diag}(s)`, the
      low-rank-plus-noise prior :math:`A A^\top` of the reference written in its singular
      value form. As scales collapse, :math:`W` has numerical rank :math:`d`.

    :math:`\sigma` (``noise``) is the spread: the floor that keeps the density finite when
    :math:`s_i \to 0` (reference: spread divergence). With ``noise=0`` the prior is
    :math:`\mathcal{N}(0, W W^\top)`, degenerate once a scale reaches 0.

    Arguments:
        dim: :math:`D`.
        batch_shape: leading shape of independent priors (e.g. ``(K,)``, one per chart).
        rotation: learn :math:`R`.
        noise: :math:`\sigma \ge 0`.
        init_scale: initial :math:`s_i` (a float or a tensor of shape ``batch_shape + (D,)``).

    Example:
        >>> prior = ManifoldPrior(3, rotation=True, noise=0.1)
        >>> q = prior()
        >>> q.sample((5,)).shape, q.log_prob(torch.zeros(3)).shape
        (torch.Size([5, 3]), torch.Size([]))

    Cost: :math:`O(D)` per point for the diagonal prior, :math:`O(D^2)` with the rotation
    plus a :math:`D \times D` matrix exponential per call.
    """

    def __init__(
        self,
        dim: int,
        *,
        batch_shape: Sequence[int] = (),
        rotation: bool = False,
        noise: float = 0.0,
        init_scale: float | torch.Tensor = 1.0,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"ManifoldPrior: dim must be an int >= 1, got {dim!r}")
        noise = float(noise)
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"ManifoldPrior: noise must be finite and >= 0, got {noise}")
        batch_shape = check_sample_shape(batch_shape, "ManifoldPrior", "batch_shape")
        shape = tuple(batch_shape) + (dim,)
        init = torch.as_tensor(init_scale)
        # A float64 init_scale makes a float64 prior (no round trip through float32).
        dtype = torch.float64 if init.dtype == torch.float64 else torch.get_default_dtype()
        init = init.to(dtype)
        if not bool(torch.isfinite(init).all()) or bool((init <= 0).any()):
            raise ValueError("ManifoldPrior: init_scale must be finite and > 0")
        try:
            torch.broadcast_shapes(init.shape, shape)
        except RuntimeError:
            raise ValueError(
                f"ManifoldPrior: init_scale must be a number or broadcast to batch_shape + (dim,)"
                f" = {shape}, got shape {tuple(init.shape)}"
            ) from None
        self.dim, self.noise = dim, noise
        self.log_scale = nn.Parameter(init.log().expand(shape).clone())
        self.skew = nn.Parameter(torch.zeros(shape + (dim,), dtype=dtype)) if rotation else None

    @property
    def batch_shape(self) -> torch.Size:
        return self.log_scale.shape[:-1]

    @property
    def scales(self) -> torch.Tensor:
        r""":math:`s`, shape ``batch_shape + (D,)`` (unsorted, in the prior's axes)."""
        return self.log_scale.exp()

    def rotation(self) -> torch.Tensor | None:
        r""":math:`R`, shape ``batch_shape + (D, D)``, or ``None`` without rotation."""
        return None if self.skew is None else _rotation(self.skew)

    def spectrum(self) -> torch.Tensor:
        """The scales sorted in decreasing order, shape ``batch_shape + (D,)``."""
        return self.scales.detach().sort(-1, descending=True).values

    def intrinsic_dimension(self, min_ratio: float = 2.5) -> torch.Tensor:
        """:func:`largest_gap_dimension` of :meth:`spectrum`, shape ``batch_shape``."""
        return largest_gap_dimension(self.spectrum(), min_ratio)

    def covariance(self) -> torch.Tensor:
        r""":math:`R\,\mathrm{diag}(s^2)\,R^\top + \sigma^2 I`, shape
        ``batch_shape + (D, D)``."""
        var = self.scales.pow(2) + self.noise**2
        R = self.rotation()
        if R is None:
            return torch.diag_embed(var)
        return (R * var.unsqueeze(-2)) @ R.mT

    def forward(self, c: torch.Tensor | None = None) -> ManifoldPriorDistribution:
        """The prior with the current parameters; ``flow()`` is an alias. ``c`` must be
        ``None``."""
        self._no_context(c)
        scale = (self.scales.pow(2) + self.noise**2).sqrt()
        base = dist.Normal(torch.zeros_like(scale), scale).to_event(1)
        R = self.rotation()
        return ManifoldPriorDistribution(base, [] if R is None else [_Orthogonal(R)])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, batch_shape={tuple(self.batch_shape)}, noise={self.noise}"


class _ShiftNet(nn.Module):
    """Hypernetwork of a coupling: (shift, log-scale) of the last D - k coordinates from the
    first k and the chart context; zero at initialisation (the coupling starts as the
    identity); the log-scale is identically zero for a volume-preserving (additive)
    coupling."""

    def __init__(self, k, D, context, hidden, volume_preserving):
        super().__init__()
        self.volume_preserving = volume_preserving
        out = [D - k] if volume_preserving else [D - k, D - k]
        self.net = ConditionalDenseNN(k, context, list(hidden), out)
        nn.init.zeros_(self.net.layers[-1].weight)
        nn.init.zeros_(self.net.layers[-1].bias)

    def forward(self, x, context):
        out = self.net(x, context)
        if self.volume_preserving:
            return out, torch.zeros_like(out)
        return out


def _default_splits(D: int) -> list[int]:
    if D <= 8:
        return list(range(1, D))
    return sorted({round(v) for v in torch.linspace(1, D - 1, 8).tolist()})


def standardize(x: torch.Tensor, owner: str):
    r"""``(data, centre, scale, z)``: the points in float64, their mean, the square root of the
    top eigenvalue of their covariance and :math:`z = (x - \text{centre}) / \text{scale}`;
    ``ValueError`` naming ``owner`` when the data have zero spread."""
    data = x.detach().double()
    centre = data.mean(0)
    top = torch.linalg.eigvalsh(torch.atleast_2d(torch.cov(data.T)))[-1]
    if not top > 0:
        raise ValueError(f"{owner}: the data have zero spread")
    scale = float(top.sqrt())
    return data, centre, scale, (data - centre) / scale


class ManifoldPriorFlow(LazyDistribution):
    r"""A full-dimensional flow :math:`p(x) = q(f(x))\,|\det J_f(x)|` on :math:`\mathbb{R}^D`
    with a learned :class:`ManifoldPrior` :math:`q`, over :math:`K \ge 1` charts: a lazy
    module (:class:`~atlasdist.lazy.LazyDistribution`) whose ``forward()`` (or ``flow()``)
    returns the Pyro ``TransformedDistribution``.

    It takes no conditioning input: ``module(c)`` raises ``ValueError`` (its couplings are
    already conditioned, on the chart index).

    Chart :math:`k` maps :math:`x` to the prior's space by

    .. math::

        f_k(x) = c_L \circ \dots \circ c_1\big(R_k^\top F_k^\top
        (\tfrac{x - \mu}{\rho} - m_k)\big),

    a fixed normalisation (centre :math:`\mu`, scale :math:`\rho`), an orthonormal frame
    :math:`F_k R_k` centred at :math:`m_k` (:math:`F_k` fixed, the principal axes of the
    chart's data, major first; :math:`R_k = \exp(A_k - A_k^\top)` learned, starting at
    :math:`I`), then Pyro affine couplings :math:`c_j` shared by all charts and conditioned on
    the one-hot chart index; the prior :math:`q_k = \mathcal{N}(0, S_k^2 + \sigma^2 I)` is
    diagonal in this frame. Coupling :math:`j` moves the coordinates after its split
    :math:`k_j` by a function of those before: with the axes sorted by variance and a split
    at every index (:math:`D \le 8`), for every :math:`d` some layer can subtract from the
    :math:`D-d` minor coordinates a function of the :math:`d` major ones, the shear that
    flattens a manifold that is a graph over its tangent plane.

    The couplings are additive by default, all with the same orientation: their composition is
    triangular with unit diagonal, volume preserving (:math:`\log|\det J_f| = -D \log\rho`)
    and unable to rescale any axis, and :math:`R_k` is an isometry. This is what makes the
    spectrum mean something: a flow that can rescale absorbs the prior's scales
    (:math:`q(f(x))|\det J_f|` is unchanged when :math:`f` is followed by a scaling :math:`C`
    and the scales are multiplied by :math:`C`), so maximum likelihood says nothing about
    them. ``coupling="affine"`` (non volume preserving) is there for comparison.

    **Why charts.** A diffeomorphism of :math:`\mathbb{R}^D` cannot flatten a closed manifold
    (circle, sphere, torus) into a :math:`d`-plane: its image still bounds a region, so one
    global prior keeps a scale of the order of the manifold's size in a normal direction (or
    the flow must fold the manifold, and noisy sheets cannot be made to overlap by a
    bijection). Each chart (a k-means cell of the data) is a piece that the couplings can
    flatten, so its spectrum collapses; :meth:`intrinsic_dimension` reads the median chart
    spectrum. ``charts=1`` is the single global prior of the reference.

    Arguments:
        dim: :math:`D`.
        charts: :math:`K`.
        noise: spread :math:`\sigma` in normalised units (multiples of :math:`\rho`): the
            prior's floor and the noise :func:`spread_negative_log_likelihood` adds.
        hidden: hidden widths of each coupling's network.
        splits: split indices of the couplings (default: every index for :math:`D \le 8`,
            else 8 spread over :math:`1..D-1`), repeated ``blocks`` times.
        blocks: repetitions of the split list.
        coupling: ``"additive"`` or ``"affine"``.
        rotation: learn the frame rotations :math:`R_k` (else :math:`R_k = I`).
        centre, scale: :math:`\mu` (shape :math:`(D,)`) and :math:`\rho > 0`.
        chart_centres: :math:`m_k`, shape :math:`(K, D)`, normalised units.
        frames: :math:`F_k`, orthogonal, shape :math:`(K, D, D)`.
        init_scales: initial prior scales, shape :math:`(K, D)`.

    Example:
        >>> model = ManifoldPriorFlow(2, noise=0.1)
        >>> p = model.flow()
        >>> p.sample((4,)).shape, p.log_prob(torch.zeros(2)).shape
        (torch.Size([4, 2]), torch.Size([]))

    Cost: per point and chart, :math:`L` small MLPs (:math:`L` = number of couplings) plus
    :math:`O(D^2)`; sampling and density cost the same (both directions are closed form).
    """

    def __init__(
        self,
        dim: int,
        *,
        charts: int = 1,
        noise: float = 0.05,
        hidden: Sequence[int] = (64, 64),
        splits: Sequence[int] | None = None,
        blocks: int = 2,
        coupling: str = "additive",
        rotation: bool = True,
        centre: torch.Tensor | None = None,
        scale: float = 1.0,
        chart_centres: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        init_scales: torch.Tensor | None = None,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"ManifoldPriorFlow: dim must be an int >= 1, got {dim!r}")
        if isinstance(charts, bool) or not isinstance(charts, int) or charts < 1:
            raise ValueError(f"ManifoldPriorFlow: charts must be an int >= 1, got {charts!r}")
        if coupling not in ("additive", "affine"):
            raise ValueError(
                f"ManifoldPriorFlow: coupling must be 'additive' or 'affine', got {coupling!r}"
            )
        noise, scale = float(noise), float(scale)
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"ManifoldPriorFlow: noise must be finite and > 0, got {noise}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"ManifoldPriorFlow: scale must be finite and > 0, got {scale}")
        blocks = check_count(blocks, "blocks", "ManifoldPriorFlow")
        hidden = check_sizes(hidden, "hidden", "ManifoldPriorFlow", nonempty=True)
        D, K = dim, charts
        splits = _default_splits(D) if splits is None else [int(k) for k in splits]
        if any(not 1 <= k < D for k in splits):
            raise ValueError(f"ManifoldPriorFlow: splits must lie in 1..{D - 1}, got {splits}")
        self.dim, self.num_charts, self.noise, self.scale = D, K, noise, scale
        self.coupling = coupling

        # Float64 tables (from_data on float64 points) make a float64 model: cast to float32
        # and back, frames are orthogonal to 1e-7 only and centres off by as much.
        tables = (centre, chart_centres, frames, init_scales)
        float64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tables)
        dtype = torch.float64 if float64 else torch.get_default_dtype()

        def table(value, name, shape, default):
            value = default if value is None else torch.as_tensor(value)
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"ManifoldPriorFlow: {name}: expected shape {shape}, got {tuple(value.shape)}"
                )
            return value.to(dtype).clone()

        for name, value in (("centre", centre), ("chart_centres", chart_centres)):
            if value is not None:
                check_parameter(value, name, "ManifoldPriorFlow")

        self.register_buffer("centre", table(centre, "centre", (D,), torch.zeros(D)))
        self.register_buffer(
            "chart_centres", table(chart_centres, "chart_centres", (K, D), torch.zeros(K, D))
        )
        frames = table(frames, "frames", (K, D, D), torch.eye(D).expand(K, D, D))
        eye = torch.eye(D, dtype=frames.dtype)
        if not torch.allclose(frames.mT @ frames, eye.expand_as(frames), atol=1e-4):
            raise ValueError("ManifoldPriorFlow: frames must be orthogonal matrices")
        self.register_buffer("frames", frames)
        init = table(init_scales, "init_scales", (K, D), torch.ones(K, D))
        self.prior = ManifoldPrior(
            D,
            batch_shape=(K,) if K > 1 else (),
            noise=noise,
            init_scale=init if K > 1 else init[0],
        )
        self.skew = nn.Parameter(torch.zeros(K, D, D)) if rotation else None
        self.couplings = nn.ModuleList(
            pyro_t.ConditionalAffineCoupling(k, _ShiftNet(k, D, K, hidden, coupling == "additive"))
            for _ in range(blocks)
            for k in splits
        )
        if dtype != torch.get_default_dtype():
            self.to(dtype)

    @classmethod
    def from_data(
        cls,
        x: torch.Tensor,
        charts: int = 1,
        *,
        noise: float = 0.05,
        seed: int | None = None,
        **kwargs,
    ) -> ManifoldPriorFlow:
        r"""A model set up on data :math:`x` of shape :math:`(N, D)`: :math:`\mu` its mean,
        :math:`\rho` its largest principal standard deviation; for :math:`K > 1` the chart
        centres are k-means centres (:func:`~atlasdist.charts.kmeans`, ``seed``), each
        chart's frame the principal axes of its cell and its initial scales the cell's
        principal standard deviations (less the spread).

        Example:
            >>> x = torch.randn(100, 3) * torch.tensor([1.0, 1.0, 0.01])
            >>> ManifoldPriorFlow.from_data(x, charts=2, seed=0).num_charts
            2
        """
        from ..charts.kmeans import kmeans

        x = _check_data(x, "ManifoldPriorFlow.from_data")
        N, D = x.shape
        if isinstance(charts, bool) or not isinstance(charts, int) or charts < 1:
            raise ValueError(
                f"ManifoldPriorFlow.from_data: charts must be an int >= 1, got {charts!r}"
            )
        if N < 2 * charts:
            raise ValueError(
                f"ManifoldPriorFlow.from_data: need at least 2 points per chart, got N={N} "
                f"for charts={charts}"
            )
        data, centre, scale, z = standardize(x, "ManifoldPriorFlow.from_data")
        if charts > 1:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            chart_centres, labels = kmeans(z, charts, generator=gen)
        else:
            chart_centres, labels = z.mean(0, keepdim=True), torch.zeros(N, dtype=torch.long)
        frames = torch.empty(charts, D, D, dtype=z.dtype)
        init = torch.ones(charts, D, dtype=z.dtype)
        for k in range(charts):  # set-up only, once per chart
            cell = z[labels == k]
            if len(cell) < 2:
                frames[k] = torch.eye(D, dtype=z.dtype)
                continue
            chart_centres[k] = cell.mean(0)
            evals, evecs = torch.linalg.eigh((cell - cell.mean(0)).T @ (cell - cell.mean(0)))
            frames[k] = evecs.flip(-1)
            var = (evals.flip(-1) / len(cell)).clamp_min(0)
            init[k] = (var - noise**2).clamp_min(1e-4 * noise**2).sqrt()
        return cls(
            D,
            charts=charts,
            noise=noise,
            centre=centre,
            scale=scale,
            chart_centres=chart_centres,
            frames=frames,
            init_scales=init,
            **kwargs,
        ).to(x.dtype)

    # Charts and coordinates ------------------------------------------------------------------

    def _normalise(self, x):
        return (x - self.centre) / self.scale

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        r"""Index of the nearest chart centre, shape :math:`(N,)` for :math:`x` of shape
        :math:`(N, D)` (all zeros for one chart)."""
        x = _check_points(x, self.dim, "ManifoldPriorFlow.assign")
        if self.num_charts == 1:
            return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        return torch.cdist(self._normalise(x), self.chart_centres).argmin(-1)

    def frame(self) -> torch.Tensor:
        r"""The chart frames :math:`F_k R_k`, shape :math:`(K, D, D)`: the initial principal
        axes turned by the learned rotations :math:`R_k = \exp(A_k - A_k^\top)`."""
        if self.skew is None:
            return self.frames
        return self.frames @ _rotation(self.skew)

    def _context(self, chart):
        return nn.functional.one_hot(chart, self.num_charts).to(self.centre.dtype)

    def latent(self, x: torch.Tensor, chart: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`f_k(x)` (before the prior's rotation), shape :math:`(N, D)`, each point in
        its chart ``chart`` (default :meth:`assign`): the data pushed through the inverse
        flow."""
        u, _ = self._forward(x, chart)
        return u

    def _forward(self, x, chart=None):
        x = _check_points(x, self.dim, "ManifoldPriorFlow")
        chart = self.assign(x) if chart is None else chart
        y = self._normalise(x) - self.chart_centres[chart]
        y = (self.frame()[chart].mT @ y.unsqueeze(-1)).squeeze(-1)
        context = self._context(chart)
        log_det = x.new_full(x.shape[:-1], -self.dim * math.log(self.scale))
        for layer in self.couplings:
            part = layer.condition(context)
            z = part(y)
            if self.coupling == "affine":
                log_det = log_det + part.log_abs_det_jacobian(y, z)
            y = z
        return y, (log_det, chart)

    def chart_log_prob(self, x: torch.Tensor, chart: torch.Tensor | None = None):
        r""":math:`\log p_k(x)` of each point under its own chart :math:`k` (default
        :meth:`assign`), shape :math:`(N,)`; density w.r.t. Lebesgue measure on
        :math:`\mathbb{R}^D`."""
        u, (log_det, chart) = self._forward(x, chart)
        prior = self.prior
        var = prior.scales.pow(2) + prior.noise**2
        R = prior.rotation()
        if self.num_charts > 1:
            var = var[chart]
            R = None if R is None else R[chart]
        if R is not None:
            u = (R.mT @ u.unsqueeze(-1)).squeeze(-1)
        log_q = -0.5 * (u.pow(2) / var + var.log() + math.log(2 * math.pi)).sum(-1)
        return log_q + log_det

    # The distribution -------------------------------------------------------------------------

    def forward(self, c: torch.Tensor | None = None) -> ManifoldPriorDistribution:
        r"""The chart densities :math:`p_k`: a Pyro ``TransformedDistribution`` with event
        shape :math:`(D,)` and batch shape :math:`(K,)` (:math:`()` for one chart); evaluate
        a point in every chart with ``log_prob(x.unsqueeze(-2))``. ``flow()`` is an alias;
        ``c`` must be ``None``."""
        self._no_context(c)
        K = self.num_charts
        if K == 1:
            context = self.centre.new_ones(1)
            frame, loc = self.frame()[0], self.chart_centres[0]
        else:
            context = torch.eye(K, dtype=self.centre.dtype, device=self.centre.device)
            frame, loc = self.frame(), self.chart_centres
        inverse = [layer.condition(context).inv for layer in reversed(self.couplings)]
        to_data = _Orthogonal(frame, self.centre + self.scale * loc, self.scale)
        return ManifoldPriorDistribution(self.prior(), inverse + [to_data])

    # The spectrum -----------------------------------------------------------------------------

    def spectrum(self) -> torch.Tensor:
        r"""The learned scales :math:`\rho\, s` in data units, sorted in decreasing order,
        shape :math:`(K, D)`."""
        return (self.scale * self.prior.spectrum()).reshape(self.num_charts, self.dim)

    def chart_dimensions(self, min_ratio: float = 2.5) -> torch.Tensor:
        """:func:`largest_gap_dimension` of each chart's spectrum, shape :math:`(K,)`."""
        return largest_gap_dimension(self.spectrum(), min_ratio)

    def median_spectrum(self) -> torch.Tensor:
        """The median over charts of the sorted chart spectra, shape :math:`(D,)`."""
        return self.spectrum().median(0).values

    def intrinsic_dimension(self, min_ratio: float = 2.5) -> int:
        r""":func:`largest_gap_dimension` of :meth:`median_spectrum`: the dimension of a
        typical chart (the median is robust to a few charts that straddle two sheets)."""
        return int(largest_gap_dimension(self.median_spectrum(), min_ratio))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, charts={self.num_charts}, noise={self.noise}, "
            f"coupling={self.coupling!r}"
        )


def spread_negative_log_likelihood(model: ManifoldPriorFlow, batch: torch.Tensor):
    r""":math:`-\frac{1}{B}\sum_b \log p_{k_b}(x_b + \rho\sigma\epsilon_b)`,
    :math:`\epsilon_b \sim \mathcal{N}(0, I_D)`, each point in the chart :math:`k_b` of its
    clean position: the loss that trains a :class:`ManifoldPriorFlow` (a ``loss_fn`` for
    :func:`~atlasdist.training.fit`).

    Spreading the data by the same :math:`\sigma` that floors the prior keeps the objective
    bounded on data exactly on a manifold (reference: the spread divergence makes the KL
    between singular distributions finite). With volume-preserving couplings the optimum puts
    each prior scale at the data's spread along its axis less :math:`\sigma`: normal
    directions, once the couplings have flattened the chart, go to the data's own noise level
    (0 for exact data), tangent ones stay at the chart's extent.

    Arguments:
        model: a :class:`ManifoldPriorFlow`.
        batch: clean points, shape :math:`(B, D)`.

    Cost: one pass of the flow over the batch.
    """
    chart = model.assign(batch)
    noisy = batch + (model.noise * model.scale) * torch.randn_like(batch)
    return -model.chart_log_prob(noisy, chart).mean()


def _check_data(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name}: x must be a torch.Tensor of shape (N, D), got {type(x).__name__}"
        )
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name}: x must have shape (N, D) with N >= 2, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name}: x must be float32 or float64, got {x.dtype}; convert it with "
            "x.to(torch.float64)"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: x has {int((~torch.isfinite(x)).sum())} non-finite entries")
    return x


def _check_points(x, D, name):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != D:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected points of shape (N, {D}), got {shape}")
    return x
