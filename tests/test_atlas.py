"""Properties of AtlasFlowDistribution: samples on the support, consistency of sample and
log_prob, chart posterior, encode/decode, shapes, dtypes, gradients, state, devices, errors."""

import io
import math

import _atlases as A
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from atlasdist import AtlasFlow, AtlasFlowDistribution, ChartMembership
from atlasdist.transforms import ChartSpline, Hypernet, clear_chart_cache

seeds = st.integers(0, 2**20)
ATLASES = {
    "circle": A.circle,
    "two_circles": A.two_circles,
    "sphere": A.sphere,
    "torus": A.torus,
    "tori": A.tori,
    "conformal": lambda s: A.conformal_chart(s)[0],
    # Every chart a candidate (m = K): the candidate sets are complete, log_prob is exact.
    "learned_default": lambda s: A.randomize_flows(
        AtlasFlow(3, 2, 4, hidden=(8,), layers=1, membership=ChartMembership(m=4)).double(),
        s,
        0.2,
    ),
}
names = st.sampled_from(sorted(ATLASES))


def on_manifold_distance(name, x):
    if name == "circle":
        return (x.norm(dim=-1) - 1).abs()
    if name == "sphere":
        return (x.norm(dim=-1) - 1).abs()
    if name == "two_circles":
        da = ((x - torch.tensor([-2.0, 0.0]).double()).norm(dim=-1) - 1).abs()
        db = ((x - torch.tensor([2.0, 1.0]).double()).norm(dim=-1) - 0.5).abs()
        return torch.minimum(da, db)
    if name in ("torus", "tori"):
        return (x[..., :2].norm(dim=-1) - 1).abs() + (x[..., 2:].norm(dim=-1) - 1).abs()
    return None


@given(name=names, seed=seeds)
def test_samples_lie_on_the_support_and_have_finite_log_prob(name, seed):
    torch.manual_seed(seed)  # before the atlas: some start from torch's random init
    atlas = ATLASES[name](seed)
    p = atlas.flow(validate_args=True)
    x = p.sample((64,))
    dist = on_manifold_distance(name, x)
    if dist is not None:
        assert dist.max() < 1e-9
    assert (p.distance_to_support(x) < 1e-9).all()
    assert bool(p.support.check(x).all())
    lp = p.log_prob(x)
    assert torch.isfinite(lp).all()


@given(name=names, seed=seeds)
def test_chart_posterior_sums_to_one_and_encode_decode_round_trip(name, seed):
    torch.manual_seed(seed)  # before the atlas: some start from torch's random init
    atlas = ATLASES[name](seed)
    p = atlas.flow()
    x, charts = p.rsample_with_charts((32,))
    x = x.detach()
    _, log_post = p.chart_log_posterior(x)
    torch.testing.assert_close(log_post.logsumexp(-1), torch.zeros(32, dtype=x.dtype))
    z, k = p.encode(x, stochastic=True)
    torch.testing.assert_close(p.decode(z, k), x, atol=1e-8, rtol=1e-8)
    # The drawn chart is among the candidates with positive posterior.
    cand, log_post = p.chart_log_posterior(x)
    assert ((cand == charts[:, None]) & torch.isfinite(log_post)).any(-1).all()


def test_deterministic_encode_is_the_posterior_mean_of_chart_coordinates():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    atlas = A.circle(3)
    p = atlas.flow()
    x = p.sample((16,))
    z, _ = p.encode(x)
    cand, log_post = p.chart_log_posterior(x)
    # Recompute sum_k p(k|x) f_k(x) by hand, chart by chart.
    manual = torch.zeros(16, 1, dtype=x.dtype)
    for j in range(cand.shape[-1]):
        flows, emb = p.chart_maps(cand[:, j])
        u = emb.inv(x)
        for t in reversed(flows):
            u = t.inv(u)
        manual += log_post[:, j].exp()[:, None] * u
    torch.testing.assert_close(z, manual)


@settings(max_examples=3)
@given(seed=seeds)
def test_circle_samples_match_log_prob(seed):
    """Kolmogorov-Smirnov test of sampled angles against the CDF integrated from log_prob."""
    atlas = A.circle(seed)
    torch.manual_seed(seed)
    p = atlas.flow()
    grid, w = A.circle_points(20000)
    with torch.no_grad():
        dens = p.log_prob(grid).exp() * w
    cdf = np.concatenate([[0.0], dens.cumsum(0).numpy()])
    edges = np.linspace(0, 2 * math.pi, len(cdf))
    x = p.sample((2000,))
    theta = torch.atan2(x[:, 1], x[:, 0]).remainder(2 * math.pi).numpy()
    result = stats.kstest(theta, lambda t: np.interp(t, edges, cdf / cdf[-1]))
    assert result.pvalue > 1e-3


def sphere_marginal_ks(p, x, axis, tilt=0.0):
    """KS test of the samples' coordinate t = x . axis against its CDF, integrated from
    log_prob (times an optional tilt 1 + tilt * t, for the negative control) on an
    equal-area grid (uniform in t, uniform in the angle about the axis)."""
    from atlasdist.transforms import householder_to

    n_t, n_phi = 800, 256
    t = -1 + (torch.arange(n_t, dtype=torch.float64) + 0.5) * (2 / n_t)
    phi = (torch.arange(n_phi, dtype=torch.float64) + 0.5) * (2 * math.pi / n_phi)
    tt, pp = torch.meshgrid(t, phi, indexing="ij")
    r = (1 - tt**2).sqrt()
    grid = torch.stack([r * pp.cos(), r * pp.sin(), tt], -1).reshape(-1, 3)
    grid = grid @ householder_to(axis).T
    with torch.no_grad():
        marginal = p.log_prob(grid).exp().reshape(n_t, n_phi).sum(-1) * (1 + tilt * t)
    cdf = np.concatenate([[0.0], marginal.cumsum(0).numpy()])
    edges = np.linspace(-1, 1, n_t + 1)
    samples = (x @ axis).numpy()
    return stats.kstest(samples, lambda v: np.interp(v, edges, cdf / cdf[-1])).pvalue


@settings(max_examples=3)
@given(seed=seeds)
def test_sphere_samples_match_log_prob(seed):
    """Kolmogorov-Smirnov tests of three coordinate marginals of the samples against the
    marginals integrated from log_prob; the same test rejects a tilted density."""
    atlas = A.sphere(seed)
    torch.manual_seed(seed)
    p = atlas.flow()
    x = p.sample((3000,))
    axes = torch.eye(3, dtype=torch.float64)
    # Bonferroni over the three axes.
    assert min(sphere_marginal_ks(p, x, a) for a in axes) > 1e-3 / 3
    assert sphere_marginal_ks(p, x, axes[0], tilt=0.5) < 1e-3


def test_goodness_of_fit_detects_a_wrong_density():
    """The sample-vs-density test can fail: a density off by a smooth tilt is rejected."""
    atlas = A.circle(1)
    torch.manual_seed(0)
    p = atlas.flow()
    grid, w = A.circle_points(20000)
    with torch.no_grad():
        dens = p.log_prob(grid).exp() * w * (1 + 0.5 * grid[:, 0])
    cdf = np.concatenate([[0.0], dens.cumsum(0).numpy()])
    edges = np.linspace(0, 2 * math.pi, len(cdf))
    x = p.sample((2000,))
    theta = torch.atan2(x[:, 1], x[:, 0]).remainder(2 * math.pi).numpy()
    assert stats.kstest(theta, lambda t: np.interp(t, edges, cdf / cdf[-1])).pvalue < 1e-3


@pytest.mark.parametrize("sample_shape", [(), (5,), (2, 3)])
@pytest.mark.parametrize("batch_shape", [(), (4,)])
def test_shapes(sample_shape, batch_shape):
    p = A.sphere(0).flow().expand(batch_shape)
    x = p.sample(sample_shape)
    assert x.shape == sample_shape + batch_shape + (3,)
    assert p.log_prob(x).shape == sample_shape + batch_shape
    assert p.rsample(sample_shape).shape == x.shape
    z, k = p.encode(x)
    assert z.shape == sample_shape + batch_shape + (2,) and k.shape == x.shape[:-1]
    assert p.batch_shape == batch_shape and p.event_shape == (3,)
    # log_prob broadcasts a single point against the batch shape
    assert p.log_prob(x.reshape(-1, 3)[0]).shape == batch_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    atlas = A.sphere(1).to(dtype)
    p = atlas.flow(validate_args=True)
    x = p.sample((8,))
    assert x.dtype == p.log_prob(x).dtype == p.encode(x)[0].dtype == dtype
    assert torch.isfinite(p.log_prob(x)).all()


def test_float32_log_prob_matches_float64():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    a64 = A.sphere(2)
    a32 = A.sphere(2).float()
    x = a64.flow().sample((64,))
    torch.testing.assert_close(
        a32.flow().log_prob(x.float()).double(), a64.flow().log_prob(x), atol=1e-4, rtol=1e-4
    )


def test_gradients():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    atlas = A.randomize_flows(AtlasFlow(3, 2, 4, hidden=(8,), layers=1), 0, 0.2)
    p = atlas.flow()
    x = p.sample((32,))
    (-p.log_prob(x).mean()).backward()
    grads = {n: q.grad for n, q in atlas.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["logits"].abs().sum() > 0
    # rsample is pathwise for the continuous parameters; the logits get no gradient.
    atlas.zero_grad(set_to_none=True)
    atlas.flow().rsample((32,)).pow(2).sum().backward()
    assert atlas.logits.grad is None
    assert atlas.centres.grad is not None and torch.isfinite(atlas.centres.grad).all()
    emb_grads = [q.grad for q in atlas.charts.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in emb_grads)


def test_state_dict_round_trip_gives_identical_log_prob():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    atlas = A.randomize_flows(AtlasFlow(3, 2, 4, hidden=(8,), layers=1), 0, 0.2)
    x = atlas.flow().sample((16,))
    buffer = io.BytesIO()
    torch.save(atlas.state_dict(), buffer)
    other = AtlasFlow(3, 2, 4, hidden=(8,), layers=1)
    assert not torch.equal(other.flow().log_prob(x), atlas.flow().log_prob(x))
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other.flow().log_prob(x), atlas.flow().log_prob(x))


def test_only_the_candidate_charts_are_evaluated():
    """log_prob runs the conditioned flows on N x cap (point, chart) pairs, not N x K; the
    hypernetworks and the splines' knot networks, which depend on the chart only, run once
    per chart, not per pair: with gradients on the distinct candidate charts of the batch,
    without on all K (the rows the evaluation cache keeps)."""
    calls, rows = [], []
    atlas = AtlasFlow(3, 2, 64, hidden=(8,), layers=1, membership=ChartMembership(m=2))
    original = atlas.charts.embedding
    atlas.charts.embedding = lambda ctx: calls.append(len(ctx)) or original(ctx)
    knot_networks = [m.nn for m in atlas.modules() if isinstance(m, ChartSpline)]
    for module in [*atlas.modules()]:
        knots = any(module is k for k in knot_networks)
        if isinstance(module, Hypernet) or knots:
            kind = "knots" if knots else "hypernet"
            module.register_forward_hook(lambda m, a, out, k=kind: rows.append((k, len(a[0]))))
    p = atlas.flow(validate_args=False)
    x = p.sample((10,))  # on the charts' images: the latent flows run
    clear_chart_cache(atlas)  # the sample below computes the per-chart terms again
    calls.clear()
    rows.clear()
    p.log_prob(x)
    assert calls == [20]
    used = int(p.membership.candidates(x, p.centres)[0].unique().numel())
    assert {kind for kind, _ in rows} == {"hypernet", "knots"}
    assert {n for _, n in rows} == {used}
    calls.clear()
    rows.clear()
    p.sample((10,))
    assert calls == [10]
    assert rows and {n for _, n in rows} == {64}
    atlas.cache_charts = False  # nothing kept: the hypernetworks run in this call
    rows.clear()
    with torch.no_grad():
        atlas.flow(validate_args=False).log_prob(x)
    assert {kind for kind, _ in rows} == {"hypernet", "knots"}
    assert {n for _, n in rows} == {64}


def _distinct_chart_atlas(seed: int) -> AtlasFlow:
    """Four learned charts with distinct images (2-spheres of different centres, radii and
    orientations in R^3) and random flows; every chart a candidate."""
    atlas = AtlasFlow(3, 2, 4, hidden=(8,), layers=1, membership=ChartMembership(m=4)).double()
    A.randomize_flows(atlas, seed, 0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for prm in atlas.charts.parameters():
            prm.add_(0.5 * torch.randn(prm.shape, generator=gen, dtype=prm.dtype))
    return atlas


@given(seeds)
@settings(max_examples=5)
def test_latent_flows_run_only_on_pairs_whose_point_is_on_the_chart_image(seed):
    """log_prob runs the latent flows on the (point, candidate) pairs whose point lies on the
    candidate's image only (the others carry no density); value and gradients equal those of
    evaluating every pair."""
    atlas = _distinct_chart_atlas(seed)
    p = atlas.flow()
    torch.manual_seed(seed)
    x = torch.cat([p.sample((40,)), torch.randn(5, 3, dtype=torch.float64)])
    rows = []
    latent = p._latent_log_prob
    p._latent_log_prob = lambda u, flows: rows.append(u.shape[0]) or latent(u, flows)
    p._validate_args = False  # the 5 random points are off the support
    lp = p.log_prob(x)
    assert len(rows) == 1 and 40 <= rows[0] < 45 * 4
    pairs = p._pairs(x, torch.Size([45]))
    reference = pairs["log_joint"].masked_fill(~pairs["on_image"], -math.inf).logsumexp(-1)
    assert torch.isfinite(lp[:40]).all() and torch.isneginf(lp[40:]).all()
    assert torch.equal(lp, reference)
    params = [prm for prm in atlas.parameters() if prm.requires_grad]
    grads = torch.autograd.grad(lp[:40].sum(), params, allow_unused=True)
    expected = torch.autograd.grad(reference[:40].sum(), params, allow_unused=True)
    for g, e in zip(grads, expected, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_missed_mass_is_zero_when_every_chart_is_a_candidate():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    assert float(A.circle(0).flow().missed_mass(2000)) == 0.0
    atlas = AtlasFlow(3, 2, 8, membership=ChartMembership(m=1))
    # All charts start with the same image: most mass is generated by charts not proposed.
    assert float(atlas.flow().missed_mass(2000)) > 0.5


def test_off_support_points():
    atlas = A.sphere(0)
    p = atlas.flow(validate_args=True)
    x = torch.tensor([[0.0, 0.0, 1.5], [0.6, 0.0, 0.8]], dtype=torch.float64)
    with pytest.raises(ValueError, match="off the model's support .* 0.5"):
        p.log_prob(x)
    lp = atlas.flow(validate_args=False).log_prob(x)
    assert lp[0] == -math.inf and torch.isfinite(lp[1])
    proj, dist, _ = p.project(x)
    torch.testing.assert_close(proj[0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(dist, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert not bool(p.support.check(x)[0])


def test_thickened_density():
    """p_sigma(x) = p(pi(x)) N(normal part; 0, sigma^2): for the unit circle in R^2 a point at
    radius r has normal part r - 1, and the thickened density integrates to ~1 over R^2."""
    atlas = A.circle(4)
    sigma = 0.05
    p = atlas.flow(noise_scale=sigma, validate_args=True)
    exact = atlas.flow()
    x = torch.tensor([[0.0, 1.1], [0.6, 0.8]], dtype=torch.float64)
    expected = exact.log_prob(x / x.norm(dim=-1, keepdim=True)) + torch.distributions.Normal(
        0.0, sigma
    ).log_prob(x.norm(dim=-1) - 1)
    torch.testing.assert_close(p.log_prob(x), expected)
    # Polar quadrature over R^2: integral of p_sigma r dr dtheta.
    grid, w = A.circle_points(2000)
    n_r = 200
    dr = 16 * sigma / n_r
    radii = 1 - 8 * sigma + (torch.arange(n_r, dtype=torch.float64) + 0.5) * dr
    points = (radii[:, None, None] * grid).reshape(-1, 2)
    weights = (radii[:, None] * w * dr).reshape(-1)
    with torch.no_grad():
        dens = torch.cat([p.log_prob(c).exp() for c in points.split(100000)])
    total = float((dens * weights).sum())
    # Not exactly one: the area element r dr dtheta differs from the tube's product measure
    # by O(sigma^2); it is normalized only approximately, as documented.
    assert abs(total - 1) < 1e-2
    # Samples lie off the support with normal noise of the given scale.
    torch.manual_seed(0)
    s = p.sample((4000,))
    assert abs(float((s.norm(dim=-1) - 1).std()) - sigma) < 0.005


def test_bad_input():
    p = A.sphere(0).flow(validate_args=True)
    with pytest.raises(ValueError, match=r"\(\*, 3\)"):
        p.log_prob(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        p.log_prob(torch.zeros(4, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="NaN"):
        p.log_prob(torch.full((1, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="noise_scale"):
        A.sphere(0).flow(noise_scale=-1.0)
    with pytest.raises(ValueError, match="d < D"):
        AtlasFlow(3, 3, 2)
    with pytest.raises(ValueError, match="centres"):
        AtlasFlow(3, 2, 2, centres=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="radii"):
        AtlasFlow.spheres(1, torch.zeros(1, 2), torch.tensor([-1.0]), torch.tensor([[0.0, 1]]))


@pytest.mark.parametrize("part", ["charts", "flow_modules"])
def test_nan_parameters_are_named_not_taken_for_off_support_points(part):
    atlas = AtlasFlow(3, 2, 4, hidden=(8,), layers=1, membership=ChartMembership(m=2)).double()
    x = atlas.flow().sample((5,))
    with torch.no_grad():
        for prm in getattr(atlas, part).parameters():
            prm.fill_(math.nan)
    with pytest.raises(ValueError, match="parameters hold NaN"):
        atlas.flow(validate_args=True).log_prob(x)


def test_is_a_pyro_distribution():
    p = A.sphere(0).flow()
    assert isinstance(p, AtlasFlowDistribution)
    x = p.sample((3,))
    assert p.to_event(0).log_prob(x).shape == (3,)
    assert p.expand((3,)).to_event(1).log_prob(x).shape == ()
    masked = p.expand((3,)).mask(torch.tensor([True, False, True]))
    assert masked.log_prob(x)[1] == 0
    assert p.has_rsample


@pytest.mark.cuda
def test_cuda():
    atlas = A.randomize_flows(AtlasFlow(3, 2, 4, hidden=(8,), layers=1), 0, 0.2)
    x = atlas.flow().sample((16,))
    lp = atlas.flow().log_prob(x)
    atlas = atlas.cuda()
    p = atlas.flow()
    torch.testing.assert_close(p.log_prob(x.cuda()).cpu(), lp, atol=1e-4, rtol=1e-4)
    s = p.sample((8,))
    assert s.device.type == "cuda" and torch.isfinite(p.log_prob(s)).all()
