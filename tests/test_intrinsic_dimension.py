"""estimate_intrinsic_dimension on manifolds of known dimension: non-orientable surfaces,
curved manifolds of dimension >= 4 in R^D with D >= 10 (one curved at the scale of every chart,
where only the distance ratios are right), noise, full dimension (where only the flat charts
are right), exact linear constraints; the uncertainty it reports; its invariances."""

import math

import pytest
import torch

from atlasdist.intrinsic_dimension import IntrinsicDimension, estimate_intrinsic_dimension


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the estimator's batched small products gain nothing from two, and on a
    busy machine two threads made the 12-cube test 100 times slower (31.6 s against 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def klein_bottle(n, seed, noise=0.0):
    """The Klein bottle in R^4: ((2 + cos v) cos u, (2 + cos v) sin u, sin v cos(u/2),
    sin v sin(u/2)), non-orientable, d = 2."""
    g = _generator(seed)
    u, v = 2 * math.pi * torch.rand(2, n, generator=g, dtype=torch.float64)
    x = torch.stack(
        [
            (2 + v.cos()) * u.cos(),
            (2 + v.cos()) * u.sin(),
            v.sin() * (u / 2).cos(),
            v.sin() * (u / 2).sin(),
        ],
        -1,
    )
    return x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)


def moebius_strip(n, seed, twists=1):
    """A Möbius strip in R^3 with ``twists`` half-twists (odd: non-orientable), d = 2."""
    g = _generator(seed)
    phi = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    t = 2 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    half = twists * phi / 2
    radius = 1 + 0.4 * t * half.cos()
    return torch.stack([radius * phi.cos(), radius * phi.sin(), 0.4 * t * half.sin()], -1)


def sphere(n, d, D, seed):
    """The unit sphere S^d embedded isometrically (a random orthonormal map) in R^D."""
    g = _generator(seed)
    y = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    y = y / y.norm(dim=-1, keepdim=True)
    frame = torch.linalg.qr(torch.randn(D, d + 1, generator=g, dtype=torch.float64)).Q
    return y @ frame.T


def curved_graph(n, d, D, seed):
    """A graph of cosines: u ~ U(0, 1)^d, x = (u, cos(pi u) A) in R^D rotated at random,
    curved in every normal direction, d-dimensional."""
    g = _generator(seed)
    u = torch.rand(n, d, generator=g, dtype=torch.float64)
    a = torch.randn(d, D - d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = torch.cat([u, torch.cos(math.pi * u) @ a], -1)
    q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q
    return x @ q.T


def polar_product(n, d, copies, seed):
    """p ~ U(0, 1)^d, x = (p_{i+1} cos 2 pi p_i, p_{i+1} sin 2 pi p_i)_i (indices mod d), the
    2d coordinates repeated ``copies`` times and rotated at random: the generator of
    scikit-dimension's M4 / M6 / M8 (Hein & Audibert), curved at the scale of any chart that
    determines a quadratic model when d >= 4 (a few points per circle), d-dimensional."""
    g = _generator(seed)
    p = torch.rand(d, n, generator=g, dtype=torch.float64)
    radius = torch.roll(p, -1, 0)
    angle = 2 * math.pi * p
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], 1).reshape(2 * d, n).T
    x = torch.cat([x] * copies, -1)
    q = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g, dtype=x.dtype)).Q
    return x @ q.T


def noisy_helix(n, seed, noise):
    """The helix of scikit-dimension's M5a in R^3 with uniform noise of width ``noise`` in
    every coordinate (0.03: three times the spacing of 1500 points along the curve), d = 1."""
    g = _generator(seed)
    t = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    r = 2 + torch.cos(8 * t)
    x = torch.stack([r * t.cos(), r * t.sin(), torch.sin(8 * t)], -1)
    return x + noise * (torch.rand(x.shape, generator=g, dtype=x.dtype) - 0.5)


CASES = [  # name, data, true d
    ("Klein bottle in R^4", lambda: klein_bottle(2000, 0), 2),
    ("noisy Klein bottle in R^4", lambda: klein_bottle(2000, 1, noise=0.005), 2),
    ("Moebius strip in R^3", lambda: moebius_strip(1500, 0), 2),
    ("Moebius strip, 9 half-twists", lambda: moebius_strip(2500, 0, twists=9), 2),
    ("S^4 in R^12", lambda: sphere(2000, 4, 12, 0), 4),
    ("graph of cosines, d = 4 in R^12", lambda: curved_graph(2000, 4, 12, 0), 4),
    ("full Gaussian in R^6", lambda: torch.randn(1500, 6, generator=_generator(0)), 6),
    ("torus-like d = 4 in R^16", lambda: polar_product(1500, 4, 2, 0), 4),
    ("noisy helix in R^3", lambda: noisy_helix(1500, 0, 0.03), 1),
]


@pytest.mark.parametrize("name, make, d", CASES, ids=[c[0] for c in CASES])
def test_estimate_is_exact_on_known_manifolds(name, make, d):
    result = estimate_intrinsic_dimension(make(), seed=0)
    assert result.dimension == d, (name, result.probabilities)
    # most charts agree, and the reported range holds the estimate
    assert float(result.probabilities[d - 1]) >= 0.5
    assert result.interval[0] <= d <= result.interval[1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_curved_six_dimensional_manifold_in_r20(seed):
    result = estimate_intrinsic_dimension(curved_graph(2500, 6, 20, seed), seed=seed)
    assert result.dimension == 6, result.probabilities


def test_uncertainty_is_a_distribution_over_the_chart_answers():
    x = klein_bottle(1200, 3, noise=0.01)
    result = estimate_intrinsic_dimension(x, charts=40, seed=1)
    M, D = 40, x.shape[1]
    assert isinstance(result, IntrinsicDimension)
    assert result.chart_dimensions.shape == (M,) and result.probabilities.shape == (D,)
    assert result.gap_ratios.shape == (M, D) and result.chart_sizes.shape == (D,)
    assert result.flat_dimensions.shape == (M,)
    torch.testing.assert_close(result.probabilities.sum(), torch.tensor(1.0, dtype=x.dtype))
    counts = torch.bincount(result.chart_dimensions - 1, minlength=D).to(x.dtype) / M
    torch.testing.assert_close(result.probabilities, counts)
    assert result.interval[0] <= result.dimension <= result.interval[1]
    _assert_the_rule(result, min_ratio=2.5)
    assert result.model is None and result.history is None


def _assert_the_rule(result, min_ratio):
    """A chart's flat dimension is the first d whose flattened gap reaches min_ratio (none at
    or below max_dimension: 0); a flat chart answers it; the estimate is the median flat
    dimension when that is at most max_dimension, else at most max_dimension."""
    M = result.flat_dimensions.numel()
    for m in range(M):
        dm = int(result.flat_dimensions[m])
        searched = result.gap_ratios[m, : (dm - 1 if dm > 0 else result.max_dimension)]
        assert bool((searched[~searched.isnan()] < min_ratio).all())
        if 0 < dm < result.gap_ratios.shape[1] and not math.isnan(result.gap_ratios[m, dm - 1]):
            assert float(result.gap_ratios[m, dm - 1]) >= min_ratio
        if dm > 0:
            assert dm <= result.max_dimension and int(result.chart_dimensions[m]) == dm
    flat = torch.where(result.flat_dimensions > 0, result.flat_dimensions, 10**6)
    median = int(flat.sort().values[(M - 1) // 2])
    if median <= result.max_dimension:
        assert result.dimension == median
    else:
        assert 1 <= result.dimension <= result.max_dimension


def test_curvature_at_every_chart_is_left_to_the_distances():
    """A 4-manifold in R^16 curved at the scale of every chart that determines a quadratic
    model: no chart is flat at d <= 4, larger d are rejected by the distance ratios, and the
    ratios' likelihood gives the dimension."""
    result = estimate_intrinsic_dimension(polar_product(1000, 4, 2, 1), seed=0)
    assert result.max_dimension == 4 and bool((result.flat_dimensions == 0).all())
    assert result.dimension == 4, (result.distance_dimension, result.probabilities)
    _assert_the_rule(result, min_ratio=2.5)


def test_flat_high_dimension_stands_where_the_distances_fall_short():
    """Uniform points of the 12-cube: the distance ratios read well under 12 (boundaries and
    finite N), but not significantly under the uniform reference, and every chart is flat
    only at the rank: the estimate is 12."""
    x = torch.rand(1000, 12, generator=_generator(0), dtype=torch.float64)
    result = estimate_intrinsic_dimension(x, charts=30, seed=0)
    assert result.distance_dimension < 11
    assert result.dimension == 12 and result.interval == (12, 12)


def test_an_exact_linear_constraint_is_no_dimension():
    """Duplicated coordinates (an isometric copy in R^8) leave every answer of the Klein
    bottle unchanged: the data are mapped onto their affine span first."""
    x = klein_bottle(1000, 2)
    a = estimate_intrinsic_dimension(x, seed=0)
    b = estimate_intrinsic_dimension(torch.cat([x, x], -1) / math.sqrt(2), seed=0)
    assert a.dimension == b.dimension == 2
    assert torch.equal(a.chart_dimensions, b.chart_dimensions)
    assert a.distance_dimension == pytest.approx(b.distance_dimension, rel=1e-9)
    torch.testing.assert_close(a.gap_ratios, b.gap_ratios[:, :4], equal_nan=True)
    assert bool(b.gap_ratios[:, 4:].isnan().all())


def test_repeated_points_are_no_information():
    """Each point of a 2-sphere three times: the same answers as the sphere (a repeated point's
    nearest distance is 0, and a chart of copies fits a line)."""
    x = sphere(800, 2, 3, 5)
    a = estimate_intrinsic_dimension(x, seed=0)
    b = estimate_intrinsic_dimension(torch.cat([x, x, x]), seed=0)
    assert a.dimension == b.dimension == 2
    assert torch.equal(a.chart_dimensions, b.chart_dimensions)
    assert a.distance_dimension == pytest.approx(b.distance_dimension, rel=1e-9)


def test_the_uniform_reference_falls_below_d_only_in_high_dimension():
    """The rejection threshold: the two-nearest-neighbour dimension of uniform cube points
    is d within sampling error for d = 1, 2 and well below d for d = 20 (N = 1000)."""
    from atlasdist.intrinsic_dimension import _uniform_reference

    for d in (1, 2):
        assert abs(_uniform_reference(1000, 1000, d) - d) < 3 * d / math.sqrt(1000)
    assert _uniform_reference(1000, 1000, 20) < 17


def test_estimate_is_invariant_to_similarities():
    """Rotating, shifting and scaling the data moves no neighbour and no gap."""
    x = sphere(800, 2, 5, 4) + 0.003 * torch.randn(
        800, 5, generator=_generator(5), dtype=torch.float64
    )
    g = _generator(6)
    q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    y = 7.5 * x @ q.T + torch.randn(5, generator=g, dtype=torch.float64)
    a = estimate_intrinsic_dimension(x, seed=3)
    b = estimate_intrinsic_dimension(y, seed=3)
    assert a.dimension == b.dimension == 2
    assert torch.equal(a.chart_dimensions, b.chart_dimensions)
    torch.testing.assert_close(a.gap_ratios, b.gap_ratios, equal_nan=True)
    torch.testing.assert_close(7.5 * a.spectrum, b.spectrum)


def test_a_larger_ratio_never_lowers_a_chart_dimension():
    x = moebius_strip(1000, 7)
    low = estimate_intrinsic_dimension(x, min_ratio=2.0, seed=0)
    high = estimate_intrinsic_dimension(x, min_ratio=6.0, seed=0)
    assert bool((high.chart_dimensions >= low.chart_dimensions).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(charts=0), "charts must be an int >= 1"),
        (dict(charts=2.5), "charts must be an int >= 1"),
        (dict(min_ratio=1.0), "min_ratio must be a finite number > 1"),
        (dict(steps=0), "steps must be None or an int >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_intrinsic_dimension(torch.randn(50, 3), **kwargs)


def test_integer_data_raise():
    with pytest.raises(ValueError, match="floating point"):
        estimate_intrinsic_dimension(torch.ones(50, 3, dtype=torch.long))
