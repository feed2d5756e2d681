"""``python -m atlasdist demo``: fit an atlas with known charts to points on the sphere S^2,
and an atlas whose charts are learned from the data (VQ autoencoder) to points on two disjoint
circles; print held-out log-likelihoods and numerical normalization checks, and write a PNG of
samples coloured by chart."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from . import datasets
from .atlas import AtlasFlow
from .charts import VQAutoencoder
from .geometry import batched_jacobian
from .manifolds import log_sphere_area
from .training import AtlasObjective, fit

__all__ = ["main", "sphere_quadrature", "chart_quadrature"]


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


def chart_quadrature(p, nodes: int = 20001, bound: float = 9.0) -> dict[str, float]:
    r"""Normalization check of an atlas of 1-D charts, along the charts themselves.

    Chart :math:`k` is the curve :math:`\gamma_k(z) = g_k(z)`, :math:`z \sim q` (the base).
    The trapezoid rule on :math:`z \in [-b, b]` (``bound``) gives

    - ``integral``: :math:`\sum_k \int p(\gamma_k(z))\,|\gamma_k'(z)|\,dz`, the integral of
      ``p.log_prob`` over the union of the chart images (learned images meet in finitely
      many points, a null set);
    - ``missed``: :math:`\sum_k \pi_k \int q(z)\, 1[k \notin C(\gamma_k(z))]\,dz`, the mass
      that chart :math:`k` puts outside its own membership region, which ``log_prob`` does
      not count (see :meth:`~atlasdist.distributions.AtlasFlowDistribution.missed_mass`);
    - ``crossings`` and ``crossing_excess``: the nodes that also lie on a second chart image
      (within the on-support tolerance) and the part of ``integral`` they add by counting the
      second chart. ``log_prob`` rightly counts both charts there, but such a node weighs a
      null set as if it had width.

    For an exact ``log_prob``, ``integral - crossing_excess + missed = 1`` up to the
    quadrature error.

    Example:
        >>> check = chart_quadrature(atlas.double().flow(validate_args=False))  # doctest: +SKIP
        >>> check["integral"] - check["crossing_excess"] + check["missed"]  # doctest: +SKIP
        1.0000000000...
    """
    if p.latent_dim != 1:
        raise ValueError(f"chart_quadrature: 1-D charts only, got d = {p.latent_dim}")
    if p._validate_args:
        raise ValueError(
            "chart_quadrature: pass a distribution built with validate_args=False (nodes in "
            "the missed mass lie on no candidate chart, and a validating log_prob raises there)"
        )
    z = torch.linspace(-bound, bound, nodes, dtype=p.logits.dtype, device=p.logits.device)
    w = torch.full_like(z, 2 * bound / (nodes - 1))
    w[0] = w[-1] = w[0] / 2
    charts = torch.arange(p.num_charts, device=z.device).repeat_interleave(nodes)
    zs, ws = z.repeat(p.num_charts)[:, None], w.repeat(p.num_charts)
    speed = batched_jacobian(lambda v: p.decode(v, charts), zs).detach()[..., 0].norm(dim=-1)
    with torch.no_grad():
        x = p.decode(zs, charts)
        density = p.log_prob(x).exp()
        terms = p.chart_terms(x)
        own = (terms["charts"] == charts[:, None]) & terms["region"]
        # chart k's own term pi_k p_k(x) of the mixture, where log_prob counts it
        share = terms["log_joint"].masked_fill(~(own & terms["on_image"]), -math.inf)
        mass = (p.mixture_log_weights[charts] + p.base.log_prob(zs)).exp()
    return {
        "integral": float((density * speed * ws).sum()),
        "missed": float((mass * ~own.any(-1) * ws).sum()),
        "crossings": int((terms["on_image"].sum(-1) > 1).sum()),
        "crossing_excess": float(((density - share.logsumexp(-1).exp()) * speed * ws).sum()),
    }


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
    uniform = -log_sphere_area(3)
    print(f"  held-out log-likelihood  {held_out:8.4f} nats/point (uniform: {uniform:.4f})")
    print(f"  integral of p over S^2   {integral:.6f}  (Gauss-Legendre x trapezoid, 80k nodes)")
    return atlas, test, history


def _circles_part(n, epochs, seed, charts=6):
    x = datasets.two_circles(n, seed=seed)
    train, test = x[: int(0.8 * n)], x[int(0.8 * n) :]
    # The charts come from the data: a VQ autoencoder's codes give the chart centres and
    # membership regions, each code's points initialise a conformal chart (local PCA), and
    # the charts are then learned with the flows (manifold first, then density).
    vq = VQAutoencoder(2, charts, hidden=(32,))
    vq.fit(train, epochs=20, seed=seed)
    atlas = AtlasFlow.from_autoencoder(vq, train, 1, m=2, hidden=(32, 32))
    objective = AtlasObjective(
        beta=1000.0, schedule="manifold-first", manifold_epochs=max(1, epochs // 8)
    )
    history = fit(
        atlas, train, epochs=epochs, lr=5e-3, loss_fn=objective, val_data=test, seed=seed
    )
    sigma = objective.noise_scale
    p = atlas.flow(noise_scale=sigma, validate_args=False)
    with torch.no_grad():
        distance = p.distance_to_support(test)
        chart = p.encode(test)[1]  # the most probable chart of each point
    check = chart_quadrature(atlas.double().flow(validate_args=False))
    atlas.float()
    print(
        f"two circles ({len(train)} train / {len(test)} held-out points, {charts} charts "
        "learned from the data by a VQ autoencoder)"
    )
    uses = []
    for name, side in [("left", test[:, 0] < 0), ("right", test[:, 0] >= 0)]:
        used = torch.bincount(chart[side], minlength=charts).tolist()
        share = ", ".join(f"{k}: {c}" for k, c in enumerate(used) if c)
        print(f"  held-out points of the {name} circle, by most probable chart  {share}")
        uses.append({k for k, c in enumerate(used) if c})
    shared = sorted(uses[0] & uses[1])
    print(f"  charts used by both circles  {', '.join(map(str, shared)) or 'none'}")
    print(
        f"  distance of held-out points to the learned charts  mean {float(distance.mean()):.1e}"
        f", max {float(distance.max()):.1e}"
    )
    # the true density of the same held-out points, thickened alike at zero distance
    ideal = float(datasets.two_circles_log_prob(test).mean()) - 0.5 * math.log(
        2 * math.pi * sigma**2
    )
    print(
        f"  held-out log-likelihood, thickened by sigma = {sigma:.3f}  "
        f"{history['val_log_prob_thickened'][-1]:8.4f} nats/point (the true density of the "
        f"same points: {ideal:.4f})"
    )
    total = check["integral"] + check["missed"]
    print(f"  integral of p over the learned chart images  {check['integral']:.6f}")
    missed = check["missed"]
    print(f"  + mass outside the charts' own regions (not counted by log_prob)  {missed:.6f}")
    print(
        f"  = {total:.6f}  (trapezoid, {charts} x 20001 nodes along the charts; "
        f"{check['crossing_excess']:.6f} of it at the {check['crossings']} node(s) where "
        "two chart images cross)"
    )
    return atlas, test, history


def _chart_legend(ax, charts, cmap, vmin, vmax, **kwargs):
    """Legend with one coloured marker per chart index present in ``charts``."""
    import matplotlib
    from matplotlib.lines import Line2D

    colours = matplotlib.colormaps[cmap]
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    handles = [
        Line2D([], [], ls="", marker="o", ms=5, color=colours(norm(k)), label=f"chart {k}")
        for k in sorted({int(k) for k in charts.tolist()})
    ]
    return ax.legend(handles=handles, fontsize=8, **kwargs)


def _figure(sphere_atlas, sphere_test, circles_atlas, circles_test):
    """Build the three-panel demo figure (axis labels on every panel, chart legends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig = plt.figure(figsize=(14, 4.6))
    with torch.no_grad():
        xs, ks = sphere_atlas.flow().rsample_with_charts((2000,))
        xc, kc = circles_atlas.flow().rsample_with_charts((2000,))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    ax.scatter(*sphere_test[:1000].T, s=2, c="grey")
    ax.set_title("S^2: held-out data")
    ax.set_xlabel("x"), ax.set_ylabel("y"), ax.set_zlabel("z")
    ax = fig.add_subplot(1, 3, 2, projection="3d")
    k_max = max(int(ks.max()), 1)
    ax.scatter(*xs.T, s=2, c=ks, cmap="coolwarm", vmin=0, vmax=k_max)
    ax.set_title("S^2: samples coloured by chart")
    ax.set_xlabel("x"), ax.set_ylabel("y"), ax.set_zlabel("z")
    _chart_legend(ax, ks, "coolwarm", 0, k_max, loc="upper left", title="samples")
    ax = fig.add_subplot(1, 3, 3)
    ax.scatter(*circles_test.T, s=2, c="grey")
    ax.scatter(*xc.T, s=2, c=kc, cmap="tab10", vmin=0, vmax=9)
    ax.set_aspect("equal")
    ax.set_title("two circles: charts learned from the data")
    ax.set_xlabel("x"), ax.set_ylabel("y")
    # Legends beside the panel: inside they would cover the smaller circle.
    legend = _chart_legend(
        ax, kc, "tab10", 0, 9, loc="upper left", bbox_to_anchor=(1.02, 1), title="samples"
    )
    ax.add_artist(legend)
    data = Line2D([], [], ls="", marker="o", ms=5, color="grey", label="held-out data")
    ax.legend(handles=[data], loc="lower left", bbox_to_anchor=(1.02, 0), fontsize=8)
    fig.tight_layout()
    return fig


def _plot(sphere_atlas, sphere_test, circles_atlas, circles_test, path):
    import matplotlib.pyplot as plt

    fig = _figure(sphere_atlas, sphere_test, circles_atlas, circles_test)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m atlasdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit atlases on S^2 and two circles")
    demo.add_argument("--out", default="atlas_demo.png", help="PNG of samples coloured by chart")
    demo.add_argument("--points", type=int, default=4000)
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    sphere_atlas, sphere_test, _ = _sphere_part(args.points, args.epochs, args.seed)
    circles_atlas, circles_test, _ = _circles_part(args.points, args.epochs, args.seed)
    _plot(sphere_atlas, sphere_test, circles_atlas, circles_test, args.out)
    print(f"wrote {args.out}  ({time.perf_counter() - start:.0f} s)")
