"""Free-form injective flows (reference/002): the exact density on the decoder image, the
decoder-as-chart adapter, and the FIF surrogate whose gradient is the log volume change's."""

import doctest
import importlib.util
import math
import sys
from functools import partial
from pathlib import Path

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import atlasdist.distributions.free_form as free_form_module
import atlasdist.training.fif as fif_module
from atlasdist import AtlasFlow, ChartMembership
from atlasdist.datasets import sinusoid
from atlasdist.distributions.free_form import (
    FreeFormEmbedding,
    FreeFormInjectiveDistribution,
    FreeFormInjectiveFlow,
    decoder_log_volume,
)
from atlasdist.geometry import batched_jacobian, jacobian, log_volume_ratio
from atlasdist.training import fit
from atlasdist.training.fif import (
    fif_loss,
    fif_loss_terms,
    hutchinson_vectors,
    volume_change_surrogate,
)

seeds = st.integers(0, 2**20)
TOL = 1e-3  # normalization by quadrature


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: intra-op threads only add overhead (and stall badly when the
    cores are shared), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models -------------------------------------------------------------------------------


def mlp(n_in, n_out, hidden=16, seed=0, dtype=torch.float64, scale=1.0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def mlp_flow(d, D, seed, dtype=torch.float64, **kwargs):
    return FreeFormInjectiveFlow(
        mlp(D, d, seed=seed, dtype=dtype), mlp(d, D, seed=seed + 1, dtype=dtype), **kwargs
    )


class Encoder(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, x):
        return self.core.encode(x)


class Decoder(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, z):
        return self.core.decode(z)


def paired(core, **kwargs):
    """A flow whose encoder and decoder share the parameters of ``core``."""
    return FreeFormInjectiveFlow(Encoder(core), Decoder(core), core.d, core.D, **kwargs)


class Circle(nn.Module):
    r"""Inverse stereographic chart of the circle of radius r and centre c, latent affine:
    g(t) = c + r sigma^{-1}(a t + b); the encoder is its exact left inverse (stereographic
    projection from the pole c + r e_2)."""

    d, D = 1, 2

    def __init__(self, radius=1.0, centre=(0.0, 0.0), a=1.0, b=0.0):
        super().__init__()
        self.log_r = nn.Parameter(torch.tensor(math.log(radius), dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(centre, dtype=torch.float64))
        self.log_a = nn.Parameter(torch.tensor(math.log(a), dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def decode(self, t):
        u = self.log_a.exp() * t[..., 0] + self.b
        y = torch.stack([2 * u, u * u - 1], -1) / (1 + u * u).unsqueeze(-1)
        return self.c + self.log_r.exp() * y

    def encode(self, x):
        y = (x - self.c) / self.log_r.exp()
        u = y[..., 0] / (1 - y[..., 1])
        return ((u - self.b) / self.log_a.exp()).unsqueeze(-1)


class SineGraph(nn.Module):
    """The sinusoid graph x2 = sin(2 x1) with x1 = a t + b; encoder x -> (x1 - b) / a."""

    d, D = 1, 2

    def __init__(self, a=1.0, b=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def decode(self, t):
        u = self.a * t[..., 0] + self.b
        return torch.stack([u, (2 * u).sin()], -1)

    def encode(self, x):
        return ((x[..., 0] - self.b) / self.a).unsqueeze(-1)


class FlatPair(nn.Module):
    r"""g(z) = b + Q (A_2 sinh(A_1 z + c_1) + c_2), Q with orthonormal columns, and
    f(x) = A_1^{-1}(asinh(A_2^{-1}(Q^T (x - b) - c_2)) - c_1): nonlinear, and f is the exact
    pseudo-inverse of g at every point of R^D (J_f(x) = J_g(f(x))^+), so the FIF surrogate's
    expected gradient is exactly the log volume change's."""

    def __init__(self, d, D, seed, scale=0.3):
        super().__init__()
        self.d, self.D = d, D
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape):
            return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

        self.frame = nn.Parameter(torch.randn(D, d, generator=gen, dtype=torch.float64))
        self.a1 = nn.Parameter(torch.eye(d, dtype=torch.float64) + draw(d, d))
        self.a2 = nn.Parameter(torch.eye(d, dtype=torch.float64) + draw(d, d))
        self.c1, self.c2, self.shift = (nn.Parameter(draw(n)) for n in (d, d, D))

    def q(self):
        return torch.linalg.qr(self.frame).Q

    def decode(self, z):
        h = torch.sinh(z @ self.a1.T + self.c1) @ self.a2.T + self.c2
        return self.shift + h @ self.q().T

    def encode(self, x):
        y = (x - self.shift) @ self.q() - self.c2
        y = torch.asinh(y @ torch.linalg.inv(self.a2).T) - self.c1
        return y @ torch.linalg.inv(self.a1).T


# --- the exact volume term ----------------------------------------------------------------


def reference_log_volume(decoder, z):
    """1/2 log det(J^T J) with J from torch.autograd.functional.jacobian, point by point."""
    out = []
    for zi in z:
        jac = torch.autograd.functional.jacobian(decoder, zi)
        out.append(0.5 * torch.linalg.slogdet(jac.T @ jac).logabsdet)
    return torch.stack(out)


@given(seed=seeds, d=st.integers(1, 3), extra=st.integers(1, 2))
def test_exact_log_volume_matches_autodiff_references(seed, d, extra):
    D = d + extra
    flow = mlp_flow(d, D, seed)
    p = flow.flow()
    z = torch.randn(16, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ours = p.log_volume(z)
    assert ours.shape == (16,)
    assert (ours - log_volume_ratio(flow.decoder, z)).abs().max() <= 1e-8
    assert (ours - reference_log_volume(flow.decoder, z)).abs().max() <= 1e-8
    # The chart adapter's volume term is the same quantity.
    emb = FreeFormEmbedding(flow.encoder, flow.decoder, d, D)
    assert (emb.log_abs_det_jacobian(z, emb(z)) - ours).abs().max() <= 1e-12
    # Chunking does not change it.
    assert (decoder_log_volume(flow.decoder, z, chunk_size=3) - ours).abs().max() <= 1e-12


@given(a=st.floats(0.5, 2.0), b=st.floats(-1.0, 1.0))
def test_exact_log_volume_of_analytic_decoders(a, b):
    t = torch.linspace(-3, 3, 25, dtype=torch.float64).unsqueeze(-1)
    graph = paired(SineGraph(a, b)).flow()
    u = a * t[:, 0] + b
    expected = math.log(a) + 0.5 * torch.log1p(4 * torch.cos(2 * u) ** 2)
    assert (graph.log_volume(t) - expected).abs().max() <= 1e-12
    circle = paired(Circle(1.7, (0.0, 0.0), a, b)).flow()
    expected = math.log(1.7 * a * 2) - torch.log1p(u * u)
    assert (circle.log_volume(t) - expected).abs().max() <= 1e-12


def test_exact_log_volume_is_differentiable_in_the_decoder_parameters():
    flow = mlp_flow(2, 4, 0)
    z = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    flow.flow().log_volume(z).sum().backward()
    # The volume term does not depend on the output bias; every other parameter gets a
    # finite, nonzero gradient.
    assert flow.decoder[2].bias.grad is None
    grads = [flow.decoder[0].weight.grad, flow.decoder[0].bias.grad, flow.decoder[2].weight.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    # Against finite differences in one weight.
    w = flow.decoder[2].weight
    eps, i = 1e-6, (1, 3)
    with torch.no_grad():
        w[i] += eps
        up = flow.flow().log_volume(z).sum()
        w[i] -= 2 * eps
        down = flow.flow().log_volume(z).sum()
        w[i] += eps
    assert abs(float((up - down) / (2 * eps)) - float(w.grad[i])) <= 1e-6


# --- normalization by quadrature ----------------------------------------------------------


def circle_points(n, centre, radius):
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * math.pi / n)
    x = torch.stack([theta.cos(), theta.sin()], -1) * radius + torch.tensor(
        centre, dtype=torch.float64
    )
    return x, torch.full((n,), 2 * math.pi * radius / n, dtype=torch.float64)


def integrate(p, x, w, chunk=20000):
    with torch.no_grad():
        dens = torch.cat([p.log_prob(c).exp() for c in x.split(chunk)])
    return float((dens * w).sum())


@given(
    radius=st.floats(0.3, 3.0),
    cx=st.floats(-2.0, 2.0),
    cy=st.floats(-2.0, 2.0),
    a=st.floats(0.3, 3.0),
    b=st.floats(-2.0, 2.0),
)
def test_density_on_a_circle_integrates_to_one(radius, cx, cy, a, b):
    """Arc-length quadrature in the angle (independent of the decoder's parametrization)."""
    p = paired(Circle(radius, (cx, cy), a, b)).flow(validate_args=True)
    x, w = circle_points(20000, (cx, cy), radius)
    assert abs(integrate(p, x, w) - 1) <= TOL


@given(a=st.floats(0.3, 2.0), b=st.floats(-2.0, 2.0))
def test_density_on_the_sinusoid_graph_integrates_to_one(a, b):
    """Quadrature in x1 with the analytic arc-length element sqrt(1 + 4 cos^2(2 x1))."""
    p = paired(SineGraph(a, b)).flow(validate_args=True)
    n, lo, hi = 40000, b - 9 * a, b + 9 * a
    x1 = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * ((hi - lo) / n)
    x = torch.stack([x1, (2 * x1).sin()], -1)
    w = torch.sqrt(1 + 4 * torch.cos(2 * x1) ** 2) * ((hi - lo) / n)
    assert abs(integrate(p, x, w) - 1) <= TOL


def plane_grid(n, half):
    w = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half / n) - half
    # u = sinh(w) covers the heavy tails of sinh-distorted densities; du = cosh(w) dw.
    return torch.sinh(w), torch.cosh(w) * (2 * half / n)


@settings(max_examples=4)
@given(seed=seeds)
def test_density_on_a_nonlinear_flat_pair_integrates_to_one(seed):
    """d = 2 in R^3: Lebesgue measure on the plane in orthonormal coordinates u, integrated
    in the coordinates z of u = A_2 sinh(A_1 z + c_1) + c_2 (du = |det A_2| prod cosh(y_i)
    |det A_1| dz, computed here by hand): the integrand is then smooth, where a grid in u
    (sinh-spaced per axis) missed by up to 2e-3 on some draws (sharp ridges between its
    points; a finer grid was not always better)."""
    core = FlatPair(2, 3, seed)
    p = paired(core).flow(validate_args=True)
    n, half = 400, 8.0
    z1 = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half / n) - half
    with torch.no_grad():
        z = torch.cartesian_prod(z1, z1)
        y = z @ core.a1.T + core.c1
        u = torch.sinh(y) @ core.a2.T + core.c2
        x = core.shift + u @ core.q().T
        jacobian = torch.linalg.det(core.a2).abs() * torch.linalg.det(core.a1).abs()
        weights = jacobian * torch.cosh(y).prod(-1) * (2 * half / n) ** 2
    # a Gaussian in z under the midpoint rule: exact to ~1e-15 (measured on 41 draws), so a
    # volume term off by anything above round-off shows
    assert abs(integrate(p, x, weights) - 1) <= 1e-9


@settings(max_examples=4)
@given(seed=seeds, sigma=st.floats(0.05, 0.5))
def test_thickened_density_of_a_flat_pair_integrates_to_one_over_the_ambient_space(seed, sigma):
    """For a flat image and an orthogonal-projection encoder, p_sigma is exactly normalized
    on R^D (the D - d Gaussian factor's constant included)."""
    core = FlatPair(1, 2, seed)
    p = paired(core).flow(noise_scale=sigma)
    u, wu = plane_grid(2000, 9.0)
    n_r = 200
    r = ((torch.arange(n_r, dtype=torch.float64) + 0.5) / n_r * 2 - 1) * 8 * sigma
    wr = torch.full((n_r,), 16 * sigma / n_r, dtype=torch.float64)
    with torch.no_grad():
        q = torch.linalg.qr(core.frame, mode="complete").Q
        tangent, normal = q[:, :1], q[:, 1:]
        pts = core.shift + u[:, None, None] * tangent.T + r[None, :, None] * normal.T
        weights = wu[:, None] * wr[None, :]
    assert abs(integrate(p, pts.reshape(-1, 2), weights.reshape(-1)) - 1) <= TOL


# --- samples, shapes, dtypes, gradients, errors -------------------------------------------


@given(seed=seeds, radius=st.floats(0.3, 3.0), a=st.floats(0.3, 3.0))
def test_samples_lie_on_the_image_and_have_finite_log_prob(seed, radius, a):
    torch.manual_seed(seed)
    p = paired(Circle(radius, (0.5, -0.3), a, 0.2)).flow(validate_args=True)
    x = p.sample((256,))
    assert (
        (x - torch.tensor([0.5, -0.3], dtype=torch.float64)).norm(dim=-1) - radius
    ).abs().max() < 1e-12
    assert bool(p.support.check(x).all())
    assert torch.isfinite(p.log_prob(x)).all()
    graph = paired(SineGraph(a, 0.1)).flow(validate_args=True)
    x = graph.sample((256,))
    assert (x[:, 1] - (2 * x[:, 0]).sin()).abs().max() < 1e-12
    assert torch.isfinite(graph.log_prob(x)).all()


def test_samples_and_log_prob_agree_in_distribution():
    """Samples of the circle model against its density: a chi-square test on angle bins
    with probabilities from quadrature of log_prob."""
    from scipy import stats

    torch.manual_seed(0)
    p = paired(Circle(1.0, (0.0, 0.0), 0.7, 0.4)).flow()
    x = p.sample((20000,))
    theta = torch.atan2(x[:, 1], x[:, 0])
    bins = 24
    counts = torch.histc(theta, bins, -math.pi, math.pi)
    xq, wq = circle_points(24000, (0.0, 0.0), 1.0)
    tq = torch.atan2(xq[:, 1], xq[:, 0])
    with torch.no_grad():
        mass = p.log_prob(xq).exp() * wq
    probs = torch.stack(
        [
            mass[
                (tq >= -math.pi + k * 2 * math.pi / bins)
                & (tq < -math.pi + (k + 1) * 2 * math.pi / bins)
            ].sum()
            for k in range(bins)
        ]
    )
    probs = probs / probs.sum()
    _, pvalue = stats.chisquare(counts.numpy(), (probs * counts.sum()).numpy())
    assert pvalue > 1e-3
    # A wrong density (the volume term dropped) is rejected by the same test.
    with torch.no_grad():
        wrong = (p.log_prob(xq) + p.log_volume(p.encode(xq))).exp() * wq
    wrong = torch.stack(
        [
            wrong[
                (tq >= -math.pi + k * 2 * math.pi / bins)
                & (tq < -math.pi + (k + 1) * 2 * math.pi / bins)
            ].sum()
            for k in range(bins)
        ]
    )
    wrong = wrong / wrong.sum()
    assert stats.chisquare(counts.numpy(), (wrong * counts.sum()).numpy())[1] < 1e-6


@given(
    seed=seeds,
    sample_shape=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    batch_shape=st.lists(st.integers(1, 3), max_size=2).map(tuple),
)
def test_shapes(seed, sample_shape, batch_shape):
    flow = mlp_flow(2, 3, seed)
    p = flow.flow(validate_args=False).expand(batch_shape)
    assert p.batch_shape == batch_shape and p.event_shape == (3,)
    x = p.sample(sample_shape)
    assert x.shape == sample_shape + batch_shape + (3,)
    assert p.projected_log_prob(x).shape == sample_shape + batch_shape
    proj, dist = p.project(x)
    assert proj.shape == x.shape and dist.shape == sample_shape + batch_shape
    assert p.log_prob(x).shape == sample_shape + batch_shape
    # A single event broadcasts against the batch shape.
    assert p.log_prob(x.reshape(-1, 3)[0]).shape == batch_shape
    assert p.encode(x).shape == sample_shape + batch_shape + (2,)
    assert p.log_volume(p.encode(x)).shape == sample_shape + batch_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    flow = mlp_flow(1, 2, 0, dtype=dtype)
    assert flow.base_distribution().sample().dtype == dtype
    p = flow.flow(validate_args=False)
    x = p.sample((8,))
    assert x.dtype == dtype
    assert p.projected_log_prob(x).dtype == dtype
    assert p.log_prob(x).dtype == dtype
    other = torch.float64 if dtype == torch.float32 else torch.float32
    with pytest.raises(ValueError, match="dtype"):
        p.log_prob(x.to(other))
    loss = fif_loss(flow, sinusoid(16, 0.1, 0, dtype=dtype), beta=10.0)
    assert loss.dtype == dtype


def test_float32_and_float64_agree():
    f64 = mlp_flow(2, 3, 5)
    f32 = mlp_flow(2, 3, 5, dtype=torch.float32)
    x = torch.randn(16, 3, dtype=torch.float64)
    lp64 = f64.flow().projected_log_prob(x)
    lp32 = f32.flow().projected_log_prob(x.float())
    torch.testing.assert_close(lp32.double(), lp64, atol=1e-4, rtol=1e-4)


def test_gradients_are_finite():
    flow = mlp_flow(2, 3, 1)
    p = flow.flow()
    x = p.rsample((16,))
    (x.sum() + p.projected_log_prob(x.detach()).sum()).backward()
    grads = [q.grad for q in flow.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    flow.zero_grad()
    fif_loss(flow, torch.randn(32, 3, dtype=torch.float64), beta=10.0).backward()
    assert all(torch.isfinite(q.grad).all() for q in flow.parameters())


def test_rsample_is_pathwise_in_the_decoder():
    core = Circle(1.5, (0.0, 0.0))
    p = paired(core).flow()
    torch.manual_seed(0)
    x = p.rsample((64,))
    x.norm(dim=-1).sum().backward()
    # |x| = r for every sample: d/d log r of sum |x| = 64 r.
    assert abs(float(core.log_r.grad) - 64 * 1.5) <= 1e-9


def test_off_image_points():
    p = paired(Circle(1.0)).flow(validate_args=False)
    # (0, -1.1) lies on the line through the projection pole (0, 1) and (0, -1).
    x = torch.tensor([[0.0, -1.0], [0.0, -1.1]], dtype=torch.float64)
    lp = p.log_prob(x)
    assert torch.isfinite(lp[0]) and lp[1] == -math.inf
    proj, dist = p.project(x)
    assert abs(dist[1].item() - 0.1) <= 1e-12
    torch.testing.assert_close(proj[1], x[0])
    assert not bool(p.support.check(x)[1])
    with pytest.raises(ValueError, match=r"off the decoder image .* up to 0\.1"):
        paired(Circle(1.0)).flow(validate_args=True).log_prob(x)
    # projected_log_prob is the density at the projection.
    torch.testing.assert_close(p.projected_log_prob(x)[1], lp[0])


def test_thickened_density_and_noisy_samples():
    core = FlatPair(1, 3, 7)
    sigma = 0.1
    flow = paired(core)
    p = flow.flow(noise_scale=sigma)
    assert p.support is torch.distributions.constraints.real_vector
    # Same seed, same latent draws: the noisy sample minus the clean one is the added noise.
    torch.manual_seed(0)
    x = p.sample((4000,))
    torch.manual_seed(0)
    clean = flow.flow().sample((4000,))
    noise = x - clean
    # Orthogonal to the (flat) image, variance sigma^2 in each of the D - d normal directions.
    tangent = torch.linalg.qr(core.frame.detach()).Q[:, 0]
    assert float((noise @ tangent).abs().max()) < 1e-10
    assert abs(float(noise.pow(2).sum(-1).mean()) / (2 * sigma**2) - 1) < 0.05
    proj, dist = p.project(x)
    torch.testing.assert_close(proj, clean)
    expected = (
        p.projected_log_prob(x) - math.log(2 * math.pi * sigma**2) - dist.pow(2) / (2 * sigma**2)
    )
    torch.testing.assert_close(p.log_prob(x), expected)


def test_bad_input_raises():
    flow = mlp_flow(2, 3, 0)
    p = flow.flow()
    with pytest.raises(ValueError, match=r"shape \(\*, 3\)"):
        p.log_prob(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        p.log_prob(torch.full((2, 3), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"value has dtype torch.int64.*\.to\(torch.float64\)"):
        p.log_prob(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        p.log_prob([[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="z"):
        p.log_volume(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="d < D"):
        FreeFormInjectiveFlow(mlp(2, 2), mlp(2, 2))
    with pytest.raises(ValueError, match="latent_features"):
        FreeFormInjectiveFlow(nn.Tanh(), nn.Tanh())
    with pytest.raises(ValueError, match="noise_scale"):
        FreeFormInjectiveFlow(mlp(3, 2), mlp(2, 3), noise_scale=0.0)
    with pytest.raises(ValueError, match="event shape"):
        FreeFormInjectiveDistribution(
            torch.distributions.Normal(torch.zeros(2), 1.0), flow.encoder, flow.decoder, 3
        )
    with pytest.raises(ValueError, match="features D > latent"):
        FreeFormInjectiveDistribution(flow.base_distribution(), flow.encoder, flow.decoder, 2)
    with pytest.raises(ValueError, match="maps"):
        FreeFormInjectiveDistribution(
            flow.base_distribution(), mlp(3, 1), flow.decoder, 3
        ).log_prob(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="out_features > in_features"):
        FreeFormEmbedding(flow.encoder, flow.decoder, 3, 3)
    batch = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        fif_loss(flow, batch[0])
    with pytest.raises(ValueError, match="hutchinson_samples"):
        fif_loss(flow, batch, hutchinson_samples=3)
    with pytest.raises(ValueError, match="hutchinson_samples"):
        fif_loss(flow, batch, hutchinson_samples=0)
    with pytest.raises(ValueError, match="noise"):
        fif_loss(flow, batch, noise=-1.0)


def test_the_module_moves_and_saves_its_state():
    flow = mlp_flow(1, 2, 0, dtype=torch.float32).double()
    assert flow.base_distribution().sample().dtype == torch.float64
    assert flow.flow().sample((2,)).dtype == torch.float64
    assert "_base_loc" in flow.state_dict()
    assert isinstance(flow(), FreeFormInjectiveDistribution)
    assert len(list(paired(FlatPair(1, 2, 0)).parameters())) == 6  # shared, counted once


def test_inside_a_pyro_model():
    p = paired(Circle(1.0, (0.0, 0.0), 0.8)).flow()
    torch.manual_seed(0)
    x = p.sample((10,))

    def model():
        with pyro.plate("data", 10):
            pyro.sample("obs", p, obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["obs"]["log_prob"], p.log_prob(x))


# --- the decoder as an atlas chart --------------------------------------------------------


@pytest.mark.parametrize("charts", [1, 2])
def test_free_form_embedding_in_an_atlas(charts):
    core = Circle(1.3, (0.2, -0.1), 0.8, 0.3)
    emb = FreeFormEmbedding(Encoder(core), Decoder(core), 1, 2)
    # Left inverse on the image, and an InjectiveTransform in every other respect.
    u = torch.randn(16, 1, dtype=torch.float64)
    torch.testing.assert_close(emb.inv(emb(u)), u, atol=1e-12, rtol=0)
    assert emb.forward_shape((5, 1)) == (5, 2) and emb.inverse_shape((5, 2)) == (5, 1)
    atlas = AtlasFlow(
        2, 1, charts, embedding=emb, hidden=(8,), layers=1, membership=ChartMembership(m=charts)
    ).double()
    torch.manual_seed(charts)
    with torch.no_grad():
        for q in atlas.flow_modules.parameters():
            q.copy_(0.2 * torch.randn_like(q))
        atlas.logits.copy_(torch.randn_like(atlas.logits))
    p = atlas.flow(validate_args=True)
    x = p.sample((32,))
    assert ((x - core.c).norm(dim=-1) - 1.3).abs().max() < 1e-12
    lp = p.log_prob(x)
    # Manual: sum over charts of pi_k q(h_k^{-1}(u)) / |det J_h_k| / vol_g(u), u = f(x), with
    # every Jacobian by autodiff.
    with torch.no_grad():
        u = core.encode(x)
        terms = []
        for k in range(charts):
            flows, _ = p.chart_maps(torch.full((32,), k, dtype=torch.long))
            z = u
            for t in reversed(flows):
                z = t.inv(z)

            def h(w, flows=flows):
                for t in flows:
                    w = t(w)
                return w

            log_det_h = torch.linalg.slogdet(batched_jacobian(h, z)).logabsdet
            terms.append(
                atlas.logits.log_softmax(-1)[k]
                + atlas.base_distribution().log_prob(z)
                - log_det_h
                - log_volume_ratio(core.decode, u)
            )
        manual = torch.stack(terms).logsumexp(0)
    assert (lp - manual).abs().max() <= 1e-8
    # An off-image point is rejected by the atlas's own reconstruction check.
    with pytest.raises(ValueError, match="off the model's support"):
        p.log_prob(torch.tensor([[0.2, 2.0]], dtype=torch.float64))


# --- the FIF surrogate --------------------------------------------------------------------


def exact_trace_vectors(n, d):
    return hutchinson_vectors(n, d, d, dtype=torch.float64)


def test_hutchinson_vectors():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    v = hutchinson_vectors(5, 3, 3, dtype=torch.float64)
    assert v.shape == (5, 3, 3)
    torch.testing.assert_close(v @ v.mT / 3, torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    # One probe: E[v v^T] = I (Monte Carlo over many probes).
    v = hutchinson_vectors(200000, 2, 1, dtype=torch.float64)[..., 0]
    outer = (v[:, :, None] * v[:, None, :]).mean(0)
    assert (outer - torch.eye(2, dtype=torch.float64)).abs().max() < 0.02


def naive_surrogate(encoder, decoder, x, vectors, at_reconstruction=False, stop_grad=True):
    """Deliberately wrong variants of the surrogate, to show the tests below detect them:
    the encoder Jacobian at the reconstruction (on the manifold) instead of the data point,
    or no stop-gradient on the decoder side."""
    z = encoder(x)
    if at_reconstruction:
        x = decoder(z).detach()
    x = x.detach().requires_grad_(True)
    z = encoder(x)
    total = 0.0
    for k in range(vectors.shape[-1]):
        v = vectors[..., k]
        jvp = torch.func.jvp(decoder, (z,), (v,))[1]
        (vjp,) = torch.autograd.grad(z, x, v, create_graph=True)
        total = total + (vjp * (jvp.detach() if stop_grad else jvp)).sum(-1)
    return total / vectors.shape[-1]


def grads(loss, params):
    out = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(out, params, strict=True)
        ]
    )


@given(seed=seeds, d=st.integers(1, 3), extra=st.integers(1, 2))
def test_surrogate_is_the_trace_of_encoder_times_stopped_decoder_jacobian(seed, d, extra):
    """Value and gradient (all parameters) of the exact-trace surrogate against
    tr(J_f(x) SG(J_g(f(x)))) with both Jacobians by autodiff, at points off the manifold."""
    D = d + extra
    flow = mlp_flow(d, D, seed)
    params = list(flow.parameters())
    torch.manual_seed(seed)
    x = torch.randn(6, D, dtype=torch.float64)
    v = exact_trace_vectors(6, d)
    surrogate, z, recon = volume_change_surrogate(flow.encoder, flow.decoder, x, vectors=v)
    jf = jacobian(flow.encoder, x)  # (6, d, D), in the graph of the encoder's parameters
    jg = jacobian(flow.decoder, flow.encoder(x).detach()).detach()  # (6, D, d)
    reference = (jf @ jg).diagonal(dim1=-2, dim2=-1).sum(-1)
    assert (surrogate - reference).abs().max() <= 1e-10
    torch.testing.assert_close(z, flow.encoder(x), atol=1e-14, rtol=0)
    torch.testing.assert_close(recon, flow.decoder(z), atol=1e-14, rtol=0)
    g_ours, g_ref = grads(surrogate.sum(), params), grads(reference.sum(), params)
    assert (g_ours - g_ref).abs().max() <= 1e-8
    # The test can fail: each wrong variant is detected.
    for wrong in (dict(at_reconstruction=True), dict(stop_grad=False)):
        s_wrong = naive_surrogate(flow.encoder, flow.decoder, x, v, **wrong)
        assert (grads(s_wrong.sum(), params) - g_ref).abs().max() > 1e-4


@given(seed=seeds, d=st.integers(1, 3), extra=st.integers(1, 2), off=st.floats(0.0, 1.0))
def test_surrogate_gradient_equals_the_exact_log_volume_gradient(seed, d, extra, off):
    r"""When f is the pseudo-inverse of g (FlatPair), E_v grad surrogate is exactly
    grad 1/2 log det(J_f J_f^T)(x) = -grad 1/2 log det(J_g^T J_g)(f(x)): the volume term of the
    exact log_prob, at data on and off the manifold."""
    D = d + extra
    core = FlatPair(d, D, seed)
    flow = paired(core)
    p = flow.flow()
    params = list(flow.parameters())
    torch.manual_seed(seed)
    with torch.no_grad():
        x = p.sample((5,)) + off * torch.randn(5, D, dtype=torch.float64)
    surrogate, _, _ = volume_change_surrogate(
        flow.encoder, flow.decoder, x, vectors=exact_trace_vectors(5, d)
    )
    exact = -p.log_volume(flow.encoder(x))
    g_exact = grads(exact.sum(), params)
    assert g_exact.abs().max() > 1e-3
    assert (grads(surrogate.sum(), params) - g_exact).abs().max() <= 1e-8
    # Without the stop-gradient the estimate is wrong (here tr(J_f J_g) = d is constant).
    wrong = naive_surrogate(
        flow.encoder, flow.decoder, x, exact_trace_vectors(5, d), stop_grad=False
    )
    assert (grads(wrong.sum(), params) - g_exact).abs().max() > 1e-3


def test_random_hutchinson_probes_are_unbiased():
    """One random probe per copy: the mean gradient over many probes matches the exact one
    within 5 standard errors; the no-stop-gradient surrogate is many standard errors off."""
    d, D = 3, 5
    core = FlatPair(d, D, 11)
    flow = paired(core)
    p = flow.flow()
    params = list(flow.parameters())
    torch.manual_seed(0)
    with torch.no_grad():
        x = p.sample((4,)) + 0.3 * torch.randn(4, D, dtype=torch.float64)
    g_exact = grads(-p.log_volume(flow.encoder(x)).sum(), params)
    copies, batches = 500, 16
    xs = x.repeat(copies, 1)
    ours, wrong = [], []
    for _ in range(batches):
        v = hutchinson_vectors(len(xs), d, 1, dtype=torch.float64)
        s, _, _ = volume_change_surrogate(flow.encoder, flow.decoder, xs, vectors=v)
        ours.append(grads(s.sum() / copies, params))
        s_wrong = naive_surrogate(flow.encoder, flow.decoder, xs, v, stop_grad=False)
        wrong.append(grads(s_wrong.sum() / copies, params))
    for estimates, should_match in ((ours, True), (wrong, False)):
        est = torch.stack(estimates)
        mean, se = est.mean(0), est.std(0) / math.sqrt(batches)
        z = ((mean - g_exact).abs() / (se + 1e-12)).max()
        assert (z < 5) if should_match else (z > 20)


def test_surrogate_evaluates_the_volume_change_off_the_manifold():
    """Angle chart of a circle of radius R and the radial-projection encoder: at a point at
    distance rho from the centre, tr(J_f(x) J_g(f(x))) = R / rho = 1 / (1 - kappa r), the
    on/off-manifold volume ratio that fixes naive maximum likelihood (reference/002)."""
    radius = 2.0
    decoder = lambda t: radius * torch.cat([t.cos(), t.sin()], -1)  # noqa: E731
    encoder = lambda x: torch.atan2(x[..., 1:], x[..., :1])  # noqa: E731
    theta = torch.linspace(-3, 3, 7, dtype=torch.float64)
    rho = torch.linspace(0.5, 4.0, 7, dtype=torch.float64)
    x = rho[:, None] * torch.stack([theta.cos(), theta.sin()], -1)
    surrogate, _, recon = volume_change_surrogate(encoder, decoder, x)
    torch.testing.assert_close(surrogate, radius / rho, atol=1e-12, rtol=0)
    torch.testing.assert_close(recon.norm(dim=-1), torch.full_like(rho, radius))


def test_fif_loss_terms_and_noise_augmentation():
    flow = mlp_flow(1, 2, 3)
    x = sinusoid(64, 0.1, 0).double()
    torch.manual_seed(5)
    terms = fif_loss_terms(flow, x, beta=7.0)
    torch.testing.assert_close(
        terms["loss"], 7.0 * terms["reconstruction"] + terms["latent_nll"] - terms["surrogate"]
    )
    torch.testing.assert_close(
        terms["reconstruction"], (flow.decoder(flow.encoder(x)) - x).pow(2).sum(-1)
    )
    torch.testing.assert_close(
        terms["latent_nll"], -flow.base_distribution().log_prob(flow.encoder(x))
    )
    # d = 1: the single probe is +-1, so the surrogate is exact: J_f(x) J_g(f(x)).
    jf = jacobian(flow.encoder, x)
    jg = jacobian(flow.decoder, flow.encoder(x))
    torch.testing.assert_close(terms["surrogate"], (jf @ jg)[:, 0, 0])
    # Noise augmentation: the loss of x + noise * eps, eps drawn first.
    torch.manual_seed(9)
    noisy = fif_loss(flow, x, beta=7.0, noise=0.2)
    torch.manual_seed(9)
    eps = torch.randn_like(x)
    torch.testing.assert_close(noisy, fif_loss(flow, x + 0.2 * eps, beta=7.0))
    assert not torch.allclose(noisy, fif_loss(flow, x, beta=7.0))


def test_fit_with_fif_loss_reduces_the_loss_on_the_noisy_sinusoid():
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 1)
    )
    decoder = nn.Sequential(
        nn.Linear(1, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2)
    )
    flow = FreeFormInjectiveFlow(encoder, decoder)
    data = sinusoid(1024, noise=0.1, seed=0)
    before = fif_loss_terms(flow, data, beta=20.0)
    history = fit(
        flow,
        data,
        epochs=8,
        batch_size=128,
        lr=3e-3,
        loss_fn=partial(fif_loss, beta=20.0),
        seed=0,
        progress=False,
    )
    after = fif_loss_terms(flow, data, beta=20.0)
    assert len(history["loss"]) == 8
    assert history["loss"][-1] < history["loss"][0] - 1.0
    assert float(after["loss"].mean()) < float(before["loss"].mean()) - 1.0
    assert float(after["reconstruction"].mean()) < float(before["reconstruction"].mean())


# --- docs and example ---------------------------------------------------------------------


@pytest.mark.parametrize("module", [free_form_module, fif_module])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "free_form_sinusoid.py"
    spec = importlib.util.spec_from_file_location("free_form_sinusoid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_quick_run(tmp_path, capsys):
    example = load_example()
    rows = example.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert (tmp_path / "free_form_sinusoid.png").stat().st_size > 0
    assert "| beta |" in out
    assert len(rows) >= 2
    for row in rows:
        assert math.isfinite(row["reconstruction"]) and math.isfinite(row["nll"])
