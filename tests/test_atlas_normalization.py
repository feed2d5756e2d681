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
    """The latent splines' second derivative jumps at their knots, so the density has kinks
    and the periodic rule converges as h^2, not spectrally: 300 points per angle missed by
    1.04e-3 on one draw (converging to 1: 1e-4, 4e-5, 9e-6 at 600, 1200, 2400); 600 points
    missed by 1.2e-4 at most over 31 draws."""
    atlas = A.torus(seed)
    x, w = A.torus_points(600)
    assert abs(A.integrate(atlas, x, w) - 1) <= TOL


@settings(max_examples=5)
@given(seed=seeds)
def test_learned_conformal_chart_over_latent_coordinates(seed):
    """Integrates p over the chart image in the coordinates z of the base distribution,
    x = g(z) = c(h(z)) (``decode``), with the autodiff Gram determinant of the whole map as
    the area element. The integrand is then smooth (it is the standard normal density when
    ``log_prob`` is right), so a midpoint grid is exact to ~1e-15 (measured) and the test holds
    it to 1e-9. (In the embedding's coordinates u = h(z), a 500 x 500 grid on [-9, 9]^2 missed
    by 2e-3 on a sharp draw of the random latent flow, converging to 1e-5 only at 4x the
    points per axis.)"""
    atlas, _ = A.conformal_chart(seed)
    p = atlas.flow(validate_args=True)
    n, half = 400, 8.0
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half / n) - half
    z = torch.cartesian_prod(grid, grid)

    def decode(v):
        return p.decode(v, torch.zeros(v.shape[:-1], dtype=torch.long))

    area = log_volume_ratio(decode, z).detach().exp() * (2 * half / n) ** 2
    with torch.no_grad():
        dens = torch.cat([p.log_prob(c).exp() for c in decode(z).split(50000)])
    assert abs(float((dens * area).sum()) - 1) <= 1e-9
