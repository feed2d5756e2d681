"""Toy manifolds, k-means, chart membership and the README demo (smoke)."""

import math

import pytest
import torch
from scipy import stats

from atlasdist import ChartMembership, datasets
from atlasdist.charts import kmeans
from atlasdist.demo import main


def distance_to_manifold(name, x):
    x = x.double()
    if name == "two_circles":
        a = ((x - torch.tensor([-1.5, 0.0]).double()).norm(dim=-1) - 1).abs()
        b = ((x - torch.tensor([1.5, 0.0]).double()).norm(dim=-1) - 0.5).abs()
        return torch.minimum(a, b)
    if name == "sphere":
        return (x.norm(dim=-1) - 1).abs()
    if name == "torus":
        ring = x[:, :2].norm(dim=-1)
        return ((ring - 1).pow(2) + x[:, 2].pow(2)).sqrt().sub(0.4).abs()
    if name == "sinusoid":
        return (x[:, 1] - (2 * x[:, 0]).sin()).abs()
    if name == "helix":
        return (x[:, :2].norm(dim=-1) - 1).abs()
    if name == "interlocked_rings":
        a = (x[:, :2].norm(dim=-1) - 1).abs() + x[:, 2].abs()
        b = ((x[:, [0, 2]] - torch.tensor([1.0, 0.0]).double()).norm(dim=-1) - 1).abs() + x[
            :, 1
        ].abs()
        return torch.minimum(a, b)
    return None


@pytest.mark.parametrize("name", sorted(datasets.MANIFOLDS))
def test_generators(name):
    gen, D, d = datasets.MANIFOLDS[name]
    x = gen(500, seed=1)
    assert x.shape == (500, D) and x.dtype == torch.get_default_dtype()
    assert torch.equal(x, gen(500, seed=1))
    assert not torch.equal(x, gen(500, seed=2))
    dist = distance_to_manifold(name, gen(500, seed=1, dtype=torch.float64))
    if dist is not None:
        assert dist.max() < 1e-9
        noisy = gen(2000, noise=0.05, seed=1, dtype=torch.float64)
        assert 0.01 < float(distance_to_manifold(name, noisy).mean()) < 0.1
    with pytest.raises(ValueError, match="noise"):
        gen(10, noise=-1.0)


@pytest.mark.parametrize("name", sorted(datasets.MANIFOLDS))
def test_seeds_draw_from_one_distribution(name):
    """A training set (seed 0) and a held-out set (seed 1) must come from the same law: a
    two-sample KS test on every coordinate and on random projections."""
    gen, D, _ = datasets.MANIFOLDS[name]
    a, b = gen(3000, seed=0, dtype=torch.float64), gen(3000, seed=1, dtype=torch.float64)
    dirs = torch.randn(D, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions = torch.cat([torch.eye(D, dtype=torch.float64), dirs], -1)
    pa, pb = (a @ directions).T.numpy(), (b @ directions).T.numpy()
    pvalues = [stats.ks_2samp(u, v).pvalue for u, v in zip(pa, pb, strict=True)]
    # Bonferroni over the projections: a 1e-3 family-wise false-alarm rate
    assert min(pvalues) > 1e-3 / len(pvalues)


def test_von_mises_angles_follow_the_von_mises_law():
    theta = datasets._von_mises(5000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert stats.kstest(theta.numpy(), stats.vonmises(1.0).cdf).pvalue > 1e-3


def test_two_circles_entropy_matches_monte_carlo():
    x = datasets.two_circles(20000, seed=0, dtype=torch.float64)
    centres = torch.tensor([[-1.5, 0.0], [1.5, 0.0]], dtype=torch.float64)
    second = x[:, 0] > 0
    rel = x - centres[second.long()]
    theta = torch.atan2(rel[:, 1], rel[:, 0]) - torch.where(second, math.pi / 2, 0.0)
    radius = torch.where(second, 0.5, 1.0)
    logp = (
        math.log(0.5) + torch.from_numpy(stats.vonmises(1.0).logpdf(theta.numpy())) - radius.log()
    )
    torch.testing.assert_close(datasets.two_circles_log_prob(x), logp)
    assert abs(float(logp.mean()) - datasets.two_circles_entropy()) < 0.02


def test_kmeans_finds_clusters():
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = truth.repeat_interleave(100, 0) + 0.1 * torch.randn(300, 2, generator=gen)
    centres, labels = kmeans(x, 3, generator=gen)
    assert torch.cdist(truth, centres).min(-1).values.max() < 0.1
    assert torch.bincount(labels).tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(x[:2], 3)


def test_membership_regions_match_the_definition():
    """U_k = {x : d_k(x) < (1 + eps) d~_m(x)}; candidates (with the cap) are exactly the
    region's charts nearest first, and always hold the nearest centre."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 3, generator=gen)
    x = torch.randn(200, 3, generator=gen)
    for m, eps in [(1, 0.0), (2, 0.3), (3, 1.0)]:
        membership = ChartMembership(m=m, eps=eps, cap=16)
        dist = torch.cdist(x, centres)
        d_m = dist.sort(-1).values[:, m - 1 : m]
        expected = dist < (1 + eps) * d_m if eps > 0 else dist <= d_m
        assert torch.equal(membership.regions(x, centres), expected)
        idx, mask = membership.candidates(x, centres)
        got = torch.zeros_like(expected).scatter_(1, idx, mask)
        assert torch.equal(got, expected)
        assert torch.equal(idx[:, 0], dist.argmin(-1))
    capped = ChartMembership(m=2, eps=10.0, cap=4)
    idx, mask = capped.candidates(x, centres)
    assert idx.shape == (200, 4) and mask[:, :2].all()
    with pytest.raises(ValueError, match="cap"):
        ChartMembership(m=3, cap=2)


@pytest.mark.parametrize("rows", [6, 200])  # torch.cdist's exact path and its expansion
def test_membership_ranks_far_from_the_origin_in_float32(rows):
    """Centres and points near 1000 * (1, ..., 1) in float32: the candidates and regions are
    those of exact float64 distances (no cancellation of |x|^2 against |v|^2), and a point on
    a centre is in that centre's region for every eps."""
    gen = torch.Generator().manual_seed(1)
    centres = 1000.0 + torch.randn(16, 8, generator=gen, dtype=torch.float64)
    x = centres[torch.arange(rows) % 16] + 0.3 * torch.randn(rows, 8, generator=gen).double()
    x[0] = centres[0]  # exactly on a centre
    dist = torch.cdist(x, centres)
    for m, eps in [(1, 0.0), (1, 0.3), (2, 0.3)]:
        idx = ChartMembership(m=m, eps=eps, cap=5).candidates(x.float(), centres.float())[0]
        assert torch.equal(idx, dist.topk(5, largest=False).indices)
        membership = ChartMembership(m=m, eps=eps, cap=16)  # every region member a candidate
        idx, mask = membership.candidates(x.float(), centres.float())
        d_m = dist.sort(-1).values[:, m - 1 : m]
        expected = dist < (1 + eps) * d_m if eps > 0 else dist <= d_m
        expected[torch.arange(rows)[:, None], dist.topk(m, largest=False).indices] = True
        assert torch.equal(membership.regions(x.float(), centres.float()), expected)
        assert bool(membership.regions(x.float(), centres.float())[0, 0])
        assert torch.equal(torch.zeros_like(expected).scatter_(1, idx, mask), expected)


def test_demo_runs(tmp_path, capsys):
    out = tmp_path / "demo.png"
    main(["demo", "--points", "400", "--epochs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 10000
    assert "integral of p over S^2" in printed and "held-out log-likelihood" in printed
    assert "charts learned from the data" in printed
    assert "integral of p over the learned chart images" in printed


def test_sphere_comparison_example_runs(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sphere_atlas_vs_flows.py"
    spec = importlib.util.spec_from_file_location("sphere_atlas_vs_flows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--out", str(tmp_path / "cmp")])
    assert len(rows) == 2 and (tmp_path / "cmp.png").exists()
    # each row's normalization check is 1 to quadrature accuracy
    for row in rows:
        assert abs(float(row.split("|")[3]) - 1) < 1e-3
