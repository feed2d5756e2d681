"""Densities on S^2: an atlas of two stereographic charts against closed-form sphere flows.

Both models are fitted by maximum likelihood to the same embedded spherical data set (a
mixture of concentrated clusters, ``atlasdist.datasets.sphere``). Both densities are w.r.t. the
surface (area) measure on S^2, so their held-out log-likelihoods are comparable. Writes a PNG
of the fitted densities (equal-area map: longitude x cos(colatitude)) and a Markdown table,
with each model's integral over S^2 as a normalization check.

    python examples/sphere_atlas_vs_flows.py            # full mode
    python examples/sphere_atlas_vs_flows.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from atlasdist import AtlasFlow, datasets
from atlasdist.demo import sphere_quadrature
from atlasdist.distributions import SphereFlow
from atlasdist.manifolds import log_sphere_area
from atlasdist.training import fit
from atlasdist.transforms import NormalizedAffine, NormalizedTranslation


def equal_area_grid(n_phi=240, n_t=120):
    phi = (torch.arange(n_phi, dtype=torch.float64) + 0.5) * (2 * math.pi / n_phi) - math.pi
    t = (torch.arange(n_t, dtype=torch.float64) + 0.5) * (2 / n_t) - 1
    tt, pp = torch.meshgrid(t, phi, indexing="ij")
    r = (1 - tt**2).sqrt()
    return torch.stack([r * pp.cos(), r * pp.sin(), tt], -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sphere_atlas_vs_flows")
    args = parser.parse_args(argv)
    n, epochs = (600, 2) if args.quick else (6000, 60)
    torch.manual_seed(args.seed)
    x = datasets.sphere(n, seed=args.seed, clusters=4, spread=0.35, dtype=torch.float64)
    train, test = x[: int(0.8 * n)], x[int(0.8 * n) :]
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    models = {
        "atlas (2 stereographic charts)": AtlasFlow.spheres(
            2, torch.zeros(2, 3), torch.ones(2), poles, hidden=(64, 64)
        ),
        "sphere flow (8 normalized affine + translation)": SphereFlow(
            3,
            [NormalizedAffine(3) for _ in range(8)] + [NormalizedTranslation(3)],
            base="projected_normal",
        ),
    }
    rows, densities = [], {}
    points, weights = sphere_quadrature()
    grid = equal_area_grid()
    for name, model in models.items():
        start = time.perf_counter()
        fit(model, train.float(), epochs=epochs, lr=3e-3, seed=args.seed)
        seconds = time.perf_counter() - start
        model.double()
        with torch.no_grad():
            p = model.flow()
            held_out = float(p.log_prob(test).mean())
            integral = float((p.log_prob(points).exp() * weights).sum())
            densities[name] = p.log_prob(grid.reshape(-1, 3)).exp().reshape(grid.shape[:2])
        rows.append(f"| {name} | {held_out:.4f} | {integral:.6f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"{len(train)} training / {len(test)} held-out points, {epochs} epochs, "
            f"seed {args.seed}; uniform density: {-log_sphere_area(3):.4f}",
            "",
            "| model | held-out log-likelihood (nats, w.r.t. area) | integral over S^2 | "
            "seconds |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )
    with open(f"{args.out}.md", "w") as f:
        f.write(table + "\n")
    plot(test, densities, f"{args.out}.png")
    print(table)
    print(f"wrote {args.out}.md and {args.out}.png")
    return rows


def plot(test, densities, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(densities), figsize=(5 * (1 + len(densities)), 3.2))
    extent = (-math.pi, math.pi, -1, 1)
    phi = torch.atan2(test[:, 1], test[:, 0])
    axes[0].scatter(phi, test[:, 2], s=2, c="k")
    axes[0].set_xlim(-math.pi, math.pi), axes[0].set_ylim(-1, 1)
    axes[0].set_title("held-out data")
    vmax = max(float(d.max()) for d in densities.values())
    for ax, (name, dens) in zip(axes[1:], densities.items(), strict=True):
        image = ax.imshow(dens, origin="lower", extent=extent, aspect="auto", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.set_xlabel("longitude"), ax.set_ylabel("cos(colatitude)")
    fig.tight_layout()
    fig.colorbar(image, ax=axes, label="density (w.r.t. area)", fraction=0.02, pad=0.01)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
