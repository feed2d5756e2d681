"""The shipped real data: the earth sets on S^2, the RNA torsion angles on T^7 and the split."""

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from atlasdist import datasets
from atlasdist.transforms import InverseStereographic, ProductEmbedding

# Rows per set: the table of /work/shared/data/README.md (and PROVENANCE.md).
ROWS = {"volcano": 827, "earthquake": 6120, "flood": 4875, "fire": 12809}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_earth_sets_are_complete_finite_and_in_range(name):
    lat_lon = datasets.earth_lat_lon(name)
    assert lat_lon.shape == (ROWS[name], 2) and lat_lon.dtype == torch.float64
    assert torch.isfinite(lat_lon).all()
    lat, lon = lat_lon.unbind(-1)
    assert ((lat >= -90) & (lat <= 90)).all() and ((lon >= -180) & (lon <= 180)).all()
    # Not a constant or a column swap: both coordinates spread over their range.
    assert float(lat.std()) > 10 and float(lon.std()) > 30
    x = datasets.earth(name, dtype=torch.float64)
    assert x.shape == (ROWS[name], 3)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(len(x), dtype=torch.float64))
    torch.testing.assert_close(datasets.unit_to_lat_lon(x), lat_lon, rtol=0, atol=1e-9)


def test_earth_first_rows_are_the_files_first_rows():
    """Comment and header lines skipped, the first data row kept (one per file layout)."""
    first = {
        "volcano": (-30.2, -178.47),
        "flood": (35.8142, 5.23026),
        "fire": (-25.088, 152.358),
    }
    for name, row in first.items():
        torch.testing.assert_close(
            datasets.earth_lat_lon(name)[0], torch.tensor(row, dtype=torch.float64)
        )


def test_earth_geographic_convention_and_dtypes():
    poles = torch.tensor([[90.0, 0.0], [0.0, 0.0], [0.0, 90.0], [-45.0, 180.0]])
    expected = torch.tensor(
        [[0, 0, 1], [1, 0, 0], [0, 1, 0], [-(0.5**0.5), 0, -(0.5**0.5)]], dtype=torch.float32
    )
    torch.testing.assert_close(datasets.lat_lon_to_unit(poles), expected)
    assert datasets.earth("volcano").dtype == torch.get_default_dtype()
    x32 = datasets.earth("volcano", dtype=torch.float32)
    torch.testing.assert_close(x32, datasets.earth("volcano", torch.float64).float())


def test_earth_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="volcano"):
        datasets.earth("volcanoes")


def test_rna_angles_and_their_flat_torus_points():
    angles = datasets.rna_angles(torch.float64)
    assert angles.shape == (9478, 7) and torch.isfinite(angles).all()
    assert float(angles.min()) >= -math.pi and float(angles.max()) < math.pi
    # First row of the file, degrees -> radians.
    first = torch.tensor(
        [-69.168933, 173.922722, 51.484039, 80.803534, -62.903735, 10.972630, -167.619661],
        dtype=torch.float64,
    )
    torch.testing.assert_close(angles[0], torch.deg2rad(first))
    x = datasets.rna(torch.float64)
    assert x.shape == (9478, 14)
    torch.testing.assert_close(x[:, 0::2], angles.cos())
    torch.testing.assert_close(x[:, 1::2], angles.sin())
    torch.testing.assert_close(datasets.flat_torus_angles(x), angles)
    assert datasets.rna().dtype == torch.get_default_dtype()


def test_rna_points_lie_on_the_product_of_circle_charts():
    """The points are in the image of the library's torus embedding (seven circle charts)."""
    x = datasets.rna(torch.float64)
    torus = ProductEmbedding([InverseStereographic(1) for _ in range(7)]).double()
    torch.testing.assert_close(torus(torus.inv(x)), x)


def test_flat_torus_angles_rejects_an_odd_width():
    with pytest.raises(ValueError, match="even"):
        datasets.flat_torus_angles(torch.zeros(3, 5))


@pytest.mark.parametrize("n", [10, 827, 4875, 6120, 12809])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_the_literature_protocol(n, seed):
    """default_rng(seed).permutation cut into N - 2 (N // 10), N // 10 and N // 10 rows."""
    parts = datasets.split(torch.arange(n), seed)
    assert [len(p) for p in parts] == [n - 2 * (n // 10), n // 10, n // 10]
    perm = np.random.default_rng(seed).permutation(n)
    assert torch.equal(torch.cat(parts), torch.from_numpy(perm))
    arrays = datasets.split(np.arange(n), seed)
    assert all(np.array_equal(a, p.numpy()) for a, p in zip(arrays, parts, strict=True))


def test_split_keeps_rows_and_depends_on_the_seed():
    x = datasets.earth("volcano", torch.float64)
    train, val, test = datasets.split(x, seed=0)
    assert train.shape[1:] == x.shape[1:]
    assert not torch.equal(datasets.split(x, seed=1)[2], test)
    assert torch.equal(datasets.split(x, seed=0)[2], test)
    parts = datasets.split(x, seed=0, fractions=(0.5, 0.5))
    assert [len(p) for p in parts] == [414, 413]


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.9, 0.2, -0.1), (1.0, 0.0), ()])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        datasets.split(torch.arange(10), 0, fractions)


def test_split_rejects_a_non_integer_seed():
    with pytest.raises(TypeError, match="seed"):
        datasets.split(torch.arange(10), 0.5)


@pytest.mark.parametrize("module", ["atlasdist.datasets.real", "atlasdist.datasets.splits"])
def test_docstring_examples_run(module):
    result = doctest.testmod(
        importlib.import_module(module), extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 0 and result.failed == 0


def _benchmark():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "earth.py"
    spec = importlib.util.spec_from_file_location("earth_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kappa", [3.0, 50.0, 800.0])
def test_benchmark_kernel_densities_are_normalized(kappa):
    """The baselines' densities integrate to 1: vMF on S^2 (quadrature), von Mises on S^1."""
    from atlasdist.demo import sphere_quadrature

    bench = _benchmark()
    centres = datasets.earth("volcano", torch.float64)[:5]
    points, weights = sphere_quadrature(400 if kappa > 100 else 200, 800 if kappa > 100 else 400)
    p = bench.kernel_log_prob(points, centres, kappa, bench.vmf_log_norm).exp()
    assert abs(float((p * weights).sum()) - 1) < 1e-6
    theta = (torch.arange(20000, dtype=torch.float64) + 0.5) * (2 * math.pi / 20000)
    circle = datasets.flat_torus(theta[:, None])
    centres = datasets.flat_torus(torch.tensor([[0.3], [2.0]], dtype=torch.float64))
    log_norm = lambda k: bench.von_mises_log_norm(k, dims=1)  # noqa: E731
    p = bench.kernel_log_prob(circle, centres, kappa, log_norm).exp()
    assert abs(float(p.sum()) * 2 * math.pi / 20000 - 1) < 1e-6


def test_benchmark_quick_mode_runs(tmp_path):
    bench = _benchmark()
    out = tmp_path / "earth"
    results = bench.main(
        ["--quick", "--subset", "300", "--dataset", "volcano", "rna", "--out", str(out)]
    )
    for name in ("volcano", "rna"):
        rows = results[name][0]
        assert len(rows) == 3 and all(math.isfinite(nll) for nll, _, _ in rows.values())
    table = (tmp_path / "earth.md").read_text()
    assert "Moser flow (published) | -4.21" in table and "vMF kernel density (this run)" in table
    assert "product von Mises mixture" in table
    assert (tmp_path / "earth_volcano.png").stat().st_size > 10000


def _torus_grid(n):
    t = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * math.pi / n) - math.pi
    return torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tori_atlas_is_normalized_on_the_flat_torus(seed):
    """``AtlasFlow.tori``: the mixture over all K product charts integrates to 1 w.r.t.
    d theta_1 d theta_2 (midpoint rule on a 300 x 300 grid; the splines make the density C^1
    only, and the rule's error measured on these draws is at most 3.5e-4)."""
    from atlasdist import AtlasFlow

    gen = torch.Generator().manual_seed(seed)
    K = 1 + seed
    poles = (torch.rand(K, 2, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    torch.manual_seed(seed)
    atlas = AtlasFlow.tori(poles, layers=1, hidden=(8,), count_bins=4)
    with torch.no_grad():
        for parameter in atlas.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        atlas.logits.normal_()
        log_p = atlas().log_prob(datasets.flat_torus(_torus_grid(300)))
    assert abs(float(log_p.exp().sum()) * (2 * math.pi / 300) ** 2 - 1) < 2e-3


def test_tori_atlas_covers_each_charts_poles():
    """A point with an angle at a chart's pole is off that chart's image (a one-chart atlas
    refuses it) but inside the other chart's, so the two-chart mixture's log-density there is
    finite and the limit of its values as the angle approaches the pole."""
    from atlasdist import AtlasFlow

    poles = torch.tensor([[0.3, -1.0], [0.3 + math.pi, 2.0]], dtype=torch.float64)
    torch.manual_seed(0)
    atlas = AtlasFlow.tori(poles, layers=1, hidden=(8,), count_bins=4)
    angles = torch.tensor([[0.3, 0.5], [1.0, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        log_p = atlas().log_prob(datasets.flat_torus(angles))
        assert torch.isfinite(log_p).all()
        for step in (1e-3, -1e-5):
            near = atlas().log_prob(datasets.flat_torus(angles + step))
            torch.testing.assert_close(near, log_p, rtol=0, atol=100 * abs(step))
    one_chart = AtlasFlow.tori(poles[:1], layers=1, hidden=(8,), count_bins=4)
    with pytest.raises(ValueError, match="off the model's support"):
        one_chart().log_prob(datasets.flat_torus(angles[:1]))


@pytest.mark.parametrize(
    "poles, error",
    [
        (torch.zeros(3), ValueError),
        (torch.zeros(0, 2), ValueError),
        (torch.zeros(2, 3, dtype=torch.long), TypeError),
        (torch.tensor([[0.0, math.nan]]), ValueError),
    ],
)
def test_tori_rejects_bad_poles(poles, error):
    from atlasdist import AtlasFlow

    with pytest.raises(error, match="poles"):
        AtlasFlow.tori(poles)


def test_benchmark_sparse_poles_are_separated_and_in_empty_arcs():
    bench = _benchmark()
    angles = datasets.rna_angles(torch.float64)[:2000]
    poles = bench.sparse_poles(angles, 3, bins=72, separation=math.pi / 2)
    assert poles.shape == (3, 7)
    for a in range(3):
        for b in range(a):
            gap = torch.remainder(poles[a] - poles[b] + math.pi, 2 * math.pi) - math.pi
            assert (gap.abs() >= math.pi / 2 - 1e-9).all()
    # chart 0's pole is the centre of an emptiest arc of each angle
    idx = ((angles + math.pi) / (2 * math.pi) * 72).long().clamp(0, 71)
    counts = torch.stack([torch.bincount(idx[:, j], minlength=72) for j in range(7)])
    arc = ((poles[0] + math.pi) / (2 * math.pi) * 72).long()
    assert (counts.gather(1, arc[:, None]).squeeze(1) == counts.min(1).values).all()


@pytest.mark.parametrize(
    "coupling, nodes", [("affine", 200), ("spline", 200), ("spline_coupling", 600)]
)
def test_sphere_atlas_with_every_coupling_is_normalized(coupling, nodes):
    """The benchmark's earth atlas (two stereographic charts, ``default_latent_flow`` with
    ``coupling``) integrates to 1 w.r.t. the area of S^2 after a perturbation of its
    parameters (Gauss-Legendre x periodic rule, n x 2n nodes; its error measured on these
    draws: 5e-5 affine, 6e-7 spline at n = 200; the spline coupling's sharper density
    3e-3, 3e-4, 2e-5 at n = 200, 400, 600)."""
    from atlasdist.demo import sphere_quadrature

    torch.manual_seed(1)
    atlas = _benchmark().sphere_atlas(2, (16,), 6, coupling).double()
    with torch.no_grad():
        for parameter in atlas.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        points, weights = sphere_quadrature(nodes, 2 * nodes)
        mass = float((atlas().log_prob(points).exp() * weights).sum())
    assert abs(mass - 1) < 5e-4


def test_default_latent_flow_rejects_an_unknown_coupling():
    from atlasdist.atlas import default_latent_flow

    with pytest.raises(ValueError, match="coupling must be 'affine', 'spline' or 'spline_co"):
        default_latent_flow(2, 2, coupling="additive")
