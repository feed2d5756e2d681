"""Learning the atlas from data: VQ autoencoder, charts from codes, objective, checkpoints."""

import importlib.util
import pathlib
import sys

import pytest
import torch
from _atlases import randomize_flows
from hypothesis import given
from hypothesis import strategies as st

from atlasdist import AtlasFlow, datasets
from atlasdist.charts import VQAutoencoder
from atlasdist.demo import chart_quadrature
from atlasdist.training import AtlasObjective, fit
from atlasdist.transforms import householder_stiefel, householder_stiefel_raw


def clustered(n=600, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(6, 3, generator=gen)
    return centres.repeat_interleave(n // 6, 0) + 0.1 * torch.randn(n, 3, generator=gen)


def test_vq_training_reduces_quantization_error_and_uses_all_codes():
    x = clustered()
    torch.manual_seed(0)
    vq = VQAutoencoder(3, 6, hidden=(32,))
    before = vq.quantization_error(x)
    history = vq.fit(x, epochs=40, batch_size=64, seed=0, progress=False, lr=3e-3)
    assert history["quantization_error"][-1] < 0.5 * before
    assert history["codes_used"][-1] == 6
    # each cluster maps to one code
    labels = vq.assign(x).reshape(6, -1)
    assert all(len(row.unique()) == 1 for row in labels)
    assert len(labels[:, 0].unique()) == 6


def test_dead_codes_are_revived():
    x = clustered()
    torch.manual_seed(0)
    vq = VQAutoencoder(3, 4, hidden=(16,))
    with torch.no_grad():
        vq.codebook.fill_(1e3)  # nothing is near the codes: all dead
    revived = vq.revive_dead_codes(x, torch.zeros(4, dtype=torch.long))
    assert revived == 4
    # Every code now sits on an encoded point. The direct distance: cdist's default
    # matrix-multiply form loses ~3e-4 to cancellation in float32.
    exact = "donot_use_mm_for_euclid_dist"
    gap = torch.cdist(vq.codebook, vq.encode(x), compute_mode=exact).min(-1).values
    assert gap.max() < 1e-5


@given(seed=st.integers(0, 1000))
def test_candidates_contain_the_nearest_centre_in_code_space(seed):
    torch.manual_seed(seed)
    vq = VQAutoencoder(3, 8, hidden=(8,))
    membership = vq.membership(m=2, eps=0.5, cap=4)
    x = torch.randn(64, 3)
    idx, mask = membership.candidates(x, vq.codebook)
    assert torch.equal(idx[:, 0], vq.assign(x)) and mask[:, 0].all()


@given(seed=st.integers(0, 1000), rows=st.integers(2, 7), cols=st.integers(1, 7))
def test_stiefel_raw_reproduces_the_column_space(seed, rows, cols):
    cols = min(rows, cols)
    gen = torch.Generator().manual_seed(seed)
    w = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q
    v = householder_stiefel(householder_stiefel_raw(w), rows, cols)
    torch.testing.assert_close(v @ v.T, w @ w.T)


def circles_atlas(seed=0, charts=4):
    x = datasets.two_circles(800, seed=seed)
    torch.manual_seed(seed)
    vq = VQAutoencoder(2, charts, hidden=(32,))
    vq.fit(x, epochs=15, seed=seed, progress=False)
    return x, AtlasFlow.from_autoencoder(vq, x, 1, m=2, hidden=(16,), layers=1)


def test_end_to_end_fit_assigns_each_circle_to_different_charts():
    x, atlas = circles_atlas()
    val = datasets.two_circles(300, seed=5)
    objective = AtlasObjective(beta=100.0, schedule="manifold-first", manifold_epochs=2)
    history = fit(
        atlas,
        x,
        epochs=12,
        batch_size=64,
        lr=3e-3,
        loss_fn=objective,
        val_data=val,
        seed=0,
        progress=False,
    )
    assert history["val_distance"][-1] < 0.5 * history["val_distance"][0]
    p = atlas.flow()
    _, _, chart = p.project(val)
    left = val[:, 0] < 0
    assert not set(chart[left].tolist()) & set(chart[~left].tolist())
    # samples of a chart stay on one circle
    s, k = p.rsample_with_charts((500,))
    for c in k.unique():
        side = s[k == c][:, 0] < 0
        assert side.all() or (~side).all()


def test_objective_schedule_and_monitor():
    x, atlas = circles_atlas()
    objective = AtlasObjective(beta=50.0, schedule="manifold-first", manifold_epochs=1)
    objective.set_epoch(0)
    terms = objective.terms(atlas, x[:64])
    torch.testing.assert_close(objective(atlas, x[:64]), terms["reconstruction"].mean())
    objective.set_epoch(1)
    torch.testing.assert_close(
        objective(atlas, x[:64]), -terms["log_mix"].mean() + 50.0 * terms["reconstruction"].mean()
    )
    figures = objective.monitor(atlas, x[:64])
    assert set(figures) == {"val_log_prob_thickened", "val_distance"}
    with pytest.raises(ValueError, match="schedule"):
        AtlasObjective(schedule="density-first")


def test_project_and_encode_are_consistent():
    x, atlas = circles_atlas()
    p = atlas.flow()
    terms = p.chart_terms(x[:50])
    proj, dist, chart = p.project(x[:50])
    best = terms["error"].masked_fill(~terms["region"], float("inf")).argmin(-1)
    torch.testing.assert_close(chart, terms["charts"].gather(1, best[:, None])[:, 0])
    z = terms["z"].gather(1, best[:, None, None].expand(-1, 1, 1))[:, 0]
    torch.testing.assert_close(p.decode(z, chart), proj, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist, (proj - x[:50]).norm(dim=-1))
    # projections lie on the support: projecting again changes nothing
    torch.testing.assert_close(p.project(proj)[0], proj, atol=1e-5, rtol=1e-5)


def test_fit_is_reproducible_and_checkpoints_resume_exactly(tmp_path):
    def run(epochs, resume, path):
        x, atlas = circles_atlas()
        objective = AtlasObjective(beta=100.0)
        history = fit(
            atlas,
            x,
            epochs=epochs,
            lr=3e-3,
            loss_fn=objective,
            seed=1,
            checkpoint=path,
            resume=resume,
            progress=False,
        )
        return atlas, history

    full_atlas, full = run(4, False, tmp_path / "full.pt")
    again_atlas, again = run(4, False, tmp_path / "again.pt")
    assert full == again
    run(2, False, tmp_path / "part.pt")
    resumed_atlas, resumed = run(4, True, tmp_path / "part.pt")
    assert resumed["loss"] == full["loss"]
    for key, value in full_atlas.state_dict().items():
        torch.testing.assert_close(resumed_atlas.state_dict()[key], value, rtol=0, atol=0)


def test_toy3d_example_runs(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "toy3d.py"
    spec = importlib.util.spec_from_file_location("toy3d", path)
    toy3d = importlib.util.module_from_spec(spec)
    sys.modules["toy3d"] = toy3d  # dataclasses look their module up there
    spec.loader.exec_module(toy3d)
    rows = toy3d.main(["--quick", "--out", str(tmp_path / "toy3d")])
    assert set(rows) == {"sphere", "interlocked_rings"}
    assert (tmp_path / "toy3d.md").exists() and (tmp_path / "toy3d.png").exists()
    # the distance functions are right on the manifolds
    for name in toy3d.SETS:
        gen, _, _ = datasets.MANIFOLDS[name]
        assert toy3d.distance_to_manifold(name, gen(200, seed=0, dtype=torch.float64)).max() < 1e-3


def learned_atlas(seed, charts=4, m=2, bend=0.3):
    """An atlas built from an (untrained, k-means++ initialised) VQ autoencoder on two circles,
    in float64, with random latent flows and randomly bent (Möbius) charts."""
    x = datasets.two_circles(400, seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    vq = VQAutoencoder(2, charts, hidden=(8,)).double()
    vq.init_codebook(x)
    atlas = randomize_flows(
        AtlasFlow.from_autoencoder(vq, x, 1, m=m, hidden=(8,), layers=2), seed, 0.3
    )
    bends = atlas.charts.specs[0].table("bend")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        bends.copy_(bend * torch.randn(bends.shape, generator=gen, dtype=bends.dtype))
    return atlas


@given(seed=st.integers(0, 2**16), m=st.integers(1, 3))
def test_learned_charts_integrate_to_one_along_the_charts(seed, m):
    """The exact density of an atlas with learned (bent, overlapping) charts: along chart k,
    p(g_k(z)) |g_k'(z)| integrates, with the mass the membership leaves out, to 1."""
    p = learned_atlas(seed, m=m).flow(validate_args=False)
    check = chart_quadrature(p, nodes=4001)
    assert check["integral"] > 0.1  # not vacuous: most mass is counted by log_prob
    total = check["integral"] - check["crossing_excess"] + check["missed"]
    assert abs(total - 1) < 1e-8


def test_a_point_at_a_chart_pole_is_off_that_chart_only():
    """A point at the pole of a chart's left inverse has no coordinates in that chart: the pair
    is marked off the chart (error inf, density 0, z NaN) and values and gradients stay
    finite."""
    atlas = learned_atlas(0, m=4)
    tables = [
        atlas.charts.specs[0].table(name) for name in ("frame", "bend", "log_scale", "shift")
    ]
    with (
        torch.no_grad()
    ):  # chart 0: no scale, no shift, b = (0.5, 0): pole of the inverse at (-2, 0)
        tables[1][0] = torch.tensor([0.5, 0.0])
        tables[2][0] = 0.0
        tables[3][0] = 0.0
    pole = torch.tensor([[-2.0, 0.0]], dtype=torch.float64)
    p = atlas.flow(noise_scale=0.1)
    terms = p.chart_terms(pole)
    at_pole = terms["charts"][0] == 0
    assert at_pole.sum() == 1
    assert terms["error"][0, at_pole].isinf().all() and terms["z"][0, at_pole].isnan().all()
    assert terms["recon"][0, at_pole].isnan().all()
    _, distance, chart = p.project(pole)
    assert torch.isfinite(distance).all() and chart.item() != 0
    assert (terms["log_joint"][0, at_pole] == -float("inf")).all()
    assert torch.isfinite(terms["error"][0, ~at_pole]).all()
    lp = p.log_prob(pole)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    for param in atlas.parameters():
        assert param.grad is None or torch.isfinite(param.grad).all()
