"""Atlases on toy manifolds of known geometry, with random flow parameters, and quadrature
rules over those manifolds (DESIGN.md section 4)."""

from __future__ import annotations

import math

import numpy as np
import torch

from atlasdist import (
    AtlasFlow,
    ChartMembership,
    LearnedCharts,
    PlaneCharts,
    SharedChart,
    SphereCharts,
    TorusCharts,
)
from atlasdist.transforms import (
    ConformalEmbedding,
    InverseStereographic,
    Mobius,
    ProductEmbedding,
    Scale,
    Shift,
    StiefelEmbedding,
)


def randomize_flows(atlas: AtlasFlow, seed: int, scale: float) -> AtlasFlow:
    """Random latent-flow weights of a given size (a range the quadrature resolves)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in atlas.flow_modules.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        atlas.logits.copy_(
            torch.randn(atlas.logits.shape, generator=gen, dtype=atlas.logits.dtype)
        )
    return atlas


def circle(seed: int, scale: float = 0.3) -> AtlasFlow:
    """S^1 covered by inverse stereographic charts from the north and south poles."""
    poles = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    atlas = AtlasFlow.spheres(1, torch.zeros(2, 2), torch.ones(2), poles, hidden=(8,), layers=2)
    return randomize_flows(atlas.double(), seed, scale)


def two_circles(seed: int, scale: float = 0.3) -> AtlasFlow:
    """Two disjoint circles (centres (-2, 0) and (2, 1), radii 1 and 0.5), one chart each;
    one candidate per point (m = 1) suffices since the chart images are disjoint."""
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    radii = torch.tensor([1.0, 0.5])
    poles = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    atlas = AtlasFlow.spheres(
        1, centres, radii, poles, hidden=(8,), layers=2, membership=ChartMembership(m=1)
    )
    # Membership by the circles' centres: every point of a circle is nearest its own centre.
    atlas.centres.copy_(centres)
    return randomize_flows(atlas.double(), seed, scale)


def sphere(seed: int, scale: float = 0.2) -> AtlasFlow:
    """S^2 covered by inverse stereographic charts from two random antipodal poles."""
    gen = torch.Generator().manual_seed(seed)
    pole = torch.randn(3, generator=gen)
    pole = pole / pole.norm()
    atlas = AtlasFlow.spheres(
        2, torch.zeros(2, 3), torch.ones(2), torch.stack([pole, -pole]), hidden=(8,), layers=1
    )
    return randomize_flows(atlas.double(), seed, scale)


def torus(seed: int, scale: float = 0.2) -> AtlasFlow:
    """The flat torus S^1 x S^1 in R^4, one product chart of two stereographic circles."""
    embedding = ProductEmbedding([InverseStereographic(1), InverseStereographic(1)])
    atlas = AtlasFlow(
        4,
        2,
        1,
        context=torch.eye(1),
        embedding=embedding,
        hidden=(8,),
        layers=1,
        learn_centres=False,
        centres=torch.zeros(1, 4),
    )
    return randomize_flows(atlas.double(), seed, scale)


def tori(seed: int, scale: float = 0.2) -> AtlasFlow:
    """The flat torus S^1 x S^1 in R^4 covered by two product charts (AtlasFlow.tori) whose
    random poles differ in both angles."""
    gen = torch.Generator().manual_seed(seed)
    first = 2 * math.pi * torch.rand(2, generator=gen, dtype=torch.float64)
    poles = torch.stack([first, first + math.pi / 2 + torch.rand(2, generator=gen).double()])
    atlas = AtlasFlow.tori(poles, hidden=(8,), layers=1)
    return randomize_flows(atlas, seed, scale)


def conformal_chart(seed: int, scale: float = 0.2) -> AtlasFlow:
    """One learned conformal chart of R^2 into R^3: a random plane bent into a sphere by a
    Möbius map whose pole is off the plane, then scaled and shifted."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    normal = q[:, 2]
    b = 0.15 * q[:, :2] @ torch.randn(2, generator=gen, dtype=torch.float64) + 0.25 * normal
    embedding = ConformalEmbedding(
        [
            StiefelEmbedding(2, 3, weight=q[:, :2].contiguous()),
            Mobius(3, raw=b),
            Scale(3, log_scale=torch.tensor(0.3 * torch.randn(1, generator=gen).item())),
            Shift(3, shift=0.5 * torch.randn(3, generator=gen, dtype=torch.float64)),
        ]
    )
    atlas = AtlasFlow(
        3,
        2,
        1,
        context=torch.eye(1),
        embedding=embedding.double(),
        hidden=(8,),
        layers=1,
        learn_centres=False,
        centres=torch.zeros(1, 3),
    )
    return randomize_flows(atlas.double(), seed, scale), embedding


# -- quadrature -------------------------------------------------------------------------------


def circle_points(n: int, centre=(0.0, 0.0), radius: float = 1.0):
    """Periodic trapezoid rule on a circle: points (n, 2) and arc-length weights (n,)."""
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * math.pi / n)
    x = torch.stack([theta.cos(), theta.sin()], -1) * radius + torch.tensor(centre).double()
    return x, torch.full((n,), 2 * math.pi * radius / n, dtype=torch.float64)


def sphere_points(n_theta: int, n_phi: int):
    """Gauss-Legendre in cos(theta) times the periodic rule in phi on S^2: points and
    surface-area weights (sum 4 pi)."""
    t, w = np.polynomial.legendre.leggauss(n_theta)
    t, w = torch.from_numpy(t), torch.from_numpy(w)
    phi = (torch.arange(n_phi, dtype=torch.float64) + 0.5) * (2 * math.pi / n_phi)
    ct, ph = torch.meshgrid(t, phi, indexing="ij")
    st = (1 - ct**2).sqrt()
    x = torch.stack([st * ph.cos(), st * ph.sin(), ct], -1).reshape(-1, 3)
    weights = w[:, None] * torch.full((n_phi,), 2 * math.pi / n_phi, dtype=torch.float64)
    return x, weights.reshape(-1)


def torus_points(n: int):
    """Product trapezoid rule on S^1 x S^1 in R^4 (flat area element)."""
    c, wc = circle_points(n)
    x = torch.cat([c.repeat_interleave(n, 0), c.repeat(n, 1)], -1)
    return x, wc.repeat_interleave(n) * wc.repeat(n)


def integrate(atlas: AtlasFlow, points: torch.Tensor, weights: torch.Tensor, chunk: int = 20000):
    p = atlas.flow(validate_args=True)
    with torch.no_grad():
        dens = torch.cat([p.log_prob(c).exp() for c in points.split(chunk)])
    return float((dens * weights).sum())


# -- chart specs --------------------------------------------------------------------------------
# name -> builder(K, seed) of a chart spec with K charts and random parameters (float64). Every
# spec is tested by tests/test_chart_specs.py: a new kind of chart is tested by adding one line.


def _unit(gen, *shape):
    v = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _sphere_charts(K, seed, d=1):
    gen = torch.Generator().manual_seed(seed)
    return SphereCharts(
        torch.randn(K, d + 1, generator=gen, dtype=torch.float64),
        0.5 + torch.rand(K, generator=gen, dtype=torch.float64),
        _unit(gen, K, d + 1),
    )


def _plane_charts(K, seed, d=2, D=4):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(K, D, d, generator=gen, dtype=torch.float64)
    charts = PlaneCharts(
        torch.randn(K, D, generator=gen, dtype=torch.float64),
        frames,
        0.5 + torch.rand(K, generator=gen, dtype=torch.float64),
    )
    with torch.no_grad():  # bend the planes (Möbius b_k), away from the inputs' poles
        charts.table("bend").copy_(0.1 * torch.randn(K, D, generator=gen, dtype=torch.float64))
    return charts


def _learned_charts(K, seed, d=2, D=5):
    torch.manual_seed(seed)
    charts = LearnedCharts(K, d, D, context_features=3, hidden=(8,)).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in charts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return charts


def _shared_torus(K, seed):
    gen = torch.Generator().manual_seed(seed)
    poles = _unit(gen, 2, 2)
    torus = ProductEmbedding(
        [InverseStereographic(1, pole=poles[0]), InverseStereographic(1, pole=poles[1])]
    )
    return SharedChart(torus.double(), K)


CHART_SPECS = {
    "SphereCharts(circle)": _sphere_charts,
    "SphereCharts(sphere)": lambda K, seed: _sphere_charts(K, seed, d=2),
    "PlaneCharts": _plane_charts,
    "LearnedCharts": _learned_charts,
    "SharedChart(torus)": _shared_torus,
    "TorusCharts": lambda K, seed: TorusCharts(
        6.2 * torch.rand(K, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ),
}
