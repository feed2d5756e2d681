"""Flows on the sphere S^(n-1): closed forms against autodiff, inverses, parametrization,
the identities of reference/003 ("Simple spherical flows"), normalization by quadrature and
goodness of fit of samples against log_prob (DESIGN.md section 4)."""

from __future__ import annotations

import doctest
import math

import goftests
import mpmath as mp
import numpy as np
import pyro
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.distributions import ProjectedNormal
from scipy.spatial import cKDTree

import atlasdist.distributions.sphere as dist_sphere
import atlasdist.transforms.manifold as manifold
import atlasdist.transforms.sphere as sphere
from atlasdist._checks import no_validation
from atlasdist.distributions.sphere import (
    SphereFlow,
    SphereFlowDistribution,
    UniformSphere,
    log_sphere_area,
)
from atlasdist.geometry import manifold_log_volume_ratio
from atlasdist.transforms.manifold import ManifoldTransform, qr_parametrized, sphere_projection
from atlasdist.transforms.sphere import (
    NormalizedAffine,
    NormalizedLinear,
    NormalizedTranslation,
    sphere_tolerance,
)


@pytest.fixture(autouse=True)
def single_thread():
    """Small tensors: intra-op threads buy nothing here and thrash on 2 shared cores (a 51k-point
    quadrature took 1.4 s with 2 threads next to another process, 55 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# One line per closed-form flow: the property tests below loop over this list.
CASES = {
    "NormalizedTranslation": NormalizedTranslation,
    "NormalizedLinear": NormalizedLinear,
    "NormalizedAffine": NormalizedAffine,
}

names = st.sampled_from(sorted(CASES))
features = st.integers(2, 5)
seeds = st.integers(0, 2**20)
# Raw parameters ~ N(0, scale^2). Up to scale 1 the autodiff reference is accurate to ~1e-11;
# beyond, it loses ~cond(M) eps while the closed forms do not
# (test_closed_forms_stay_exact_when_ill_conditioned checks those against exact arithmetic).
scales = st.floats(0.05, 1.0)
EPS = torch.finfo(torch.float64).eps
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def randomize(f, seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return f


def build(name: str, n: int, seed: int, scale: float, dtype=torch.float64):
    return randomize(CASES[name](n).double(), seed, scale).to(dtype)


def sphere_points(n: int, batch_shape, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1)
    return sphere_projection(torch.randn(*batch_shape, n, generator=gen, dtype=torch.float64)).to(
        dtype
    )


def conditioning(f) -> float:
    """Error amplification of the inverse: cond(M) for the matrix, 1 / (1 - |b|) for the
    shift (the inverse of a translation by b near the unit sphere is ill-conditioned)."""
    with torch.no_grad():
        cond = float(torch.linalg.cond(f.matrix)) if hasattr(f, "matrix") else 1.0
        b = f.inner_shift if hasattr(f, "inner_shift") else getattr(f, "shift", None)
        return cond / (1 - float(b.norm())) if hasattr(f, "raw") else cond


def chain(n: int, seed: int, scale: float):
    return [build(name, n, seed + i, scale) for i, name in enumerate(sorted(CASES))]


# --- closed forms, inverses, parametrization ------------------------------------------------


@given(name=names, n=features, seed=seeds, scale=scales)
def test_closed_form_volume_ratio_matches_autodiff(name, n, seed, scale):
    f = build(name, n, seed, scale)
    x = sphere_points(n, (16,), seed)
    y, ladj = f.call_and_ladj(x)
    reference = manifold_log_volume_ratio(f, x, sphere_projection, n - 1)
    assert ladj.shape == reference.shape == (16,)
    assert (ladj - reference).abs().max() <= 1e-8
    torch.testing.assert_close(f.log_abs_det_jacobian(x, y), ladj, atol=1e-12, rtol=0)


@given(name=names, n=features, seed=seeds, scale=scales)
def test_inverse_round_trip_and_outputs_on_sphere(name, n, seed, scale):
    f = build(name, n, seed, scale)
    x = sphere_points(n, (32,), seed)
    y = f(x)
    assert (y.norm(dim=-1) - 1).abs().max() <= 1e-14
    # Backward-stable steps: the error is a small multiple of cond * eps (measured: below 2 in
    # 3000 draws; run this file as a script).
    tol = 64 * EPS * conditioning(f)
    torch.testing.assert_close(f.inv(y), x, atol=tol, rtol=0)
    torch.testing.assert_close(f(f.inv(x)), x, atol=tol, rtol=0)
    assert (f.inv(x).norm(dim=-1) - 1).abs().max() <= 1e-14


@given(n=features, seed=seeds, log_scale=st.floats(0.0, 3.0), diag_scale=st.floats(0.0, 20.0))
def test_constraints_hold_for_large_raw_parameters(n, seed, log_scale, diag_scale):
    # Raw values up to ~1e3 (one shift coordinate at 1e6): |c| < 1 and |M^-1 c| < 1 in
    # floating point, the complement 1 - |c|^2 used by the inverse stays positive, M = QR is
    # invertible. The log-diagonal of R is exponentiated; it is drawn up to 20 (spreads of
    # ~100: exp stays a normal float64, as the docstring of qr_parametrized says it must).
    scale = 10.0**log_scale
    fs = [build(name, n, seed, scale) for name in sorted(CASES)]
    with torch.no_grad():
        for f in fs:
            if hasattr(f, "raw"):
                f.raw[0] = 1e6
            if hasattr(f, "weight"):
                gen = torch.Generator().manual_seed(seed)
                f.weight.diagonal().copy_(diag_scale * torch.randn(n, generator=gen))
    for f in fs:
        if hasattr(f, "raw"):
            b, one_minus_b2 = sphere._squash(f.raw.detach())
            assert float(b.norm()) < 1 and float(one_minus_b2) > 0
        if hasattr(f, "weight"):
            q, r, logdet = qr_parametrized(f.weight.detach(), normalize=True)
            eye = torch.eye(n, dtype=torch.float64)
            torch.testing.assert_close(q.mT @ q, eye, atol=1e-10 * scale, rtol=0)
            diag = r.diagonal()
            assert bool((diag > 0).all()) and bool(torch.isfinite(r).all()) and diag.max() == 1
            assert bool(torch.isfinite(logdet))
        x = sphere_points(n, (16,), seed)
        with torch.no_grad():
            y, ladj = f.call_and_ladj(x)
            back = f.inv(x)
        assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(ladj).all())
        assert bool(torch.isfinite(back).all())
        assert (y.norm(dim=-1) - 1).abs().max() <= 1e-12
        assert (back.norm(dim=-1) - 1).abs().max() <= 1e-12


@given(n=features, seed=seeds, scale=scales)
def test_qr_parametrization_reaches_its_matrix(n, seed, scale):
    w = scale * torch.randn(
        n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    q, r, logdet = qr_parametrized(w)
    m = q @ r
    sign, logabs = torch.linalg.slogdet(m)
    assert sign == 1 and abs(float(logabs - logdet)) <= 1e-10
    torch.testing.assert_close(manifold.qr_inverse(q, r) @ m, torch.eye(n, dtype=m.dtype))


def test_shift_initialization():
    c = torch.tensor([0.3, -0.4, 0.5], dtype=torch.float64)
    torch.testing.assert_close(NormalizedTranslation(3, shift=c).double().shift, c)
    with pytest.raises(ValueError, match="norm < 1"):
        NormalizedTranslation(3, shift=torch.tensor([0.6, 0.8, 0.1]))


# --- identities of reference/003 ----------------------------------------------------------


@given(n=features, seed=seeds, scale=scales)
def test_translation_is_affine_with_identity_matrix(n, seed, scale):
    t = build("NormalizedTranslation", n, seed, scale)
    a = NormalizedAffine(n).double()
    with torch.no_grad():
        a.raw.copy_(t.raw)  # weight 0: M = I, and then c = M b = b
    torch.testing.assert_close(a.matrix, torch.eye(n, dtype=torch.float64), atol=0, rtol=0)
    x = sphere_points(n, (16,), seed)
    torch.testing.assert_close(a(x), t(x), atol=1e-14, rtol=0)
    torch.testing.assert_close(a.inv(x), t.inv(x), atol=1e-14, rtol=0)
    torch.testing.assert_close(
        a.log_abs_det_jacobian(x, None), t.log_abs_det_jacobian(x, None), atol=1e-13, rtol=0
    )


def affine_inverse_reference(m: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x = M^-1 (rho y - c), rho = (y'Wc + sqrt((y'Wc)^2 + y'Wy (1 - c'Wc))) / y'Wy with
    W = (M M^T)^-1, as written in reference/003. Forming W squares cond(M), which float64
    cannot afford: evaluated in 40-digit arithmetic."""
    mp.mp.dps = 40
    m_mp, c_mp = mp.matrix(m.tolist()), mp.matrix(c.tolist())
    w = (m_mp * m_mp.T) ** -1
    out = []
    for yi in y.tolist():
        y_mp = mp.matrix(yi)
        ywc, ywy, cwc = (y_mp.T * w * c_mp)[0], (y_mp.T * w * y_mp)[0], (c_mp.T * w * c_mp)[0]
        rho = (ywc + mp.sqrt(ywc**2 + ywy * (1 - cwc))) / ywy
        out.append([float(v) for v in mp.lu_solve(m_mp, rho * y_mp - c_mp)])
    return torch.tensor(out, dtype=torch.float64)


def exact_log_ratio(f, x: torch.Tensor) -> torch.Tensor:
    """log(|det M| (1 + x'b) / |M (x + b)|^n), b = M^-1 c (b = 0 for the linear flow), in
    40-digit arithmetic from the M and b the flow uses."""
    n = x.shape[-1]
    mp.mp.dps = 40
    m = mp.matrix(f.matrix.detach().tolist())
    b = f.inner_shift.detach().tolist() if hasattr(f, "inner_shift") else [0.0] * n
    b = mp.matrix(b)
    out = []
    for xi in x.tolist():
        xm = mp.matrix(xi)
        ratio = abs(mp.det(m)) * (1 + (xm.T * b)[0]) / mp.norm(m * (xm + b)) ** n
        out.append(float(mp.log(ratio)))
    return torch.tensor(out, dtype=torch.float64)


@given(n=features, seed=seeds, scale=scales)
def test_affine_matches_the_reference_formulas(n, seed, scale):
    # Forward, inverse (with W = (M M^T)^-1) and volume ratio exactly as written in
    # reference/003, from the matrix M and shift c alone.
    f = build("NormalizedAffine", n, seed, scale)
    m, c = f.matrix.detach(), f.shift.detach()
    m_inv_c = torch.linalg.solve(m, c)
    assert float(m_inv_c.norm()) < 1
    x = sphere_points(n, (16,), seed)
    z = x @ m.mT + c
    torch.testing.assert_close(f(x), z / z.norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)
    ratio = torch.linalg.det(m).abs().log() + (1 + x @ m_inv_c).log() - n * z.norm(dim=-1).log()
    torch.testing.assert_close(f.log_abs_det_jacobian(x, None), ratio, atol=1e-10, rtol=0)
    expected = affine_inverse_reference(m, c, x)
    torch.testing.assert_close(f.inv(x), expected, atol=64 * EPS * conditioning(f), rtol=0)
    # R_aff(x; M, c) = R_lin(x; M + c x^T) at x (reference/003).
    ratio_lin = [
        torch.linalg.det(m + torch.outer(c, xi)).abs().log() - n * (m @ xi + c).norm().log()
        for xi in x
    ]
    torch.testing.assert_close(ratio, torch.stack(ratio_lin), atol=1e-10, rtol=0)


@given(n=features, seed=seeds, scale=scales)
def test_affine_is_linear_after_translation(n, seed, scale):
    # f_aff(M, c) = f_lin(M) o f_trans(M^-1 c): maps and volume ratios compose.
    f = build("NormalizedAffine", n, seed, scale)
    t, lin = NormalizedTranslation(n).double(), NormalizedLinear(n).double()
    with torch.no_grad():
        t.raw.copy_(f.raw)
        lin.weight.copy_(f.weight)
    x = sphere_points(n, (16,), seed)
    u, l1 = t.call_and_ladj(x)
    y, l2 = lin.call_and_ladj(u)
    torch.testing.assert_close(f(x), y, atol=1e-13, rtol=0)
    torch.testing.assert_close(f.log_abs_det_jacobian(x, y), l1 + l2, atol=1e-12, rtol=0)
    torch.testing.assert_close(f.inv(y), t.inv(lin.inv(y)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["NormalizedLinear", "NormalizedAffine"])
@pytest.mark.parametrize("seed", range(4))
def test_closed_forms_stay_exact_when_ill_conditioned(name, seed):
    # Raw scale 4 (cond(M) up to 2e10), where the autodiff reference is off by up to 5e-7: the
    # closed-form volume ratio against 40-digit arithmetic on the same M, b (2e-11 at worst).
    f = build(name, 4, seed, 4.0)
    x = sphere_points(4, (8,), seed)
    got = f.log_abs_det_jacobian(x, None).detach()
    assert (got - exact_log_ratio(f, x)).abs().max() <= 1e-10


def angular_central_gaussian_log_prob(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The ACG log-density w.r.t. the surface measure, Sigma = M M^T (Tyler 1987):
    Gamma(n/2) / (2 pi^(n/2)) |Sigma|^(-1/2) (y^T Sigma^-1 y)^(-n/2), in 40-digit arithmetic
    (forming Sigma squares cond(M), which float64 cannot afford)."""
    n = y.shape[-1]
    mp.mp.dps = 40
    m_mp = mp.matrix(m.tolist())
    sigma = m_mp * m_mp.T
    sigma_inv = sigma**-1
    const = mp.loggamma(mp.mpf(n) / 2) - mp.log(2) - mp.mpf(n) / 2 * mp.log(mp.pi)
    const -= mp.log(mp.det(sigma)) / 2
    out = []
    for yi in y.tolist():
        y_mp = mp.matrix(yi)
        out.append(float(const - mp.mpf(n) / 2 * mp.log((y_mp.T * sigma_inv * y_mp)[0])))
    return torch.tensor(out, dtype=torch.float64)


@given(n=features, seed=seeds, scale=scales)
def test_linear_flow_pushes_uniform_to_angular_central_gaussian(n, seed, scale):
    f = build("NormalizedLinear", n, seed, scale)
    d = SphereFlowDistribution(UniformSphere(n, dtype=torch.float64), [f])
    y = sphere_points(n, (16,), seed)
    expected = angular_central_gaussian_log_prob(y, f.matrix.detach())
    assert (d.log_prob(y).detach() - expected).abs().max() <= 1e-10


# --- normalization and goodness of fit ----------------------------------------------------


def make_distribution(n, seed, scale, base):
    flows = chain(n, seed, scale)
    if base == "uniform":
        return SphereFlowDistribution(UniformSphere(n, dtype=torch.float64), flows)
    gen = torch.Generator().manual_seed(seed + 7)
    concentration = 2 * scale * torch.randn(n, generator=gen, dtype=torch.float64)
    return SphereFlowDistribution(ProjectedNormal(concentration), flows)


def circle_integral(log_prob, points=32768):
    """Trapezoid rule on the periodic angle: spectrally accurate for a smooth density."""
    theta = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)
    with torch.no_grad():
        density = log_prob(torch.stack([theta.cos(), theta.sin()], -1)).exp()
    return float(density.sum()) * 2 * math.pi / points


def sphere2_integral(log_prob, n_theta=160, n_phi=320):
    """Gauss-Legendre in cos(theta) times the trapezoid rule in phi: dA = d(cos theta) dphi."""
    nodes, weights = np.polynomial.legendre.leggauss(n_theta)
    ct, w = torch.tensor(nodes), torch.tensor(weights)
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    sin_theta = (1 - ct**2).sqrt()[:, None]
    pts = torch.stack(
        [sin_theta * phi.cos(), sin_theta * phi.sin(), ct[:, None].expand(-1, n_phi)], -1
    )
    with torch.no_grad():
        density = log_prob(pts).exp()
    return float((density * w[:, None]).sum()) * 2 * math.pi / n_phi


# Raw parameters up to 1 on the circle and 0.4 on the 2-sphere: densities whose peaks the grids
# resolve (quadrature error below 1e-10 over 1000 random draws each: run this file as a script).
@given(
    seed=seeds, scale=st.floats(0.05, 1.0), base=st.sampled_from(["uniform", "projected_normal"])
)
def test_density_integrates_to_one_on_the_circle(seed, scale, base):
    d = make_distribution(2, seed, scale, base)
    assert abs(circle_integral(d.log_prob) - 1) <= 1e-3


@given(
    seed=seeds, scale=st.floats(0.05, 0.4), base=st.sampled_from(["uniform", "projected_normal"])
)
def test_density_integrates_to_one_on_the_2_sphere(seed, scale, base):
    d = make_distribution(3, seed, scale, base)
    assert abs(sphere2_integral(d.log_prob) - 1) <= 1e-3


@pytest.mark.parametrize("n", [2, 3])
def test_quadrature_detects_a_wrong_volume_ratio(n):
    d = make_distribution(n, 5, 0.4, "uniform")
    last = d.transforms[-1]

    def wrong(y):  # the last flow's ratio applied in the wrong direction
        return d.log_prob(y) + 2 * last.log_abs_det_jacobian(last.inv(y), y)

    integral = circle_integral if n == 2 else sphere2_integral
    assert abs(integral(d.log_prob) - 1) <= 1e-3
    assert abs(integral(wrong) - 1) > 1e-2


def exp_goodness_of_fit(exp_samples) -> float:
    """goftests.exp_goodness_of_fit (Pearson's test of exp(-x) on N^(1/3) equal bins) with
    scipy's chi^2 tail: goftests 0.3.0's own chi2sf sums 100 series terms and returns ~1 for
    statistics between ~200 and ~2000, so grossly wrong densities would pass."""
    u = np.exp(-np.asarray(exp_samples, dtype=float))
    counts = np.histogram(u, bins=int(round(len(u) ** (1 / 3))), range=(0.0, 1.0))[0]
    return float(scipy.stats.chisquare(counts).pvalue)


def nearest_neighbour_gof(points: torch.Tensor, log_prob: torch.Tensor, dim: int) -> float:
    """goftests.vector_density_goodness_of_fit with the intrinsic dimension: N p(x) vol_dim(r)
    is Exp(1) distributed (r the distance to the nearest other sample) when p is the density
    w.r.t. dim-dimensional volume; on the unit 2-sphere the chord disc has the exact cap area."""
    pts = points.detach().double().numpy()
    radii = cKDTree(pts).query(pts, k=2)[0][:, 1]
    density = log_prob.detach().double().exp().numpy()
    return exp_goodness_of_fit(len(pts) * density * goftests.volume_of_sphere(dim, radii))


def spacing_gof(x: np.ndarray, log_prob: torch.Tensor) -> float:
    """goftests.density_goodness_of_fit (1-D spacings) with the corrected chi^2 tail."""
    order = np.argsort(x)
    x, p = x[order], log_prob.detach().double().exp().numpy()[order]
    return exp_goodness_of_fit(len(x) * np.sqrt(p[1:] * p[:-1]) * np.diff(x))


def circle_ks(theta: np.ndarray, log_prob, points: int = 8192) -> float:
    """Kolmogorov-Smirnov test of angles against the CDF of the density (trapezoid rule)."""
    grid = torch.linspace(-math.pi, math.pi, points + 1, dtype=torch.float64)
    with torch.no_grad():
        density = log_prob(torch.stack([grid.cos(), grid.sin()], -1)).exp()
    cdf = torch.cat(
        [density.new_zeros(1), (density[1:] + density[:-1]).cumsum(0) * math.pi / points]
    )
    return float(
        scipy.stats.kstest(theta, lambda t: np.interp(t, grid.numpy(), cdf.numpy())).pvalue
    )


def sphere2_projection_ks(y: torch.Tensor, log_prob, u: torch.Tensor, n_t=2048, n_phi=256):
    """KS test of t = u.y on S^2 against its CDF. By Archimedes, dA = dt dphi in the
    coordinates (t, phi) around u, so t has density g(t) = int p dphi (trapezoid in phi,
    cumulative trapezoid in t)."""
    frame = torch.linalg.qr(torch.stack([u, torch.randn_like(u), torch.randn_like(u)], -1))[0]
    frame = frame * frame[:, 0].dot(u).sign()
    t = torch.linspace(-1, 1, n_t + 1, dtype=torch.float64)
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    r = (1 - t**2).clamp(min=0).sqrt()[:, None]
    pts = t[:, None, None] * frame[:, 0]
    pts = pts + (r * phi.cos())[..., None] * frame[:, 1] + (r * phi.sin())[..., None] * frame[:, 2]
    with torch.no_grad():
        g = log_prob(pts).exp().sum(-1) * (2 * math.pi / n_phi)
    cdf = torch.cat([g.new_zeros(1), (g[1:] + g[:-1]).cumsum(0) / n_t])
    samples = (y @ u).detach().numpy()
    return float(
        scipy.stats.kstest(samples, lambda s: np.interp(s, t.numpy(), cdf.numpy())).pvalue
    )


# (n, seed, raw scale, base): moderate densities, for which the nearest-neighbour statistic is
# calibrated (it assumes p nearly constant over each nearest-neighbour ball).
GOF_CASES = [
    (2, 0, 0.7, "uniform"),
    (2, 1, 0.7, "projected_normal"),
    (3, 1, 0.5, "uniform"),
    (3, 1, 0.5, "projected_normal"),
    (4, 1, 0.5, "uniform"),
]


@pytest.mark.parametrize("n,seed,scale,base", GOF_CASES)
def test_samples_match_log_prob(n, seed, scale, base):
    torch.manual_seed(seed)
    d = make_distribution(n, seed, scale, base)
    last = d.transforms[-1]
    candidates = {
        "log_prob": d.log_prob,
        # Controls that must be rejected: the test has power against plausible bugs.
        "ratio sign flipped": lambda y: (
            d.log_prob(y) + 2 * last.log_abs_det_jacobian(last.inv(y), y)
        ),
        "no volume ratios": d.base_dist.log_prob,
    }
    with torch.no_grad():
        y = d.sample((4000 if n < 4 else 6000,))
    p_values = {}
    for label, log_prob in candidates.items():
        with torch.no_grad():
            lp = log_prob(y)
        if n == 2:
            theta = torch.atan2(y[:, 1], y[:, 0]).numpy()
            tests = [spacing_gof(theta, lp), circle_ks(theta, log_prob)]
        elif n == 3:
            gen = torch.Generator().manual_seed(seed)
            u = sphere_projection(torch.randn(3, generator=gen, dtype=torch.float64))
            tests = [nearest_neighbour_gof(y, lp, 2), sphere2_projection_ks(y, log_prob, u)]
        else:
            tests = [nearest_neighbour_gof(y, lp, n - 1)]
        p_values[label] = min(tests)
    assert p_values.pop("log_prob") > 1e-3
    assert max(p_values.values()) < 1e-3, p_values


# --- distributions: shapes, dtypes, gradients, modules ------------------------------------


@given(n=st.integers(2, 4), seed=seeds, batch_shape=batch_shapes)
def test_distribution_shapes_and_expand(n, seed, batch_shape):
    gen = torch.Generator().manual_seed(seed)
    conc = torch.randn(*batch_shape, n, generator=gen, dtype=torch.float64)
    d = SphereFlowDistribution(ProjectedNormal(conc), chain(n, seed, 0.5))
    assert d.batch_shape == batch_shape and d.event_shape == (n,)
    y = d.rsample((5,))
    assert y.shape == (5,) + batch_shape + (n,)
    assert d.log_prob(y).shape == (5,) + batch_shape
    e = d.expand((2,) + batch_shape)
    assert e.batch_shape == (2,) + batch_shape and e.sample().shape == (2,) + batch_shape + (n,)
    torch.testing.assert_close(e.log_prob(y[:1]), d.log_prob(y[:1]).expand((2,) + batch_shape))
    u = UniformSphere(n, batch_shape, dtype=torch.float64)
    assert u.sample((3,)).shape == (3,) + batch_shape + (n,)
    assert u.expand((4,) + batch_shape).log_prob(y[0]).shape == (4,) + batch_shape
    f = d.transforms[0]
    assert tuple(f.forward_shape(y.shape)) == y.shape == tuple(f.inverse_shape(y.shape))


def test_uniform_sphere_density():
    for n in (2, 3, 5):
        torch.testing.assert_close(
            UniformSphere(n).log_prob(torch.eye(n)[0]), torch.tensor(-log_sphere_area(n))
        )
    assert math.isclose(log_sphere_area(2), math.log(2 * math.pi))
    assert math.isclose(log_sphere_area(3), math.log(4 * math.pi))


@given(name=names, n=features, seed=seeds, scale=scales)
def test_float32_preserved_and_close_to_float64(name, n, seed, scale):
    f64, f32 = build(name, n, seed, scale), build(name, n, seed, scale, torch.float32)
    x = sphere_points(n, (8,), seed)
    y64, l64 = f64.call_and_ladj(x)
    y32, l32 = f32.call_and_ladj(x.float())
    assert y32.dtype == l32.dtype == f32.inv(y32).dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l32.double(), l64, atol=1e-4, rtol=1e-4)
    flow = SphereFlow(n, [f32])
    assert flow().sample((3,)).dtype == flow().log_prob(x.float()).dtype == torch.float32


@given(n=features, seed=seeds, scale=scales)
def test_gradients_are_finite(n, seed, scale):
    flow = SphereFlow(n, chain(n, seed, scale), base="projected_normal" if n <= 4 else "uniform")
    flow = randomize(flow.double(), seed, scale)
    y = flow().rsample((16,))
    loss = -flow().log_prob(y.detach()).mean() + y.sum()
    loss.backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_module_state_dict_dtype_and_optimizer():
    torch.manual_seed(0)
    flow = SphereFlow(3, [NormalizedAffine(3), NormalizedTranslation(3)], base="projected_normal")
    flow = randomize(flow.double(), 0, 0.5)
    names_ = {k for k, _ in flow.named_parameters()}
    assert names_ == {
        "concentration",
        "transform_modules.0.weight",
        "transform_modules.0.raw",
        "transform_modules.1.raw",
    }
    data = flow().sample((256,))
    clone = SphereFlow(3, [NormalizedAffine(3), NormalizedTranslation(3)], "projected_normal")
    clone.double().load_state_dict(flow.state_dict())
    torch.testing.assert_close(clone().log_prob(data), flow().log_prob(data))
    opt = torch.optim.Adam(clone.parameters(), lr=1e-2)
    before = float(-clone().log_prob(data).mean())
    for _ in range(5):
        opt.zero_grad()
        (-clone().log_prob(data).mean()).backward()
        opt.step()
    assert float(-clone().log_prob(data).mean()) < before
    pyro.clear_param_store()
    pyro.module("sphere_flow", flow)
    assert len(pyro.get_param_store()) == 4


def test_pyro_model_with_observations():
    flow = SphereFlow(3, [NormalizedLinear(3)])
    data = flow().sample((10,))

    def model():
        pyro.module("flow", flow)
        with pyro.plate("data", 10):
            pyro.sample("obs", flow(), obs=data)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["obs"]["log_prob"], flow().log_prob(data))


# --- the generic route --------------------------------------------------------------------


@given(n=st.integers(2, 4), seed=seeds, scale=scales)
def test_manifold_transform_matches_closed_forms(n, seed, scale):
    closed = chain(n, seed, scale)
    generic = [
        ManifoldTransform(f, sphere_projection, n - 1, n, inverse=f.inv, codomain=f.codomain)
        for f in closed
    ]
    base = UniformSphere(n, dtype=torch.float64)
    d_closed = SphereFlowDistribution(base, closed)
    d_generic = SphereFlowDistribution(base, generic)
    y = sphere_points(n, (8,), seed)
    lp_closed, lp_generic = d_closed.log_prob(y), d_generic.log_prob(y)
    assert (lp_closed - lp_generic).abs().max() <= 1e-8
    # Parameter gradients flow through the autodiff log-det and agree with the closed form.
    params = [p for f in closed for p in f.parameters()]
    g_closed = torch.autograd.grad(lp_closed.sum(), params)
    g_generic = torch.autograd.grad(lp_generic.sum(), params)
    for a, b in zip(g_closed, g_generic, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)


def test_manifold_transform_without_inverse_and_bad_dim():
    f = ManifoldTransform(NormalizedTranslation(3), sphere_projection, 2, 3)
    x = torch.tensor([[0.0, 0.0, 1.0]])
    assert f(x).shape == (1, 3)
    with pytest.raises(NotImplementedError, match="inverse"):
        f.inv(x)
    with pytest.raises(ValueError, match="dim"):
        ManifoldTransform(NormalizedTranslation(3), sphere_projection, 4, 3)
    assert len(list(f.parameters())) == 1  # the wrapped module is registered


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises(name):
    f = build(name, 3, 0, 0.5)
    with pytest.raises(ValueError, match=r"\(\*, 3\)"):
        f(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\*, 3\)"):
        f.inv(torch.ones(2, 2, dtype=torch.float64))
    nan = torch.tensor([[float("nan"), 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="non-finite"):
        f(nan)
    off = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.6, 0.81]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1 input point\(s\) off the unit sphere S\^2: .* 0\.00"):
        f(off)
    with pytest.raises(ValueError, match="off the unit sphere"):
        f.inv(off)
    with pytest.raises(ValueError, match="features must be >= 2"):
        CASES[name](1)
    # Without validation, off-sphere inputs are projected radially first.
    with no_validation():
        torch.testing.assert_close(f(3 * off), f(sphere_projection(off)))
        torch.testing.assert_close(f.inv(3 * off), f.inv(sphere_projection(off)))


def test_distribution_bad_values_raise():
    d = SphereFlowDistribution(UniformSphere(3, dtype=torch.float64), chain(3, 0, 0.5))
    with pytest.raises(ValueError, match=r"off the unit sphere .* up to 0\.5 "):
        d.log_prob(torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\*, 3\)"):
        d.log_prob(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        d.log_prob(torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="off the unit sphere"):
        UniformSphere(3, validate_args=True).log_prob(torch.ones(3))
    with pytest.raises(ValueError, match=r"maps 2 to 2 features, the base has 3"):
        SphereFlowDistribution(UniformSphere(3), [NormalizedLinear(2)])
    with pytest.raises(ValueError, match="base must be"):
        SphereFlow(3, [], base="normal")
    with pytest.raises(ValueError, match="ProjectedNormal"):
        SphereFlow(6, [], base="projected_normal")
    # Tolerance: float32-normalized data cast to float64 is accepted, 1e-5 off is not.
    y = sphere_projection(torch.randn(100, 3)).double()
    assert bool(torch.isfinite(d.log_prob(y)).all())
    assert bool(d.support.check(y).all())
    assert sphere_tolerance(torch.float64) == 1e-6
    assert not bool(d.support.check(1.00001 * y).any())
    # Without validation, values are projected radially; the constraint has a transform_to.
    lax = SphereFlowDistribution(d.base_dist, d.transforms, validate_args=False)
    torch.testing.assert_close(lax.log_prob(3 * y), d.log_prob(y))
    u = torch.distributions.transform_to(d.support)(torch.randn(5, 3))
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(5))


@pytest.mark.parametrize("module", [sphere, manifold, dist_sphere])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.cuda
def test_cuda_matches_cpu():
    flow = randomize(SphereFlow(3, chain(3, 0, 0.5), base="projected_normal").double(), 0, 0.5)
    y = sphere_points(3, (16,), 0)
    expected = flow().log_prob(y)
    flow.cuda()
    d = flow()
    assert d.sample((4,)).device.type == "cuda"
    torch.testing.assert_close(d.log_prob(y.cuda()).cpu(), expected)


# --- measured errors ------------------------------------------------------------------------


def measure(draws: int = 300) -> None:
    """Maximum errors of the identities above over random draws in the tested ranges:
    ``python tests/test_sphere_flows.py [draws]``."""
    import random
    import sys

    torch.set_num_threads(1)
    rng = random.Random(0)
    worst: dict[str, float] = {}

    def record(label, value):
        worst[label] = max(worst.get(label, 0.0), float(value))

    for _ in range(draws):
        seed, n, scale = rng.randrange(2**20), rng.randint(2, 5), rng.uniform(0.05, 1.0)
        x = sphere_points(n, (16,), seed)
        for name in CASES:
            f = build(name, n, seed, scale)
            with torch.no_grad():
                y, ladj = f.call_and_ladj(x)
                ref = manifold_log_volume_ratio(f, x, sphere_projection, n - 1)
                record(f"{name}: |log R - autodiff|", (ladj - ref).abs().max())
                err = max((f.inv(y) - x).abs().max(), (f(f.inv(x)) - x).abs().max())
                record(f"{name}: round trip", err)
                record(f"{name}: round trip / (cond eps)", err / (EPS * conditioning(f)))
        t, a = build("NormalizedTranslation", n, seed, scale), NormalizedAffine(n).double()
        lin = build("NormalizedLinear", n, seed, scale)
        with torch.no_grad():
            a.raw.copy_(t.raw)
            diff = (a.log_abs_det_jacobian(x, None) - t.log_abs_det_jacobian(x, None)).abs()
            record("R_trans(c) vs R_aff(I, c)", diff.max())
            record("f_trans(c) vs f_aff(I, c)", (a(x) - t(x)).abs().max())
            d = SphereFlowDistribution(UniformSphere(n, dtype=torch.float64), [lin])
            acg = angular_central_gaussian_log_prob(x, lin.matrix)
            record("uniform pushed by f_lin vs ACG(M M^T)", (d.log_prob(x) - acg).abs().max())
            aff = build("NormalizedAffine", n, seed, scale)
            ref = affine_inverse_reference(aff.matrix, aff.shift, x)
            err = (aff.inv(x) - ref).abs().max() / (EPS * conditioning(aff))
            record("f_aff^-1 vs reference formula / (cond eps)", err)
            record("cond(M), raw scale <= 1", conditioning(lin))
            for name in ("NormalizedLinear", "NormalizedAffine"):
                g = build(name, n, seed, 1 + 2 * scale)  # raw scale 1..3
                cond = float(torch.linalg.cond(g.matrix))
                if math.isfinite(cond):  # else numerically singular: no accuracy to measure
                    err = (g.log_abs_det_jacobian(x, None) - exact_log_ratio(g, x)).abs().max()
                    record(
                        f"{name}: |log R - exact| / (cond eps), raw scale 1..3", err / (cond * EPS)
                    )
    for _ in range(draws):
        seed, base = rng.randrange(2**20), rng.choice(["uniform", "projected_normal"])
        d = make_distribution(2, seed, rng.uniform(0.05, 1.0), base)
        record("|int_S1 p - 1|", abs(circle_integral(d.log_prob) - 1))
        d = make_distribution(3, seed, rng.uniform(0.05, 0.4), base)
        record("|int_S2 p - 1|", abs(sphere2_integral(d.log_prob) - 1))
    for label, value in worst.items():
        print(f"{label:45s} {value:.3g}")
    print(f"({draws} draws each; n in 2..5, raw scale <= 1; quadrature ranges as in the tests)")
    for case in GOF_CASES:
        n, seed, scale, base = case
        torch.manual_seed(seed)
        d = make_distribution(n, seed, scale, base)
        with torch.no_grad():
            y = d.sample((4000 if n < 4 else 6000,))
            lp, wrong = d.log_prob(y), d.base_dist.log_prob(y)
        p, q = nearest_neighbour_gof(y, lp, n - 1), nearest_neighbour_gof(y, wrong, n - 1)
        print(f"GOF {case}: p = {p:.3g} (no volume ratios: {q:.3g})")
    sys.stdout.flush()


if __name__ == "__main__":
    import sys

    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
