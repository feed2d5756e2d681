r"""Toy manifolds with known geometry and intrinsic dimension, generated in code (no download).

Every generator draws points exactly on its manifold and then adds isotropic Gaussian noise
of standard deviation ``noise`` in the ambient space. Signature:
``generator(n, noise=0.0, seed=None, dtype=None) -> Tensor (n, D)``. :data:`MANIFOLDS` maps each
name to ``(generator, D, d)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "two_circles",
    "two_circles_log_prob",
    "two_circles_entropy",
    "sphere",
    "torus",
    "swiss_roll",
    "helix",
    "trefoil_knot",
    "interlocked_rings",
    "sinusoid",
    "MANIFOLDS",
]


# The default two circles, shared by the generator, its density and its entropy.
_CIRCLE_CENTRES = ((-1.5, 0.0), (1.5, 0.0))
_CIRCLE_RADII = (1.0, 0.5)


def _gen(seed):
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _finish(x: torch.Tensor, noise: float, gen, dtype) -> torch.Tensor:
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    x = x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x.to(dtype or torch.get_default_dtype())


def _von_mises(n, loc, concentration, gen):
    # Best & Fisher's rejection sampler, vectorized (torch's VonMises takes no generator).
    tau = 1 + math.sqrt(1 + 4 * concentration**2)
    rho = (tau - math.sqrt(2 * tau)) / (2 * concentration)
    r = (1 + rho**2) / (2 * rho)
    out = torch.empty(0, dtype=torch.float64)
    while len(out) < n:
        u1, u2, u3 = torch.rand(3, 2 * n, generator=gen, dtype=torch.float64)
        z = torch.cos(math.pi * u1)
        f = (1 + r * z) / (r + z)
        c = concentration * (r - f)
        ok = (c * (2 - c) - u2 > 0) | (torch.log(c / u2) + 1 - c >= 0)
        theta = torch.sign(u3 - 0.5) * torch.acos(f)
        out = torch.cat([out, theta[ok]])
    return (out[:n] + loc + math.pi).remainder(2 * math.pi) - math.pi


def two_circles(
    n: int,
    noise: float = 0.0,
    seed: int | None = None,
    dtype=None,
    centres=_CIRCLE_CENTRES,
    radii=_CIRCLE_RADII,
    concentration: float = 1.0,
) -> torch.Tensor:
    """Two disjoint circles in R^2 (d = 1), half of the points on each, angles von Mises
    distributed (mean angle 0 and pi/2, ``concentration``) so the density is not uniform."""
    gen = _gen(seed)
    first = torch.rand(n, generator=gen) < 0.5
    locs = torch.where(first, 0.0, math.pi / 2).double()
    theta = _von_mises(n, 0.0, concentration, gen) + locs
    centres = torch.tensor(centres, dtype=torch.float64)
    radii = torch.tensor(radii, dtype=torch.float64)
    idx = (~first).long()
    x = centres[idx] + radii[idx, None] * torch.stack([theta.cos(), theta.sin()], -1)
    return _finish(x, noise, gen, dtype)


def two_circles_log_prob(
    x: torch.Tensor,
    centres=_CIRCLE_CENTRES,
    radii=_CIRCLE_RADII,
    concentration: float = 1.0,
) -> torch.Tensor:
    r"""The true log density of :func:`two_circles` (w.r.t. arc length) at points ``x``
    :math:`(N, 2)`, each taken at its angle on the nearer circle:
    :math:`\log \tfrac12 + \log \mathrm{vM}(\theta - \mu_i; \kappa) - \log r_i`."""
    from scipy.special import i0e

    centres = torch.tensor(centres, dtype=x.dtype, device=x.device)
    radii = torch.tensor(radii, dtype=x.dtype, device=x.device)
    gap = ((x[:, None] - centres).norm(dim=-1) - radii).abs()
    i = gap.argmin(-1)
    rel = x - centres[i]
    theta = torch.atan2(rel[:, 1], rel[:, 0]) - torch.where(i == 1, math.pi / 2, 0.0)
    k = concentration
    log_vm = k * (theta.cos() - 1) - math.log(2 * math.pi * i0e(k))
    return math.log(0.5) + log_vm - radii[i].log()


def two_circles_entropy(radii=_CIRCLE_RADII, concentration: float = 1.0) -> float:
    r""":math:`E[\log p(x)]` of :func:`two_circles` (w.r.t. arc length): the best held-out
    log-likelihood a model can reach on it."""
    from scipy.special import i0e, i1e

    k = concentration
    vm = -math.log(2 * math.pi * i0e(k)) - k + k * i1e(k) / i0e(k)
    return math.log(0.5) + vm - sum(math.log(r) for r in radii) / 2


def sphere(
    n: int,
    noise: float = 0.0,
    seed: int | None = None,
    dtype=None,
    dim: int = 2,
    clusters: int = 3,
    spread: float = 0.5,
    centres_seed: int = 0,
) -> torch.Tensor:
    r"""The unit sphere :math:`S^{dim} \subset \mathbb{R}^{dim+1}` with a mixture of
    ``clusters`` projected-normal clusters (directions :math:`(\mu_j + s\,\epsilon)/|\cdot|`).

    The cluster directions :math:`\mu_j` are fixed by ``centres_seed``, not by ``seed``: draws
    with different seeds (a training and a held-out set) come from the same distribution."""
    means = torch.randn(clusters, dim + 1, generator=_gen(centres_seed), dtype=torch.float64)
    means = means / means.norm(dim=-1, keepdim=True)
    gen = _gen(seed)
    j = torch.randint(clusters, (n,), generator=gen)
    x = means[j] + spread * torch.randn(n, dim + 1, generator=gen, dtype=torch.float64)
    return _finish(x / x.norm(dim=-1, keepdim=True), noise, gen, dtype)


def torus(
    n: int, noise: float = 0.0, seed: int | None = None, dtype=None, R: float = 1.0, r: float = 0.4
) -> torch.Tensor:
    """A ring torus in R^3 (d = 2) with major radius ``R`` and minor radius ``r``; angles
    uniform in the parameters (not in area)."""
    gen = _gen(seed)
    u, v = 2 * math.pi * torch.rand(2, n, generator=gen, dtype=torch.float64)
    ring = R + r * v.cos()
    x = torch.stack([ring * u.cos(), ring * u.sin(), r * v.sin()], -1)
    return _finish(x, noise, gen, dtype)


def swiss_roll(n: int, noise: float = 0.0, seed: int | None = None, dtype=None) -> torch.Tensor:
    """A Swiss roll in R^3 (d = 2): t in [1.5 pi, 4.5 pi], height in [-1, 1], scaled by 1/6."""
    gen = _gen(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=gen, dtype=torch.float64))
    h = 2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1
    x = torch.stack([t * t.cos() / 6, h, t * t.sin() / 6], -1)
    return _finish(x, noise, gen, dtype)


def helix(
    n: int, noise: float = 0.0, seed: int | None = None, dtype=None, turns: float = 2.0
) -> torch.Tensor:
    """A helix of radius 1 and ``turns`` turns in R^3 (d = 1), height in [-1, 1]."""
    gen = _gen(seed)
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    a = 2 * math.pi * turns * t
    x = torch.stack([a.cos(), a.sin(), 2 * t - 1], -1)
    return _finish(x, noise, gen, dtype)


def trefoil_knot(n: int, noise: float = 0.0, seed: int | None = None, dtype=None):
    """The trefoil knot in R^3 (d = 1), scaled to radius about 1."""
    gen = _gen(seed)
    t = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.stack([t.sin() + 2 * (2 * t).sin(), t.cos() - 2 * (2 * t).cos(), -(3 * t).sin()], -1)
    return _finish(x / 3, noise, gen, dtype)


def interlocked_rings(n: int, noise: float = 0.0, seed: int | None = None, dtype=None):
    """Two linked unit circles in R^3 (d = 1): one in the xy-plane centred at the origin,
    one in the xz-plane centred at (1, 0, 0)."""
    gen = _gen(seed)
    t = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    first = torch.rand(n, generator=gen) < 0.5
    a = torch.stack([t.cos(), t.sin(), torch.zeros_like(t)], -1)
    b = torch.stack([1 + t.cos(), torch.zeros_like(t), t.sin()], -1)
    return _finish(torch.where(first[:, None], a, b), noise, gen, dtype)


def sinusoid(n: int, noise: float = 0.0, seed: int | None = None, dtype=None) -> torch.Tensor:
    """The curve x2 = sin(2 x1), x1 ~ N(0, 1), in R^2 (d = 1) (reference/001, 002)."""
    gen = _gen(seed)
    x1 = torch.randn(n, generator=gen, dtype=torch.float64)
    return _finish(torch.stack([x1, (2 * x1).sin()], -1), noise, gen, dtype)


MANIFOLDS = {
    "two_circles": (two_circles, 2, 1),
    "sphere": (sphere, 3, 2),
    "torus": (torus, 3, 2),
    "swiss_roll": (swiss_roll, 3, 2),
    "helix": (helix, 3, 1),
    "trefoil_knot": (trefoil_knot, 3, 1),
    "interlocked_rings": (interlocked_rings, 3, 1),
    "sinusoid": (sinusoid, 2, 1),
}
