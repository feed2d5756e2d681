"""``python -m atlasdist demo``: fit atlases to points on the sphere S^2 and on two disjoint
circles, print held-out log-likelihoods and a numerical normalization check, and write a PNG
of samples coloured by chart."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from . import datasets
from .atlas import AtlasFlow
from .charts import ChartMembership, kmeans
from .training import fit

__all__ = ["main", "sphere_quadrature", "circle_quadrature", "fit_circle"]


def sphere_quadrature(n_theta: int = 200, n_phi: int = 400, dtype=torch.float64):
    """Gauss-Legendre in cos(theta) times the periodic rule in phi: points on S^2 (N, 3) and
    area weights (N,) summing to 4 pi."""
    t, w = np.polynomial.legendre.leggauss(n_theta)
    t, w = torch.from_numpy(t).to(dtype), torch.from_numpy(w).to(dtype)
    phi = (torch.arange(n_phi, dtype=dtype) + 0.5) * (2 * math.pi / n_phi)
    ct, ph = torch.meshgrid(t, phi, indexing="ij")
    st = (1 - ct**2).sqrt()
    x = torch.stack([st * ph.cos(), st * ph.sin(), ct], -1).reshape(-1, 3)
    return x, (w[:, None] * (2 * math.pi / n_phi)).expand(n_theta, n_phi).reshape(-1)


def circle_quadrature(centre: torch.Tensor, radius: float, n: int = 20000):
    """Periodic trapezoid rule on a circle: points (n, 2) and arc-length weights (n,)."""
    theta = (torch.arange(n, dtype=centre.dtype) + 0.5) * (2 * math.pi / n)
    x = centre + radius * torch.stack([theta.cos(), theta.sin()], -1)
    return x, torch.full((n,), 2 * math.pi * radius / n, dtype=centre.dtype)


def fit_circle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algebraic (Kasa) least-squares circle through points (N, 2): centre (2,), radius ()."""
    a = torch.cat([2 * x, torch.ones_like(x[:, :1])], -1).double()
    b = x.double().pow(2).sum(-1, keepdim=True)
    sol = torch.linalg.lstsq(a, b).solution[:, 0]
    centre = sol[:2]
    radius = (sol[2] + centre.pow(2).sum()).sqrt()
    return centre.to(x.dtype), radius.to(x.dtype)


def _integral(p, points, weights):
    with torch.no_grad():
        return float(
            sum(
                (p.log_prob(c).exp() * w).sum()
                for c, w in zip(points.split(20000), weights.split(20000), strict=True)
            )
        )


def _sphere_part(n, epochs, seed):
    x = datasets.sphere(n, seed=seed)
    train, test = x[: int(0.8 * n)], x[int(0.8 * n) :]
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    atlas = AtlasFlow.spheres(2, torch.zeros(2, 3), torch.ones(2), poles, hidden=(32, 32))
    history = fit(atlas, train, epochs=epochs, batch_size=256, lr=5e-3, seed=seed)
    p = atlas.flow()
    with torch.no_grad():
        held_out = float(p.log_prob(test).mean())
    integral = _integral(atlas.double().flow(), *sphere_quadrature())
    atlas.float()
    print(f"sphere S^2 ({len(train)} train / {len(test)} held-out points, 2 stereographic charts)")
    uniform = -math.log(4 * math.pi)
    print(f"  held-out log-likelihood  {held_out:8.4f} nats/point (uniform: {uniform:.4f})")
    print(f"  integral of p over S^2   {integral:.6f}  (Gauss-Legendre x trapezoid, 80k nodes)")
    return atlas, test, history


def _circles_part(n, epochs, seed):
    x = datasets.two_circles(n, seed=seed)
    train, test = x[: int(0.8 * n)], x[int(0.8 * n) :]
    # Chart geometry from the data: k-means clusters and an algebraic circle fit to each.
    # A stereographic chart misses its pole, so each circle gets two charts with opposite
    # poles: together they cover it, and the mixture can put mass everywhere on it.
    _, labels = kmeans(train, 2, generator=torch.Generator().manual_seed(seed))
    fits = [fit_circle(train[labels == k]) for k in range(2)]
    centres = torch.stack([c for c, _ in fits]).repeat_interleave(2, 0)
    radii = torch.stack([r for _, r in fits]).repeat_interleave(2)
    poles = torch.tensor([[0.0, 1.0], [0.0, -1.0]]).repeat(2, 1)
    atlas = AtlasFlow.spheres(
        1, centres, radii, poles, hidden=(32, 32), membership=ChartMembership(m=4)
    )
    history = fit(atlas, train, epochs=epochs, batch_size=256, lr=5e-3, seed=seed)
    p = atlas.flow()
    with torch.no_grad():
        distance = float(p.distance_to_support(test).max())
        held_out = float(p.log_prob(test).mean())
    # Normalization of p over the chart images, the two fitted circles.
    exact64 = atlas.double().flow()
    integral = sum(_integral(exact64, *circle_quadrature(c.double(), float(r))) for c, r in fits)
    atlas.float()
    print(f"two circles ({len(train)} train / {len(test)} held-out points, 4 charts from data)")
    print(f"  largest distance of held-out points to the fitted circles  {distance:.1e}")
    print(
        f"  held-out log-likelihood  {held_out:8.4f} nats/point (w.r.t. arc length; "
        f"the data's own density: {datasets.two_circles_entropy():.4f})"
    )
    print(f"  integral of p over the two circles  {integral:.6f}  (trapezoid, 2 x 20k nodes)")
    return atlas, test, history


def _plot(sphere_atlas, sphere_test, circles_atlas, circles_test, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 4.2))
    with torch.no_grad():
        xs, ks = sphere_atlas.flow().rsample_with_charts((2000,))
        xc, kc = circles_atlas.flow().rsample_with_charts((2000,))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    ax.scatter(*sphere_test[:1000].T, s=2, c="grey")
    ax.set_title("S^2: held-out data")
    ax = fig.add_subplot(1, 3, 2, projection="3d")
    ax.scatter(*xs.T, s=2, c=ks, cmap="coolwarm")
    ax.set_title("S^2: samples coloured by chart")
    ax = fig.add_subplot(1, 3, 3)
    ax.scatter(*circles_test.T, s=2, c="grey", label="held-out data")
    ax.scatter(*xc.T, s=2, c=kc, cmap="coolwarm", label="samples (by chart)")
    ax.set_aspect("equal")
    ax.set_title("two circles")
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m atlasdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit atlases on S^2 and two circles")
    demo.add_argument("--out", default="atlas_demo.png", help="PNG of samples coloured by chart")
    demo.add_argument("--points", type=int, default=4000)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    sphere_atlas, sphere_test, _ = _sphere_part(args.points, args.epochs, args.seed)
    circles_atlas, circles_test, _ = _circles_part(args.points, args.epochs, args.seed)
    _plot(sphere_atlas, sphere_test, circles_atlas, circles_test, args.out)
    print(f"wrote {args.out}  ({time.perf_counter() - start:.0f} s)")
