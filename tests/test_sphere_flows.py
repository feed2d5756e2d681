"""Flows on the sphere S^(n-1), what only they have: parametrization, the identities of
reference/003 ("Simple spherical flows"), closed forms against 40-digit arithmetic when
ill-conditioned, the uniform distribution and the tolerance. The properties every flow on a
known manifold has (closed forms against autodiff, inverses, normalization by quadrature,
goodness of fit of samples against log_prob, shapes, modules, bad input) are tested in
test_manifold_flows.py."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from _manifold_checks import (
    EPS,
    SPHERE,
    Worst,
    batch_shapes,
    conditioning,
    features,
    report_goodness_of_fit,
    scales,
    seeds,
    single_thread,  # noqa: F401 (autouse fixture)
)
from hypothesis import given
from hypothesis import strategies as st

import atlasdist.transforms.sphere as sphere
from atlasdist.distributions.sphere import SphereFlow, SphereFlowDistribution, UniformSphere
from atlasdist.geometry import manifold_log_volume_ratio
from atlasdist.manifolds import log_sphere_area, sphere_projection, sphere_tolerance
from atlasdist.transforms.manifold import ManifoldTransform, qr_parametrized
from atlasdist.transforms.sphere import NormalizedAffine, NormalizedLinear, NormalizedTranslation

CASES = SPHERE.flows
names = st.sampled_from(SPHERE.names)
# Raw parameters ~ N(0, scale^2). Up to scale 1 the autodiff reference is accurate to ~1e-11;
# beyond, it loses ~cond(M) eps while the closed forms do not
# (test_closed_forms_stay_exact_when_ill_conditioned checks those against exact arithmetic).
build, chain, sphere_points = SPHERE.build, SPHERE.chain, SPHERE.points
make_distribution = SPHERE.make_distribution


# --- closed forms, inverses, parametrization ------------------------------------------------


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


# --- the uniform distribution, the generic route, bad input -------------------------------


@given(n=st.integers(2, 4), seed=seeds, batch_shape=batch_shapes)
def test_uniform_sphere_shapes_and_expand(n, seed, batch_shape):
    y = sphere_points(n, (5,) + batch_shape, seed)
    u = UniformSphere(n, batch_shape, dtype=torch.float64)
    assert u.sample((3,)).shape == (3,) + batch_shape + (n,)
    assert u.expand((4,) + batch_shape).log_prob(y[0]).shape == (4,) + batch_shape


def test_uniform_sphere_density():
    for n in (2, 3, 5):
        torch.testing.assert_close(
            UniformSphere(n).log_prob(torch.eye(n)[0]), torch.tensor(-log_sphere_area(n))
        )
    assert math.isclose(log_sphere_area(2), math.log(2 * math.pi))
    assert math.isclose(log_sphere_area(3), math.log(4 * math.pi))


def test_manifold_transform_without_inverse_and_bad_dim():
    f = ManifoldTransform(NormalizedTranslation(3), sphere_projection, 2, 3)
    x = torch.tensor([[0.0, 0.0, 1.0]])
    assert f(x).shape == (1, 3)
    with pytest.raises(NotImplementedError, match="inverse"):
        f.inv(x)
    with pytest.raises(ValueError, match="dim"):
        ManifoldTransform(NormalizedTranslation(3), sphere_projection, 4, 3)
    assert len(list(f.parameters())) == 1  # the wrapped module is registered


def test_sphere_bad_values_and_tolerance():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    # Bad values of every flow distribution: test_manifold_flows.py.
    d = SphereFlowDistribution(UniformSphere(3, dtype=torch.float64), chain(3, 0, 0.5))
    with pytest.raises(ValueError, match="off the unit sphere"):
        UniformSphere(3, validate_args=True).log_prob(torch.ones(3))
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


# --- measured errors ------------------------------------------------------------------------


def measure(draws: int = 300) -> None:
    """Maximum errors of the identities above over random draws in the tested ranges:
    ``python tests/test_sphere_flows.py [draws]``."""
    import random

    torch.set_num_threads(1)
    rng, worst = random.Random(0), Worst()
    record = worst.record

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
        record("|int_S1 p - 1|", abs(SPHERE.integral(d.log_prob, 2) - 1))
        d = make_distribution(3, seed, rng.uniform(0.05, 0.4), base)
        record("|int_S2 p - 1|", abs(SPHERE.integral(d.log_prob, 3) - 1))
    worst.report(45)
    print(f"({draws} draws each; n in 2..5, raw scale <= 1; quadrature ranges as in the tests)")
    report_goodness_of_fit(SPHERE)


if __name__ == "__main__":
    import sys

    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
