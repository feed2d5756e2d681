"""What the tests of the flows on known manifolds share: one registry entry per manifold
(``SPHERE``, ``SIMPLEX`` in ``MANIFOLDS``: its flows, points, distributions, quadrature rule,
goodness-of-fit tests and bad inputs), randomization, and the quadrature rules and
goodness-of-fit statistics themselves. The property tests of ``test_manifold_flows.py`` loop
over the registry: a new manifold is tested by adding one entry."""

from __future__ import annotations

import math

import goftests
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import strategies as st
from pyro.distributions import Dirichlet, ProjectedNormal
from scipy.spatial import cKDTree

from atlasdist._checks import no_validation
from atlasdist.distributions import (
    SimplexFlow,
    SimplexFlowDistribution,
    SphereFlow,
    SphereFlowDistribution,
    UniformSphere,
)
from atlasdist.manifolds import (
    log_simplex_volume,
    log_sphere_area,
    simplex_projection,
    sphere_projection,
    unit_simplex,
    unit_sphere,
)
from atlasdist.transforms.simplex import Calibration, GeneralizedCalibration
from atlasdist.transforms.sphere import NormalizedAffine, NormalizedLinear, NormalizedTranslation

EPS = torch.finfo(torch.float64).eps
features = st.integers(2, 5)
seeds = st.integers(0, 2**20)
scales = st.floats(0.05, 1.0)  # raw parameters ~ N(0, scale^2)
batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@pytest.fixture(autouse=True)
def single_thread():
    """Small tensors: intra-op threads buy nothing here and thrash on 2 shared cores (a 51k-point
    quadrature took 1.4 s with 2 threads next to another process, 55 ms with 1). Import it into
    a test module to use it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(f, seed: int, scale: float):
    """Every parameter of ``f`` drawn from N(0, scale^2), reproducibly from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return f


# --- quadrature ---------------------------------------------------------------------------


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


def triangle_area_element() -> float:
    """|d e / d p1 x d e / d p2| for e(p1, p2) = (p1, p2, 1 - p1 - p2): the Hausdorff area of
    the parallelogram spanned by the coordinate steps (computed, not assumed: sqrt 3)."""
    e = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    return float(torch.linalg.cross(e[0], e[1]).norm())


def softmax_with_zero(z):
    """The inverse of the additive log-ratio z_i = log(q_i / q_n)."""
    return torch.softmax(torch.cat([z, torch.zeros_like(z[..., :1])], -1), -1)


def alr_integral(log_prob, n, t_max=6.5, step=0.02):
    """int p dH over Delta^(n-1), n = 2 or 3, in additive log-ratio coordinates z in R^(n-1):
    dH = |de/dq| |det dq/dz| dz with |det dq/dz| = prod_i q_i and |de/dq| = sqrt(n) (the
    Hausdorff element of the coordinates q_1..q_(n-1); both computed in the tests).
    The integrand is smooth and decays exponentially in z whatever the density does at the
    boundary of the simplex; the substitution z = sinh(t) makes the decay double-exponential,
    so the trapezoid rule in t over |t| <= 6.5 (|z| <= 332: q stays a normal float) converges
    spectrally. Far out, the
    inverse flows underflow to the boundary (NaN): such points count as 0, after checking
    that they lie where the integrand is negligible."""
    t = torch.arange(-t_max, t_max + step / 2, step, dtype=torch.float64)
    z1, w1 = t.sinh(), t.cosh() * step
    if n == 2:
        z, w = z1[:, None], w1
    else:
        z = torch.stack(torch.meshgrid(z1, z1, indexing="ij"), -1)
        w = w1[:, None] * w1[None, :]
    q = softmax_with_zero(z)
    with torch.no_grad(), no_validation():
        integrand = (log_prob(q) + q.log().sum(-1)).exp()
    lost = ~torch.isfinite(integrand)
    if bool(lost.any()):
        # The lost points lie in the far tail: the other points up to ten orders of magnitude
        # less close to the boundary than the least extreme lost point have a negligible
        # integrand (it decays exponentially in z, i.e. as a power of the smallest entry).
        q_min = q.min(-1).values
        band = ~lost & (q_min <= 1e10 * q_min[lost].max())
        assert bool(band.any()) and float(integrand[band].max()) < 1e-10
    element = math.sqrt(2) if n == 2 else triangle_area_element()
    return float((integrand.masked_fill(lost, 0) * w).sum()) * element


# --- goodness of fit ----------------------------------------------------------------------


def exp_goodness_of_fit(exp_samples) -> float:
    """goftests.exp_goodness_of_fit (Pearson's test of exp(-x) on N^(1/3) equal bins) with
    scipy's chi^2 tail: goftests 0.3.0's own chi2sf sums 100 series terms and returns ~1 for
    statistics between ~200 and ~2000, so grossly wrong densities would pass."""
    u = np.exp(-np.asarray(exp_samples, dtype=float))
    counts = np.histogram(u, bins=int(round(len(u) ** (1 / 3))), range=(0.0, 1.0))[0]
    return float(scipy.stats.chisquare(counts).pvalue)


def nearest_neighbour_gof(points: torch.Tensor, log_prob: torch.Tensor, dim: int) -> float:
    """goftests.vector_density_goodness_of_fit with the intrinsic dimension: N p(x) vol_dim(r)
    is Exp(1) distributed (r the distance to the nearest other sample, measured in R^n) when p
    is the density w.r.t. dim-dimensional volume: the surface measure of the sphere (on the
    unit 2-sphere the chord disc has the exact cap area), the Hausdorff measure of the simplex
    (distances on its plane)."""
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


def segment_ks(q1: np.ndarray, log_prob, half_width=40.0, points=16384) -> float:
    """KS test of q_1 on Delta^1 against the CDF of a density w.r.t. dq_1 (trapezoid rule in
    z = log(q_1 / q_2), dq_1 = q_1 q_2 dz)."""
    z = torch.linspace(-half_width, half_width, points + 1, dtype=torch.float64)
    q = softmax_with_zero(z[:, None])
    with torch.no_grad():
        g = (log_prob(q) + q.log().sum(-1)).exp()
    cdf = torch.cat([g.new_zeros(1), (g[1:] + g[:-1]).cumsum(0) * half_width / points])
    t = np.log(q1) - np.log1p(-q1)
    return float(scipy.stats.kstest(t, lambda s: np.interp(s, z.numpy(), cdf.numpy())).pvalue)


# --- measured errors (the test files run as scripts) --------------------------------------


class Worst(dict):
    """The largest value recorded under each label."""

    def record(self, label: str, value) -> None:
        self[label] = max(self.get(label, 0.0), float(value))

    def report(self, width: int) -> None:
        for label, value in self.items():
            print(f"{label:{width}s} {value:.3g}")


def report_goodness_of_fit(m) -> None:
    """The nearest-neighbour p-values of the goodness-of-fit cases of manifold ``m``, for its
    density and for the controls the tests must reject."""
    for n, seed, scale, options in m.gof_cases:
        torch.manual_seed(seed)
        d = m.make_distribution(n, seed, scale, **options)
        with torch.no_grad():
            y = d.sample((4000 if n < 4 else 6000,))
            p_values = {
                label: nearest_neighbour_gof(y, log_prob(y), n - 1)
                for label, log_prob in {
                    "p": d.log_prob,
                    **m.gof_controls(d, n, seed, scale),
                }.items()
            }
        print(
            f"GOF {(n, seed, scale, options)}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in p_values.items())
        )


# --- the registry -------------------------------------------------------------------------


class Manifold:
    """A known manifold with its closed-form flows: what the shared property tests need.

    Each entry sets ``name``, ``flows`` (one line per closed-form flow), ``projection``,
    ``constraint``, ``log_volume``, ``distribution`` (the flow distribution class),
    ``autodiff_scales`` (raw-parameter scales up to which the autodiff volume ratio is accurate
    to ~1e-11), ``float32_atol`` and ``off_points`` (3-feature inputs off the manifold that
    project onto it), and implements ``points(n, batch_shape, seed, dtype)``, ``base(n)`` (a
    float64 base), ``batched_base(n, batch_shape, gen)``, ``module(n, transforms, **options)``
    (the lazy module, with a learnable base where there is one),
    ``make_distribution(n, seed, scale, **options)`` (all flows, float64),
    ``integral(log_prob, n)`` (n = 2, 3, w.r.t. the library's measure), ``normalizations(n)``
    ((options of make_distribution, integral of its density) pairs),
    ``round_trip_tolerance(f)``, ``assert_on_manifold(y, tol)``, ``gof_cases`` ((n, seed, raw
    scale, options of make_distribution) rows: moderate densities, for which the
    nearest-neighbour statistic is calibrated, as it assumes p nearly constant over each
    nearest-neighbour ball), ``bad_inputs()`` (("f" or
    "inv", input, error message) rows for a flow on 3 features), ``bad_values()`` ((value,
    error message) rows for log_prob), ``gof_controls(d, n, seed, scale)`` (wrong log-densities
    the goodness-of-fit tests must reject, besides a flipped volume ratio) and
    ``gof_tests(points, log_prob_values, log_prob, n, seed)`` (p-values).
    """

    name: str
    flows: dict[str, type]
    autodiff_scales = scales
    float32_atol = 1e-4

    def __repr__(self) -> str:
        return self.name

    @property
    def names(self) -> list[str]:
        return sorted(self.flows)

    def build(self, name: str, n: int, seed: int, scale: float, dtype=torch.float64):
        return randomize(self.flows[name](n).double(), seed, scale).to(dtype)

    def chain(self, n: int, seed: int, scale: float) -> list:
        return [self.build(name, n, seed + i, scale) for i, name in enumerate(self.names)]


class Sphere(Manifold):
    name = "sphere"
    flows = {
        "NormalizedTranslation": NormalizedTranslation,
        "NormalizedLinear": NormalizedLinear,
        "NormalizedAffine": NormalizedAffine,
    }
    projection = staticmethod(sphere_projection)
    constraint = unit_sphere
    log_volume = staticmethod(log_sphere_area)
    distribution = SphereFlowDistribution
    off_points = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.6, 0.81]], dtype=torch.float64)
    gof_cases = [
        (2, 0, 0.7, {"base": "uniform"}),
        (2, 1, 0.7, {"base": "projected_normal"}),
        (3, 1, 0.5, {"base": "uniform"}),
        (3, 1, 0.5, {"base": "projected_normal"}),
        (4, 1, 0.5, {"base": "uniform"}),
    ]

    def points(self, n, batch_shape, seed, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed + 1)
        z = torch.randn(*batch_shape, n, generator=gen, dtype=torch.float64)
        return sphere_projection(z).to(dtype)

    def base(self, n):
        return UniformSphere(n, dtype=torch.float64)

    def batched_base(self, n, batch_shape, gen):
        return ProjectedNormal(torch.randn(*batch_shape, n, generator=gen, dtype=torch.float64))

    def module(self, n, transforms, **options):
        options.setdefault("base", "projected_normal" if n <= 4 else "uniform")
        return SphereFlow(n, transforms, **options)

    def make_distribution(self, n, seed, scale, base="uniform"):
        flows = self.chain(n, seed, scale)
        if base == "uniform":
            return SphereFlowDistribution(UniformSphere(n, dtype=torch.float64), flows)
        gen = torch.Generator().manual_seed(seed + 7)
        concentration = 2 * scale * torch.randn(n, generator=gen, dtype=torch.float64)
        return SphereFlowDistribution(ProjectedNormal(concentration), flows)

    def integral(self, log_prob, n):
        return circle_integral(log_prob) if n == 2 else sphere2_integral(log_prob)

    def normalizations(self, n):
        return [({"base": "uniform"}, 1.0), ({"base": "projected_normal"}, 1.0)]

    def round_trip_tolerance(self, f):
        # Backward-stable steps: the error is a small multiple of cond * eps (measured: below 2
        # in 3000 draws; run test_sphere_flows.py as a script).
        return {"atol": 64 * EPS * conditioning(f), "rtol": 0}

    def assert_on_manifold(self, y, tol):
        assert (y.norm(dim=-1) - 1).abs().max() <= tol

    def bad_inputs(self):
        return [
            ("f", torch.ones(2, 4, dtype=torch.float64), r"\(\*, 3\)"),
            ("inv", torch.ones(2, 2, dtype=torch.float64), r"\(\*, 3\)"),
            ("f", torch.tensor([[float("nan"), 0.0, 1.0]], dtype=torch.float64), "non-finite"),
            ("f", self.off_points, r"1 input point\(s\) off the unit sphere S\^2: .* 0\.00"),
            ("inv", self.off_points, "off the unit sphere"),
        ]

    def bad_values(self):
        return [
            (
                torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64),
                r"off the unit sphere .* up to 0\.5 ",
            ),
            (torch.zeros(2, dtype=torch.float64), r"\(\*, 3\)"),
            (torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64), "non-finite"),
        ]

    def gof_controls(self, d, n, seed, scale):
        return {"no volume ratios": d.base_dist.log_prob}

    def gof_tests(self, points, log_prob_values, log_prob, n, seed):
        if n == 2:
            theta = torch.atan2(points[:, 1], points[:, 0]).numpy()
            return [spacing_gof(theta, log_prob_values), circle_ks(theta, log_prob)]
        if n == 3:
            gen = torch.Generator().manual_seed(seed)
            u = sphere_projection(torch.randn(3, generator=gen, dtype=torch.float64))
            return [
                nearest_neighbour_gof(points, log_prob_values, 2),
                sphere2_projection_ks(points, log_prob, u),
            ]
        return [nearest_neighbour_gof(points, log_prob_values, n - 1)]


def conditioning(f) -> float:
    """Error amplification of a sphere flow's inverse: cond(M) for the matrix, 1 / (1 - |b|)
    for the shift (the inverse of a translation by b near the unit sphere is ill-conditioned)."""
    with torch.no_grad():
        cond = float(torch.linalg.cond(f.matrix)) if hasattr(f, "matrix") else 1.0
        b = f.inner_shift if hasattr(f, "inner_shift") else getattr(f, "shift", None)
        return cond / (1 - float(b.norm())) if hasattr(f, "raw") else cond


class Simplex(Manifold):
    name = "simplex"
    flows = {"Calibration": Calibration, "GeneralizedCalibration": GeneralizedCalibration}
    projection = staticmethod(simplex_projection)
    constraint = unit_simplex
    log_volume = staticmethod(log_simplex_volume)
    distribution = SimplexFlowDistribution
    # Up to 0.5 the outputs keep entries above ~1e-7 and the autodiff ratio is accurate to
    # ~1e-11; nearer the boundary it is not (2e-5 off at an entry 2e-12, where the closed form
    # still agrees with 50-digit arithmetic to 1e-14: test_closed_forms_stay_exact_near_the_
    # boundary).
    autodiff_scales = st.floats(0.05, 0.5)
    float32_atol = 1e-5
    off_points = torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.6]], dtype=torch.float64)
    gof_cases = [
        (2, 0, 0.7, {}),
        (2, 1, 0.5, {}),
        (3, 0, 0.5, {}),
        (3, 1, 0.7, {}),
        (4, 2, 0.5, {}),
    ]

    def points(self, n, batch_shape, seed, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed + 1)
        logits = torch.randn(*batch_shape, n, generator=gen, dtype=torch.float64)
        return torch.softmax(logits, -1).to(dtype)

    def base(self, n):
        return Dirichlet(torch.full((n,), 2.0, dtype=torch.float64))

    def batched_base(self, n, batch_shape, gen):
        return Dirichlet(1 + torch.rand(*batch_shape, n, generator=gen, dtype=torch.float64))

    def module(self, n, transforms, **options):
        return SimplexFlow(n, transforms, **options)

    def make_distribution(self, n, seed, scale, measure="hausdorff", validate_args=None):
        gen = torch.Generator().manual_seed(seed + 7)
        alpha = 1 + 3 * torch.rand(n, generator=gen, dtype=torch.float64)
        base = Dirichlet(alpha, validate_args=validate_args)
        return SimplexFlowDistribution(base, self.chain(n, seed, scale), measure, validate_args)

    def integral(self, log_prob, n):
        return alr_integral(log_prob, n)

    def normalizations(self, n):
        # w.r.t. the Hausdorff measure; a Lebesgue density integrates to sqrt(n) against it.
        return [
            ({"validate_args": False}, 1.0),
            ({"measure": "lebesgue", "validate_args": False}, math.sqrt(n)),
        ]

    def round_trip_tolerance(self, f):
        return {"atol": 1e-12, "rtol": 1e-10}

    def assert_on_manifold(self, y, tol):
        assert (y.sum(-1) - 1).abs().max() <= tol and bool((y > 0).all())

    def bad_inputs(self):
        return [
            ("f", torch.full((2, 4), 0.25, dtype=torch.float64), r"\(\*, 3\)"),
            ("inv", torch.full((2, 2), 0.5, dtype=torch.float64), r"\(\*, 3\)"),
            ("f", torch.tensor([[float("nan"), 0.5, 0.5]], dtype=torch.float64), "non-finite"),
            ("f", self.off_points, r"1 input point\(s\) off the simplex: .* up to 0\.1 "),
            ("inv", self.off_points, "off the simplex"),
            (
                "f",
                torch.tensor([[0.0, 0.4, 0.6]], dtype=torch.float64),
                r"open simplex .* smallest entry 0",
            ),
            ("f", torch.tensor([[-0.1, 0.5, 0.6]], dtype=torch.float64), "smallest entry -0.1"),
        ]

    def bad_values(self):
        return [
            (
                torch.tensor([0.2, 0.3, 1.0], dtype=torch.float64),
                r"off the simplex: \|sum\(p\) - 1\| up to 0\.5 ",
            ),
            (
                torch.tensor([-0.2, 0.3, 0.9], dtype=torch.float64),
                r"outside the simplex \(entries >= 0\)",
            ),
            (torch.full((2,), 0.5, dtype=torch.float64), r"\(\*, 3\)"),
            (torch.tensor([float("nan"), 0.5, 0.5], dtype=torch.float64), "non-finite"),
        ]

    def gof_controls(self, d, n, seed, scale):
        leb = self.make_distribution(n, seed, scale, "lebesgue")
        return {
            # The measure mix-up: a Lebesgue density read as a Hausdorff one.
            "wrong measure": leb.log_prob,
            "no volume ratios": lambda q: d.base_dist.log_prob(q) - 0.5 * math.log(n),
        }

    def gof_tests(self, points, log_prob_values, log_prob, n, seed):
        tests = [nearest_neighbour_gof(points, log_prob_values, n - 1)]
        if n == 2:  # w.r.t. dq_1: the Hausdorff density times sqrt 2
            lebesgue_log_prob = lambda t, f=log_prob: f(t) + 0.5 * math.log(2)  # noqa: E731
            tests.append(segment_ks(points[:, 0].numpy(), lebesgue_log_prob))
        return tests


SPHERE, SIMPLEX = Sphere(), Simplex()
MANIFOLDS = [SPHERE, SIMPLEX]
