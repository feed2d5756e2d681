"""The chart rule of estimate_intrinsic_dimension on manifolds of known dimension: a
non-orientable surface, curved manifolds of dimension >= 4 in R^D with D >= 10, noise, full
dimension; the uncertainty it reports; its invariances."""

import math

import pytest
import torch

from atlasdist.intrinsic_dimension import IntrinsicDimension, estimate_intrinsic_dimension


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


CASES = [  # name, data, true d
    ("Klein bottle in R^4", lambda: klein_bottle(2000, 0), 2),
    ("noisy Klein bottle in R^4", lambda: klein_bottle(2000, 1, noise=0.005), 2),
    ("Moebius strip in R^3", lambda: moebius_strip(1500, 0), 2),
    ("Moebius strip, 9 half-twists", lambda: moebius_strip(2500, 0, twists=9), 2),
    ("S^4 in R^12", lambda: sphere(2000, 4, 12, 0), 4),
    ("graph of cosines, d = 4 in R^12", lambda: curved_graph(2000, 4, 12, 0), 4),
    ("full Gaussian in R^6", lambda: torch.randn(1500, 6, generator=_generator(0)), 6),
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
    torch.testing.assert_close(result.probabilities.sum(), torch.tensor(1.0, dtype=x.dtype))
    counts = torch.bincount(result.chart_dimensions - 1, minlength=D).to(x.dtype) / M
    torch.testing.assert_close(result.probabilities, counts)
    assert result.dimension == int(result.chart_dimensions.sort().values[(M - 1) // 2])
    # a chart's answer is the first d whose flattened gap reaches min_ratio
    for m in range(M):
        dm = int(result.chart_dimensions[m])
        ratios = result.gap_ratios[m, : dm - 1]
        assert bool((ratios < 2.5).all())
        assert dm == D or float(result.gap_ratios[m, dm - 1]) >= 2.5
    assert result.model is None and result.history is None


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
