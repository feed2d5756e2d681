"""Every atlas density integrates to one on toy manifolds of known geometry (quadrature),
for random flow parameters drawn by Hypothesis in a range the quadrature resolves."""

import _atlases as A
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasdist.geometry import log_volume_ratio

seeds = st.integers(0, 2**20)
TOL = 1e-3


@given(seed=seeds)
def test_circle_two_stereographic_charts(seed):
    atlas = A.circle(seed)
    x, w = A.circle_points(40000)
    assert abs(A.integrate(atlas, x, w) - 1) <= TOL


@given(seed=seeds)
def test_two_disjoint_circles(seed):
    atlas = A.two_circles(seed)
    xa, wa = A.circle_points(40000, (-2.0, 0.0), 1.0)
    xb, wb = A.circle_points(40000, (2.0, 1.0), 0.5)
    total = A.integrate(atlas, xa, wa) + A.integrate(atlas, xb, wb)
    assert abs(total - 1) <= TOL


@settings(max_examples=5)
@given(seed=seeds)
def test_sphere_two_stereographic_charts(seed):
    atlas = A.sphere(seed)
    x, w = A.sphere_points(200, 400)
    assert abs(A.integrate(atlas, x, w) - 1) <= TOL


@settings(max_examples=5)
@given(seed=seeds)
def test_torus_product_chart(seed):
    atlas = A.torus(seed)
    x, w = A.torus_points(300)
    assert abs(A.integrate(atlas, x, w) - 1) <= TOL


@settings(max_examples=5)
@given(seed=seeds)
def test_learned_conformal_chart_over_latent_coordinates(seed):
    """Integrates over the embedding's latent coordinates u with the autodiff Gram
    determinant as the area element: the integral of p over the chart image."""
    atlas, embedding = A.conformal_chart(seed)
    n, half = 500, 9.0
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half / n) - half
    u = torch.cartesian_prod(grid, grid)
    area = log_volume_ratio(embedding, u).exp() * (2 * half / n) ** 2
    with torch.no_grad():
        x = embedding(u)
        p = atlas.flow(validate_args=True)
        dens = torch.cat([p.log_prob(c).exp() for c in x.split(50000)])
    assert abs(float((dens * area).sum()) - 1) <= TOL
