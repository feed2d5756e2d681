"""Calibration flows on the simplex Delta^(n-1), what only they have: closed forms against
50-digit arithmetic near the boundary, parametrization, the identities of reference/003
("Simplex calibration transform") and the measure (Hausdorff vs torch's Lebesgue on the first
n-1 coordinates). The properties every flow on a known manifold has (closed forms against
autodiff, inverses, normalization by quadrature, goodness of fit of samples against log_prob,
shapes, modules, bad input) are tested in test_manifold_flows.py."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from _manifold_checks import (
    SIMPLEX,
    Worst,
    features,
    report_goodness_of_fit,
    scales,
    seeds,
    single_thread,  # noqa: F401 (autouse fixture)
    softmax_with_zero,
    triangle_area_element,
)
from hypothesis import given
from hypothesis import strategies as st
from pyro.distributions import Dirichlet

from atlasdist.distributions.simplex import SimplexFlow, SimplexFlowDistribution
from atlasdist.geometry import manifold_log_volume_ratio
from atlasdist.manifolds import (
    helmert_basis,
    log_simplex_volume,
    simplex_hausdorff_log_factor,
    simplex_projection,
)
from atlasdist.transforms.manifold import ManifoldTransform, qr_parametrized
from atlasdist.transforms.simplex import Calibration

CASES = SIMPLEX.flows
names = st.sampled_from(SIMPLEX.names)
build, chain, simplex_points = SIMPLEX.build, SIMPLEX.chain, SIMPLEX.points
make_distribution = SIMPLEX.make_distribution


def matrix_and_shift(f):
    """(A, c) of either flow: A = I / a for the calibration transform."""
    if isinstance(f, Calibration):
        n = f.in_features
        return torch.eye(n, dtype=torch.float64) / f.temperature.detach(), f.shift.detach()
    return f.matrix.detach(), f.shift.detach()


def gcal(p, a, c):
    """softmax(A log p + c), exactly as written in reference/003."""
    return torch.softmax(p.log() @ a.mT + c, -1)


def gcal_log_ratio(p, a, c):
    """log R = log(|det A| / |lambda|) + sum log q - sum log p, reference/003."""
    lam = (a @ torch.ones(a.shape[-1], dtype=a.dtype))[0]
    q = gcal(p, a, c)
    return torch.linalg.slogdet(a)[1] - lam.abs().log() + (q.log() - p.log()).sum(-1)


# --- closed forms, inverses, parametrization ------------------------------------------------


def exact_log_ratio(p: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """log(|det A| / |lambda|) + sum log q - sum log p in 50-digit arithmetic."""
    mp.mp.dps = 50
    a_mp, c_mp = mp.matrix(a.tolist()), mp.matrix(c.tolist())
    const = mp.log(abs(mp.det(a_mp)) / abs(sum(a_mp[0, j] for j in range(a_mp.cols))))
    out = []
    for row in p.tolist():
        log_p = [mp.log(v) for v in row]
        z = a_mp * mp.matrix(log_p) + c_mp
        log_norm = mp.log(sum(mp.exp(v) for v in z))
        out.append(float(const + sum(v - log_norm for v in z) - sum(log_p)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", range(3))
def test_closed_forms_stay_exact_near_the_boundary(name, seed):
    # Raw scale 3: outputs with entries down to 6e-21, where the autodiff ratio is off by up to
    # 8 (seed 1 of GeneralizedCalibration).
    f = build(name, 5, seed, 3.0)
    p = simplex_points(5, (8,), seed)
    a, c = matrix_and_shift(f)
    got = f.log_abs_det_jacobian(p, None).detach()
    assert (got - exact_log_ratio(p, a, c)).abs().max() <= 1e-10


@given(n=features, seed=seeds, log_scale=st.floats(0.0, 3.0), diag_scale=st.floats(0.0, 20.0))
def test_constraints_hold_for_large_raw_parameters(n, seed, log_scale, diag_scale):
    # Raw values up to ~1e3 (log-diagonal and log-temperature, which are exponentiated, up to
    # ~60): A 1 = lambda 1 with lambda = 1, 1^T A = 1^T, det A = exp(sum of the
    # log-diagonal) > 0, a > 0, and the outputs stay finite points of the simplex.
    scale = 10.0**log_scale
    g = build("GeneralizedCalibration", n, seed, scale)
    c = build("Calibration", n, seed, scale)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        g.weight.diagonal().copy_(diag_scale * torch.randn(n - 1, generator=gen).double())
        c.log_temperature.copy_(diag_scale * torch.randn((), generator=gen).double())
    a = g.matrix.detach()
    one = torch.ones(n, dtype=torch.float64)
    size = a.abs().max()
    torch.testing.assert_close(a @ one, one, atol=1e-12 * size, rtol=0)
    torch.testing.assert_close(one @ a, one, atol=1e-12 * size, rtol=0)
    # det A = det B (lambda = 1) with B = Q R: Q a rotation, R triangular, positive diagonal.
    q, r, logdet = qr_parametrized(g.weight.detach())
    torch.testing.assert_close(
        q.mT @ q, torch.eye(n - 1, dtype=torch.float64), atol=1e-10 * scale, rtol=0
    )
    assert torch.linalg.det(q) > 0 and torch.equal(r, r.triu())
    assert bool((r.diagonal() > 0).all()) and bool(torch.isfinite(r).all())
    # logdet = sum log r_ii + log|det Q|, and log|det Q| = tr(Q^T Q - I) / 2 to first order:
    # as small as Q's measured orthogonality defect (1.2e-12 for raw values ~800, where the
    # exponential scales down and squares back up), not zero
    defect = float((q.mT @ q - torch.eye(n - 1, dtype=torch.float64)).abs().max())
    gap = abs(float(logdet - r.diagonal().log().sum()))
    assert gap <= 1e-12 * (1 + abs(float(logdet))) + (n - 1) * defect
    assert float(c.temperature) > 0
    p = simplex_points(n, (16,), seed)
    for f in (g, c):
        with torch.no_grad():
            q, ladj = f.call_and_ladj(p)
        assert bool(torch.isfinite(q).all()) and bool(torch.isfinite(ladj).all())
        assert bool((q >= 0).all()) and (q.sum(-1) - 1).abs().max() <= 1e-12


def test_helmert_basis_is_orthonormal_complement_of_ones():
    for n in (2, 3, 7):
        for dtype in (torch.float32, torch.float64):
            v = helmert_basis(n, dtype)
            eps = torch.finfo(dtype).eps
            assert v.dtype == dtype and v.shape == (n, n - 1)
            torch.testing.assert_close(
                v.mT @ v, torch.eye(n - 1, dtype=dtype), atol=4 * eps, rtol=0
            )
            assert (v.sum(0)).abs().max() <= 4 * eps


# --- identities of reference/003 ----------------------------------------------------------


@given(name=names, n=features, seed=seeds, scale=scales)
def test_flows_match_the_reference_formulas(name, n, seed, scale):
    # Forward softmax(A log p + c), inverse f(.; A^-1, -A^-1 c), volume ratio
    # |det A| / |lambda| prod q / p, from the matrix A and shift c alone.
    f = build(name, n, seed, scale)
    a, c = matrix_and_shift(f)
    p = simplex_points(n, (16,), seed)
    torch.testing.assert_close(f(p), gcal(p, a, c), atol=1e-13, rtol=0)
    a_inv = torch.linalg.inv(a)
    torch.testing.assert_close(f.inv(p), gcal(p, a_inv, -a_inv @ c), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        f.log_abs_det_jacobian(p, None), gcal_log_ratio(p, a, c), atol=1e-11, rtol=0
    )
    if name == "Calibration":  # R_cal = a^(1-n) prod q / p
        t = float(f.temperature)
        q = f(p)
        expected = (1 - n) * math.log(t) + (q.log() - p.log()).sum(-1)
        torch.testing.assert_close(f.log_abs_det_jacobian(p, q), expected, atol=1e-12, rtol=0)


@given(n=st.integers(3, 5), seed=seeds, scale=scales)
def test_any_matrix_with_eigenvector_ones_gives_the_same_flow(n, seed, scale):
    # A' = A + 1 w^T has A' 1 = (1 + w.1) 1: the same map (softmax ignores multiples of 1) and
    # the same |det A'| / |lambda'|.
    f = build("GeneralizedCalibration", n, seed, scale)
    a, c = matrix_and_shift(f)
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a2 = a + torch.outer(torch.ones(n, dtype=torch.float64), w)
    p = simplex_points(n, (16,), seed)
    torch.testing.assert_close(gcal(p, a2, c), f(p), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        gcal_log_ratio(p, a2, c), f.log_abs_det_jacobian(p, None), atol=1e-10, rtol=0
    )


@given(n=features, seed=seeds, scale=scales)
def test_composition_of_generalized_calibrations(n, seed, scale):
    # f(.; A1, c1) o f(.; A2, c2) = f(.; A1 A2, c1 + A1 c2), and the log volume ratios add up to
    # that of the product.
    f1 = build("GeneralizedCalibration", n, seed, scale)
    f2 = build("GeneralizedCalibration", n, seed + 1, scale)
    (a1, c1), (a2, c2) = matrix_and_shift(f1), matrix_and_shift(f2)
    p = simplex_points(n, (16,), seed)
    u, l2 = f2.call_and_ladj(p)
    q, l1 = f1.call_and_ladj(u)
    torch.testing.assert_close(q, gcal(p, a1 @ a2, c1 + a1 @ c2), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        l1 + l2, gcal_log_ratio(p, a1 @ a2, c1 + a1 @ c2), atol=1e-10, rtol=0
    )
    # The calibration transforms are the subgroup A = I / a.
    g = build("Calibration", n, seed, scale)
    a3, c3 = matrix_and_shift(g)
    torch.testing.assert_close(f1(g(p)), gcal(p, a1 @ a3, c1 + a1 @ c3), atol=1e-12, rtol=0)


# --- the measure ---------------------------------------------------------------------------


@given(n=features, seed=seeds)
def test_lebesgue_measure_reproduces_dirichlet_and_hausdorff_differs_by_sqrt_n(n, seed):
    gen = torch.Generator().manual_seed(seed)
    alpha = 0.5 + 3 * torch.rand(n, generator=gen, dtype=torch.float64)
    base = Dirichlet(alpha)
    p = simplex_points(n, (16,), seed)
    leb = SimplexFlowDistribution(base, [], measure="lebesgue")
    haus = SimplexFlowDistribution(base, [])
    assert haus.measure == "hausdorff"
    torch.testing.assert_close(leb.log_prob(p), base.log_prob(p), atol=0, rtol=0)
    torch.testing.assert_close(haus.log_prob(p), base.log_prob(p) - 0.5 * math.log(n))
    assert simplex_hausdorff_log_factor(n) == 0.5 * math.log(n)
    # With flows the two measures still differ by the same constant, and a flow distribution
    # used as a base is read w.r.t. its own measure.
    flows = chain(n, seed, 0.5)
    leb, haus = (
        SimplexFlowDistribution(base, flows, measure=m) for m in ("lebesgue", "hausdorff")
    )
    torch.testing.assert_close(haus.log_prob(p), leb.log_prob(p) - 0.5 * math.log(n))
    nested = SimplexFlowDistribution(
        SimplexFlowDistribution(base, flows[:1]), flows[1:], "lebesgue"
    )
    torch.testing.assert_close(nested.log_prob(p), leb.log_prob(p))


def test_dirichlet_integrates_to_sqrt_n_against_hausdorff_measure():
    # Gauss-Legendre on the triangle (Duffy: p1 = u, p2 = (1 - u) v) for a smooth Dirichlet
    # density: w.r.t. dp1 dp2 it integrates to 1, w.r.t. the surface measure to sqrt 3.
    nodes, weights = np.polynomial.legendre.leggauss(64)
    x, w = torch.tensor((nodes + 1) / 2), torch.tensor(weights / 2)
    u, v = x[:, None], x[None, :]
    p = torch.stack([u.expand(64, 64), (1 - u) * v, (1 - u) * (1 - v)], -1)
    weight = w[:, None] * w[None, :] * (1 - u)
    base = Dirichlet(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))  # polynomial: exact
    lebesgue = float((base.log_prob(p).exp() * weight).sum())
    assert abs(lebesgue - 1) <= 1e-12
    d = SimplexFlowDistribution(base, [])
    hausdorff = float((d.log_prob(p).exp() * weight).sum()) * triangle_area_element()
    assert abs(hausdorff - 1) <= 1e-12
    assert abs(triangle_area_element() - math.sqrt(3)) <= 1e-15


# --- the quadrature, the uniform distribution, bad input -----------------------------------


def test_log_ratio_jacobian_used_by_the_quadrature():
    # |det d(q_1..q_(n-1)) / dz| = prod_i q_i for q = softmax(z, 0).
    for n in (2, 3, 4):
        z = torch.randn(5, n - 1, dtype=torch.float64)
        head = lambda t, k=n - 1: softmax_with_zero(t)[:k]  # noqa: E731
        jac = torch.func.vmap(torch.func.jacfwd(head))(z)
        q = softmax_with_zero(z)
        torch.testing.assert_close(torch.linalg.det(jac).abs().log(), q.log().sum(-1))


def test_uniform_dirichlet_is_the_uniform_distribution():
    # Dirichlet(1) is uniform: its Hausdorff density is 1 / volume (atlasdist.manifolds).
    for n in (2, 3, 5):
        d = SimplexFlowDistribution(Dirichlet(torch.ones(n, dtype=torch.float64)), [])
        p = simplex_points(n, (4,), n)
        expected = torch.full((4,), -log_simplex_volume(n), dtype=torch.float64)
        torch.testing.assert_close(d.log_prob(p), expected)
    assert math.isclose(log_simplex_volume(2), 0.5 * math.log(2))
    assert math.isclose(log_simplex_volume(3), math.log(math.sqrt(3) / 2))


def test_simplex_bad_options_raise():
    # Bad input of every flow and distribution: test_manifold_flows.py.
    base = Dirichlet(torch.full((3,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="measure must be one of"):
        SimplexFlowDistribution(base, [], measure="surface")
    with pytest.raises(ValueError, match="concentration must be > 0"):
        SimplexFlow(3, [], concentration=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Calibration(3, temperature=-1.0)


# --- measured errors ------------------------------------------------------------------------


def measure(draws: int = 300) -> None:
    """Maximum errors of the identities above over random draws in the tested ranges:
    ``python tests/test_simplex_flows.py [draws]``."""
    import random

    torch.set_num_threads(1)
    rng, worst = random.Random(0), Worst()
    record = worst.record

    for _ in range(draws):
        seed, n, scale = rng.randrange(2**20), rng.randint(2, 5), rng.uniform(0.05, 1.0)
        p = simplex_points(n, (16,), seed)
        with torch.no_grad():
            for name in CASES:
                f = build(name, n, seed, scale)
                q, ladj = f.call_and_ladj(p)
                a, c = matrix_and_shift(f)
                if len(worst) < 40 or rng.random() < 0.1:  # 50-digit arithmetic is slow
                    record(
                        f"{name}: |log R - exact|", (ladj - exact_log_ratio(p, a, c)).abs().max()
                    )
                g = build(name, n, seed, scale / 2)  # the autodiff range: raw scale <= 0.5
                ref = manifold_log_volume_ratio(g, p, simplex_projection, n - 1)
                record(
                    f"{name}: |log R - autodiff| (scale <= .5)",
                    (g.log_abs_det_jacobian(p, None) - ref).abs().max(),
                )
                err = torch.maximum((f.inv(q) - p).abs(), (f(f.inv(p)) - p).abs())
                record(f"{name}: round trip, abs", err.max())
                record(f"{name}: round trip, rel", (err / p).max())
                record(
                    f"{name}: |log R - reference formula|",
                    (ladj - gcal_log_ratio(p, a, c)).abs().max(),
                )
            f1 = build("GeneralizedCalibration", n, seed, scale)
            f2 = build("GeneralizedCalibration", n, seed + 1, scale)
            (a1, c1), (a2, c2) = matrix_and_shift(f1), matrix_and_shift(f2)
            u, l2 = f2.call_and_ladj(p)
            q, l1 = f1.call_and_ladj(u)
            record(
                "f(A1,c1) o f(A2,c2) vs f(A1 A2, c1 + A1 c2)",
                (q - gcal(p, a1 @ a2, c1 + a1 @ c2)).abs().max(),
            )
            ratio = gcal_log_ratio(p, a1 @ a2, c1 + a1 @ c2)
            record("  log R of the composition vs of the product", (l1 + l2 - ratio).abs().max())
            base = Dirichlet(1 + 3 * torch.rand(n, dtype=torch.float64))
            flows = chain(n, seed, scale)
            leb = SimplexFlowDistribution(base, flows, "lebesgue").log_prob(p)
            haus = SimplexFlowDistribution(base, flows).log_prob(p)
            record(
                "|(log p_Leb - log p_H) - log(n) / 2|",
                (leb - haus - 0.5 * math.log(n)).abs().max(),
            )
            closed = chain(n, seed, rng.uniform(0.05, 0.5))
            generic = [
                ManifoldTransform(f, simplex_projection, n - 1, n, inverse=f.inv) for f in closed
            ]
            x, low = p, 1.0
            for f in reversed(closed):
                x = f.inv(x)
                low = min(low, float(x.min()))
            record(
                "ManifoldTransform vs closed forms (scale <= 0.5)",
                (
                    SimplexFlowDistribution(base, closed).log_prob(p)
                    - SimplexFlowDistribution(base, generic).log_prob(p)
                )
                .abs()
                .max(),
            )
            record("  -log10(smallest intermediate entry)", -math.log10(low))
    for _ in range(draws):
        seed, n = rng.randrange(2**20), rng.choice([2, 3])
        d = make_distribution(n, seed, rng.uniform(0.05, 0.7), validate_args=False)
        record(f"|int_Delta^{n - 1} p_H dH - 1|", abs(SIMPLEX.integral(d.log_prob, n) - 1))
    worst.report(50)
    print(f"({draws} draws each; n in 2..5, raw scale <= 1; quadrature range as in the tests)")
    report_goodness_of_fit(SIMPLEX)


if __name__ == "__main__":
    import sys

    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
