r"""Intrinsic dimension from two likelihoods that fail in opposite directions: in local charts,
the maximum-likelihood manifold prior behind a quadratic flattening coupling (the smallest
:math:`d` at which a chart is thin on held-out points: exact where the chart is quadratic,
too large where curvature is unresolved at the chart's scale), and the likelihood of
:math:`d` of the nearest-neighbour distance ratios (intrinsic, right at the scale of two
neighbours, too small in high dimension), which bounds the first from above.

References:
    reference/001 (*On the latent space of flow-based models*), Sections 1-2; Zhang, Sun,
    Zhang & McDonagh, *Spread flows for manifold modelling*, AISTATS 2023, arXiv:2109.14216;
    A. V. Little, M. Maggioni, L. Rosasco, *Multiscale geometric methods for data sets I:
    multiscale SVD, noise and curvature*, ACHA 2017 (tangent, curvature and noise scales);
    E. Facco, M. d'Errico, A. Rodriguez, A. Laio, *Estimating the intrinsic dimension of
    datasets by a minimal neighborhood information*, Scientific Reports 2017 (the ratio
    :math:`r_2/r_1`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .distributions.manifold_prior import (
    ManifoldPriorFlow,
    spread_negative_log_likelihood,
    standardize,
)
from .training.mle import fit

__all__ = ["IntrinsicDimension", "estimate_intrinsic_dimension"]

# Training points per regression coefficient of a chart's flattening coupling: the smallest
# chart that determines its model (small charts keep curvature beyond second order and
# neighbouring sheets out of the chart).
_POINTS_PER_COEFFICIENT = 1.25
# The relative ridge of the flattening regression and the numerical-zero floor of a variance
# (relative to the chart's largest variance).
_RIDGE = 1e-8
_SCALES = (1, 2, 4, 8)
# the largest d whose flattening model has every quadratic monomial (beyond it only the
# squares: the model's cost grows as d^4 with all monomials)
_FULL_MAX_DIM = 8
# the largest d tested for flatness: the cost of the test grows as d^2 (chart size times
# features) for each d
_MAX_FLAT_DIM = 24
_FLOOR = 1e-12
# principal variances below this fraction of the largest are zero: the data's affine span
_RANK_TOLERANCE = 1e-10
# standard errors by which the distance statistic must fall below the uniform reference to
# reject a dimension, and the rows of the distance statistic
_Z = 3.0
_MAX_ROWS = 5000
_LOCAL_RATIOS = 50
_DISTANCE_ENTRIES = 1 << 24


@dataclass(frozen=True)
class IntrinsicDimension:
    r"""What :func:`estimate_intrinsic_dimension` returns.

    Attributes:
        dimension: the estimate :math:`\hat d`.
        spectrum: median over charts of ``chart_spectra``, shape :math:`(D,)`, data units.
        chart_spectra: each chart's sorted prior scales, shape :math:`(K, D)`, data units:
            those of the trained flow when ``steps`` was given, else the principal standard
            deviations of each local chart at the size used for :math:`\hat d`.
        chart_dimensions: :math:`\hat d_m`, the answer of each local chart, shape
            :math:`(M,)`: its flat dimension where it has one, else the likelihood of the
            distance ratios of its 50 nearest points.
        probabilities: :math:`P(\hat d_m = d)` over the charts, :math:`d = 1..D`, shape
            :math:`(D,)`: how far the charts agree.
        interval: the 10% and 90% quantiles of ``chart_dimensions``, a pair of ints.
        gap_ratios: :math:`r_m(d)`, the flattened gap of chart :math:`m` at dimension
            :math:`d`, shape :math:`(M, D)` (``nan`` where not computed, 1 at :math:`d` equal
            to the rank of the data).
        chart_sizes: the number of points of a chart for each :math:`d`, shape :math:`(D,)`.
        model: the fitted :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow`,
            or ``None`` without ``steps``.
        history: the training history of :func:`~atlasdist.training.fit`, or ``None``.
        distance_dimension: :math:`\hat d_{\mathrm{NN}}`, the maximum-likelihood dimension
            of the ratios :math:`r_2/r_1` of distances to the two nearest neighbours (a
            float).
        max_dimension: :math:`d_{\max}`, the largest :math:`d` that the distance ratios do not
            reject.
        flat_dimensions: the smallest :math:`d \le d_{\max}` at which chart :math:`m` is flat,
            shape :math:`(M,)`: the rank :math:`r` of the data where no :math:`d < r` is flat,
            :math:`r \le d_{\max}` and :math:`r \le 25`; 0 where there is none.
    """

    dimension: int
    spectrum: torch.Tensor
    chart_spectra: torch.Tensor
    chart_dimensions: torch.Tensor
    model: ManifoldPriorFlow | None
    history: dict | None
    probabilities: torch.Tensor
    interval: tuple[int, int]
    gap_ratios: torch.Tensor
    chart_sizes: torch.Tensor
    distance_dimension: float
    max_dimension: int
    flat_dimensions: torch.Tensor


def _num_features(d: int, full: bool) -> int:
    return 1 + d + (d * (d + 1) // 2 if full else d)


def _quadratic_features(u: torch.Tensor, full: bool) -> torch.Tensor:
    """(M, m, d) -> (M, m, p): 1, u and the products u_i u_j (i <= j), or only u_i^2."""
    d = u.shape[-1]
    if full:
        i, j = torch.triu_indices(d, d, device=u.device)
        square = u[..., i] * u[..., j]
    else:
        square = u * u
    return torch.cat([torch.ones_like(u[..., :1]), u, square], -1)


def _principal_axes(train: torch.Tensor, held_out: torch.Tensor):
    """Centred points of both halves, (M, m, D), in the principal axes of ``train``, and the
    principal variances, (M, D), descending."""
    centre = train.mean(1, keepdim=True)
    t, e = train - centre, held_out - centre
    evals, evecs = torch.linalg.eigh(t.mT @ t / t.shape[1])
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    return t @ evecs, e @ evecs, evals


def _flattened_log_gap(t: torch.Tensor, e: torch.Tensor, evals: torch.Tensor, d: int, full: bool):
    r""":math:`\tfrac12\log(\lambda_d / \varrho_1)` of each chart, shape :math:`(M,)`, for
    chart points ``t`` (training half) and ``e`` (held out) of shape :math:`(M, m, D)` in the
    principal axes of ``t``, of variances ``evals``, :math:`d < D`."""
    floor = _FLOOR * evals[:, :1]
    tangent = evals[:, :d]
    scale = (tangent + floor).sqrt().unsqueeze(1)
    ut, ue = t[..., :d], e[..., :d]
    nt, ne = t[..., d:], e[..., d:]
    # the maximum-likelihood additive coupling n -> n - B^T phi(u) is least squares
    pt, pe = _quadratic_features(ut / scale, full), _quadratic_features(ue / scale, full)
    gram = pt.mT @ pt
    ridge = _RIDGE * gram.diagonal(0, -2, -1).mean(-1)[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + ridge * eye, pt.mT @ nt)
    residual = ne - pe @ coef
    # the largest residual variance, from the smaller of the two Gram matrices
    small = residual @ residual.mT if residual.shape[1] < residual.shape[2] else None
    small = residual.mT @ residual if small is None else small
    normal = torch.linalg.eigvalsh(small / residual.shape[1])[:, -1]
    return 0.5 * ((tangent[:, -1] + floor[:, 0]).log() - (normal.clamp_min(0) + floor[:, 0]).log())


def _local_charts(z, anchors, min_ratio, max_dim):
    """The chart rule on normalised data z (float64), for d = 1 .. min(max_dim, D - 1): the
    smallest flat d of each chart (0 where none is), log gaps, sizes, neighbour order."""
    N, D = z.shape
    charts = anchors.numel()
    # neighbours of each anchor by distance; even ranks train, odd ranks are held out (and
    # then the other way round), so both halves cover the same radii
    order = torch.cdist(z[anchors], z).argsort(-1)
    log_gaps = torch.full((charts, D), math.nan, dtype=z.dtype, device=z.device)
    log_gaps[:, -1] = 0.0
    sizes = torch.tensor([_chart_size(d, N)[0] for d in range(1, D + 1)], dtype=torch.long)
    dims = torch.zeros(charts, dtype=torch.long, device=z.device)
    if max_dim >= D:
        dims[:] = D  # a chart with no flat d < D is D-dimensional
    found = torch.zeros(charts, dtype=torch.bool, device=z.device)
    axes = {}  # the principal axes of a chart size, shared by every d that uses it

    def halves(k):
        if k not in axes:
            idx = order[:, :k]
            a, b = z[idx[:, 0::2]], z[idx[:, 1::2]]
            axes[k] = (_principal_axes(a, b), _principal_axes(b, a))
        return axes[k]

    # flatness is tested up to _MAX_FLAT_DIM (a bound on the cost); charts not flat by then
    # are left to the distance likelihood
    top = _MAX_FLAT_DIM
    if max_dim >= D and top < D - 1:
        dims[:] = 0
    for d in range(1, min(max_dim + 1, D, top + 1)):  # candidate d, batched over charts
        size, full = _chart_size(d, N)
        j = round(2 * math.log2(size / 8))
        gap = None
        for factor in _SCALES:
            k = min(N, _grid(j + 2 * round(math.log2(factor))))
            (ta, ea, la), (tb, eb, lb) = halves(k)
            g = 0.5 * (
                _flattened_log_gap(ta, ea, la, d, full) + _flattened_log_gap(tb, eb, lb, d, full)
            )
            gap = g if gap is None else torch.maximum(gap, g)
            if k >= N or bool((gap >= math.log(min_ratio)).all()):
                break
        log_gaps[:, d - 1] = gap
        new = ~found & (gap >= math.log(min_ratio))
        dims[new] = d
        found |= new
        if bool(found.all()):
            break
    return dims, log_gaps, sizes, order


def _two_nn_log_ratios(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(r_2 / r_1)` of the points ``z[rows]``, with :math:`r_1 \le r_2` their
    distances to their two nearest other points of ``z`` (distinct points, at least 3); shape
    ``rows.shape``."""
    N = z.shape[0]
    if rows.numel() == 0:
        return z.new_zeros(0)
    # blocks of rows bound the memory of the distance matrix (a loop over blocks, not points)
    block = max(1, min(rows.numel(), _DISTANCE_ENTRIES // N))
    out = []
    for start in range(0, rows.numel(), block):
        r = rows[start : start + block]
        dist = torch.cdist(z[r], z)
        dist[torch.arange(r.numel(), device=z.device), r] = math.inf
        two = dist.topk(2, dim=-1, largest=False).values
        out.append(two[:, 1].log() - two[:, 0].log())
    return torch.cat(out)


def _pareto_dimension(log_ratios: torch.Tensor) -> float:
    r"""The maximum-likelihood :math:`d` of :math:`\log(r_2/r_1) \sim \mathrm{Exp}(d)`:
    ``n / sum``, over the finite ratios (``inf``: no finite ratio)."""
    finite = log_ratios[torch.isfinite(log_ratios)]
    total = float(finite.sum())
    return finite.numel() / total if total > 0 else math.inf


@functools.lru_cache(maxsize=256)
def _uniform_reference(n: int, rows: int, d: int) -> float:
    """The pooled two-nearest-neighbour dimension of n uniform points of the cube [0, 1]^d,
    from the ratios of its first ``rows`` points (a fixed seed: the same for every call)."""
    g = torch.Generator().manual_seed(1_000_003 * d + n)
    u = torch.rand(n, d, generator=g, dtype=torch.float64)
    return _pareto_dimension(_two_nn_log_ratios(u, torch.arange(rows)))


def _rejected(s: float, n: int, rows: int, d: int) -> bool:
    """Whether the data's pooled dimension s is more than _Z standard errors below that of
    uniform points of the d-cube (each estimate has standard error (estimate) / sqrt(rows))."""
    ref = _uniform_reference(n, rows, d)
    return s + _Z * math.sqrt((s * s + ref * ref) / rows) < ref


def _largest_unrejected(s: float, n: int, rows: int, D: int) -> int:
    """The largest d <= D not rejected by the distance statistic s, by bisection (the uniform
    reference grows with d; d <= s is not rejected, the reference being below d)."""
    if not math.isfinite(s):
        return D
    lo, hi = max(1, min(D, math.floor(s))), D + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _rejected(s, n, rows, mid):
            hi = mid
        else:
            lo = mid
    return lo


def _integer_mle(log_ratios: torch.Tensor, D: int) -> torch.Tensor:
    r"""The integer :math:`d \in 1..D` of largest likelihood :math:`n \log d - d \sum_i t_i`
    for rows of :math:`t_i = \log(r_2/r_1) \sim \mathrm{Exp}(d)`, shape ``(..., n) -> (...)``
    (non-finite entries left out; :math:`D` for a row without a positive sum)."""
    finite = torch.isfinite(log_ratios)
    n = finite.sum(-1).to(log_ratios.dtype)
    total = torch.where(finite, log_ratios, 0.0).sum(-1)
    s = n / total.clamp_min(torch.finfo(total.dtype).tiny)
    lo = s.floor().clamp(1, D)
    hi = (lo + 1).clamp(max=D)
    best = torch.where(n * hi.log() - hi * total > n * lo.log() - lo * total, hi, lo)
    return torch.where(total > 0, best, torch.full_like(best, D)).long()


def _chart_size(d: int, N: int) -> tuple[int, bool]:
    """Points of the smallest chart that determines the flattening model at dimension d, and
    whether that model has all quadratic monomials (else only the squares)."""
    full = d <= _FULL_MAX_DIM and 2 * _POINTS_PER_COEFFICIENT * _num_features(d, True) <= N // 2
    size = max(math.ceil(2 * _POINTS_PER_COEFFICIENT * _num_features(d, full)), 2 * (d + 3))
    # rounded up to the grid 8 * sqrt(2)^j, on which the doubled scales of several d share
    # one chart (and one eigendecomposition)
    j = math.ceil(2 * math.log2(max(size / 8, 1)) - 1e-9)
    return min(N, _grid(j)), full


def _grid(j: int) -> int:
    """An even number of points near 8 * sqrt(2)^j."""
    return 2 * math.ceil(4 * 2 ** (j / 2))


def estimate_intrinsic_dimension(
    x: torch.Tensor,
    *,
    charts: int | None = None,
    noise: float = 0.05,
    steps: int | None = None,
    batch_size: int = 256,
    lr: float = 3e-3,
    min_ratio: float = 2.5,
    seed: int | None = 0,
    progress: bool = False,
    **model_kwargs,
) -> IntrinsicDimension:
    r""":math:`\hat d = \hat d_{\mathrm{flat}}` if :math:`\hat d_{\mathrm{flat}} \le d_{\max}`,
    else the integer maximum-likelihood :math:`d` of the distance ratios: the median
    :math:`\hat d_{\mathrm{flat}}` over local charts of the smallest :math:`d` at which a chart,
    flattened by the maximum-likelihood quadratic coupling of a manifold prior, is thin on
    held-out points, unless the nearest-neighbour distances reject it.

    **The chart model.** Around an anchor point, a chart of :math:`k` neighbours is cut in two
    halves (alternate ranks of distance). On one half, the learned manifold prior of
    reference/001 with one additive coupling is fitted by maximum likelihood, which is closed
    form: the prior's frame and scales are the principal axes and variances
    :math:`\lambda_1 \ge \dots \ge \lambda_D` (its tangent part the first :math:`d`), and the
    coupling :math:`n \mapsto n - B^\top\phi(u)`, which flattens the chart by subtracting from
    the :math:`D - d` normal coordinates :math:`n` a quadratic polynomial :math:`\phi` of the
    :math:`d` tangent ones :math:`u`, is least squares. On the held-out half, the residual
    :math:`n - B^\top\phi(u)` has largest variance :math:`\varrho_1(d)`, and

    .. math::

        r_m(d) = \sqrt{\lambda_d / \varrho_1(d)}

    (both halves, geometric mean): the smallest tangent scale over the largest normal scale
    that flattening leaves. For :math:`d` below the true dimension a tangent direction stays
    in the residual (:math:`r \approx 1`); at the true dimension the residual is noise and
    third-order curvature (:math:`r \gg 1` where the chart is larger than the noise and
    quadratic at its scale). Chart :math:`m` is flat at the smallest :math:`d` with
    :math:`r_m(d) \ge` ``min_ratio``, the maximum over the chart sizes :math:`k_d, 2k_d, 4k_d,
    8k_d`, with :math:`k_d` about :math:`2.5 p_d` for the :math:`p_d` coefficients of
    :math:`\phi` (all monomials of degree :math:`\le 2` up to :math:`d = 8`, then only the
    squares; rounded up to the grid :math:`8\sqrt2^j`). Curvature the quadratic cannot remove
    at that scale only adds dimensions: where the manifold is curved at the scale of the
    smallest chart that determines the model (4 dimensions with 2500 points, seven per circle
    of a torus), :math:`\hat d_{\mathrm{flat}}` is too large, never too small.

    **The distance likelihood.** With :math:`r_1 \le r_2` the distances of point :math:`i` to
    its two nearest neighbours (among the distinct points),
    :math:`t_i = \log(r_2/r_1) \sim \mathrm{Exp}(d)` for points
    of locally constant density on a :math:`d`-manifold (Facco et al. 2017), whatever its
    curvature at the scale of the chart: the pooled maximum-likelihood estimate is
    :math:`\hat d_{\mathrm{NN}} = n / \sum_i t_i`, of standard error
    :math:`\hat d_{\mathrm{NN}}/\sqrt n`. In high dimension it is too small (boundaries and
    positive curvature within :math:`r_2`: 15.4 for 2500 uniform points of a 20-cube). A
    dimension :math:`d` is *rejected* when :math:`\hat d_{\mathrm{NN}}` lies more than three
    standard errors below :math:`c(d)`, the same statistic on :math:`N` uniform points of the
    cube :math:`[0, 1]^d` (the most boundary-dominated uniform sample; computed once per
    :math:`(N, d)` with a fixed seed), and :math:`d_{\max}` is the largest :math:`d` not
    rejected. So a chart dimension inflated by curvature is replaced by the distances'
    answer (:math:`\hat d = \arg\max_{d \le d_{\max}} n \log d - d \sum_i t_i`), and a flat
    answer in high dimension, which the distances underestimate, stands. Noise inflates
    :math:`\hat d_{\mathrm{NN}}` and the charts grow above it: neither moves :math:`\hat d`
    up.

    **Span, scale and agreement.** The data are first mapped isometrically onto their affine
    span (rank :math:`\le D`), so no :math:`d` above the rank is possible and an exact linear
    constraint is no dimension, and repeated points are dropped (they carry no geometry).
    Flatness is tested for :math:`d \le \min(d_{\max}, 24)`
    (``flat_dimensions``; a bound on the cost); a chart with no flat :math:`d` below the rank
    :math:`r` is :math:`r`-dimensional when :math:`r \le d_{\max}` and :math:`r \le 25`. Each of
    :math:`M` charts at random anchors answers (``chart_dimensions``: its flat dimension, or
    the distance likelihood of the 50 points nearest its anchor): ``probabilities`` is their
    distribution over :math:`1..D` and ``interval`` their 10-90% range, a spread-out
    distribution meaning that the data do not have one dimension at the resolution of
    :math:`N` points (too noisy, too sparse or too curved).

    **The flow** (optional, ``steps``): also fit a
    :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow` (``charts`` k-means
    charts, coupling flows trained by
    :func:`~atlasdist.distributions.manifold_prior.spread_negative_log_likelihood`) and
    return it as ``model``, its learned scales as ``chart_spectra``. ``dimension`` does not
    depend on it. Use ``dimension`` as the latent dimension ``d`` of
    :class:`~atlasdist.AtlasFlow`.

    Arguments:
        x: data, shape :math:`(N, D)`.
        charts: the number :math:`M` of local charts (default :math:`\min(100, N)`, at most
            the number of distinct points); with
            ``steps``, also the number of the flow's charts (default
            :math:`\min(16, \lfloor N / \max(50, 10D) \rfloor)`, at least 1).
        noise: the flow's spread :math:`\sigma` (only with ``steps``).
        steps: optimiser steps (Adam) of the flow; ``None`` (default): no flow.
        batch_size, lr: of the flow's optimiser.
        min_ratio: the smallest gap :math:`r_m(d)` read as "flat at dimension :math:`d`",
            :math:`> 1`.
        seed: seeds the anchors, k-means and training (``None``: random).
        progress: show the flow's progress bar.
        model_kwargs: passed to :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow`.

    Returns:
        An :class:`IntrinsicDimension`.

    Example:
        >>> from atlasdist import datasets
        >>> x = datasets.sinusoid(1000, noise=0.01, seed=0)
        >>> result = estimate_intrinsic_dimension(x)
        >>> result.dimension, result.interval
        (1, (1, 1))

    Cost: the distance ratios of at most 5000 points against all :math:`N`,
    :math:`O(\min(N, 5000)\, N D)`, and as many for each uniform reference (a few per
    call, cached); the charts, batched over charts, :math:`O(M \sum_d k_d (p_d^2 + p_d D +
    D^2))` up to :math:`\min(d_{\max}, 24)`. At :math:`N = 2500` on one CPU core: well under a
    second for :math:`D \le 12` and small :math:`d`, 2-10 s for :math:`d_{\max}` near 20 in
    :math:`D \ge 20`. With ``steps``, add the flow's training (10-40 s on two CPU cores).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"estimate_intrinsic_dimension: x must be a torch.Tensor of shape (N, D), got "
            f"{type(x).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(
            f"estimate_intrinsic_dimension: x must have shape (N, D), got {tuple(x.shape)}"
        )
    N, D = x.shape
    if charts is not None and (isinstance(charts, bool) or not isinstance(charts, int)):
        raise ValueError(
            f"estimate_intrinsic_dimension: charts must be an int >= 1, got {charts!r}"
        )
    if charts is not None and charts < 1:
        raise ValueError(
            f"estimate_intrinsic_dimension: charts must be an int >= 1, got {charts!r}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(
            f"estimate_intrinsic_dimension: steps must be None or an int >= 1, got {steps!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"estimate_intrinsic_dimension: batch_size must be an int >= 1, got {batch_size!r}"
        )
    flow_charts = max(1, min(16, N // max(50, 10 * D))) if charts is None else charts
    local_charts = min(100, N) if charts is None else charts
    if N < max(2 * flow_charts, D + 1) or local_charts > N:
        raise ValueError(
            f"estimate_intrinsic_dimension: need N >= max(2 * charts, D + 1) points, got N={N}, "
            f"D={D}, charts={charts}"
        )
    if not min_ratio > 1 or not math.isfinite(min_ratio):
        raise ValueError(
            f"estimate_intrinsic_dimension: min_ratio must be a finite number > 1, got {min_ratio}"
        )
    if not x.is_floating_point():
        raise ValueError(f"estimate_intrinsic_dimension: x must be floating point, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"estimate_intrinsic_dimension: x has {int((~torch.isfinite(x)).sum())} non-finite "
            "entries"
        )
    data, centre, rho, z = standardize(x, "estimate_intrinsic_dimension")
    # the affine span of the data, an isometry onto R^r: distances and local principal axes
    # are unchanged, and no d above the rank r is possible
    evals, evecs = torch.linalg.eigh(z.T @ z / N)
    rank = max(1, int((evals > _RANK_TOLERANCE * evals[-1]).sum()))
    z = z @ evecs[:, -rank:].flip(-1)
    # duplicated points carry no geometry (and a duplicate's r_1 is 0): keep the first of each,
    # in the data's order
    _, inverse = torch.unique(z, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), N, dtype=torch.long, device=z.device)
    first = first.scatter_reduce(0, inverse, torch.arange(N, device=z.device), "amin")
    z = z[first.sort().values]
    U = z.shape[0]
    local_charts = min(local_charts, U)
    gen = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
    if seed is None:
        gen.seed()
    anchors = torch.randperm(U, generator=gen, device="cpu")[:local_charts].to(z.device)
    if U < 3:  # no second neighbour: the distances say nothing
        rows = torch.arange(0, device=z.device)
    elif U > _MAX_ROWS:
        rows = torch.randperm(U, generator=gen, device="cpu")[:_MAX_ROWS].to(z.device)
    else:
        rows = torch.arange(U, device=z.device)
    log_ratios = _two_nn_log_ratios(z, rows)
    distance_dimension = _pareto_dimension(log_ratios)
    max_dim = _largest_unrejected(distance_dimension, U, rows.numel(), rank)
    flat, span_gaps, span_sizes, order = _local_charts(z, anchors, min_ratio, max_dim)
    log_gaps = torch.full((local_charts, D), math.nan, dtype=z.dtype, device=z.device)
    log_gaps[:, :rank] = span_gaps
    sizes = torch.tensor([_chart_size(d, U)[0] for d in range(1, D + 1)], dtype=torch.long)

    # each chart's fallback: the likelihood of d on the ratios of its nearest rows
    position = torch.full((U,), -1, dtype=torch.long, device=z.device)
    position[rows] = torch.arange(rows.numel(), device=z.device)
    in_rows = position[order] >= 0
    k = min(_LOCAL_RATIOS, rows.numel())
    nearest = order[in_rows & (in_rows.cumsum(-1) <= k)].view(local_charts, k)
    local = _integer_mle(log_ratios[position[nearest]], rank)
    dims = torch.where(flat > 0, flat, local)

    median_flat = int(torch.where(flat > 0, flat, D + 1).sort().values[(local_charts - 1) // 2])
    if median_flat <= max_dim:
        dimension = median_flat
    else:
        dimension = min(max_dim, int(_integer_mle(log_ratios, rank)))
    probabilities = torch.bincount(dims - 1, minlength=D).double() / local_charts
    q = torch.quantile(dims.double(), torch.tensor([0.1, 0.9], dtype=torch.float64))
    interval = (int(q[0].floor()), int(q[1].ceil()))

    model = history = None
    if steps is None:
        cell = z[order[:, : int(sizes[dimension - 1])]]
        cell = cell - cell.mean(1, keepdim=True)
        evals = torch.linalg.eigvalsh(cell.mT @ cell / cell.shape[1]).flip(-1).clamp_min(0)
        chart_spectra = torch.nn.functional.pad(rho * evals.sqrt(), (0, D - rank))
    else:
        model = ManifoldPriorFlow.from_data(x, flow_charts, noise=noise, seed=seed, **model_kwargs)
        batch_size = min(batch_size, N)
        epochs = math.ceil(steps / math.ceil(N / batch_size))
        history = fit(
            model,
            x.detach(),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            loss_fn=spread_negative_log_likelihood,
            seed=seed,
            progress=progress,
        )
        chart_spectra = model.spectrum()
    chart_spectra = chart_spectra.to(x.dtype)
    return IntrinsicDimension(
        dimension=dimension,
        spectrum=chart_spectra.median(0).values,
        chart_spectra=chart_spectra,
        chart_dimensions=dims,
        model=model,
        history=history,
        probabilities=probabilities.to(x.dtype),
        interval=interval,
        gap_ratios=log_gaps.exp().to(x.dtype),
        chart_sizes=sizes,
        distance_dimension=distance_dimension,
        max_dimension=max_dim,
        flat_dimensions=flat,
    )
