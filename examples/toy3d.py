"""Toy-3D comparison of reference/000: a classic RealNVP against its atlas counterpart.

On each 3-D toy set, with the same flow layers and the same training budget, train
(a) a full-dimensional RealNVP of Pyro transforms and (b) an atlas learned from the data (VQ
autoencoder charts, chart-conditioned latent flows, conformal chart embeddings), then report
on held-out data:

- the sliced Wasserstein distance between samples and held-out points (lower is better);
- the fraction of samples within delta of the true manifold (higher is better).

Writes a PNG grid (data / RealNVP / atlas samples coloured by chart) and a Markdown table.

    python examples/toy3d.py                 # full mode
    python examples/toy3d.py --quick         # smoke run (CI)
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from atlasdist import AtlasFlow, datasets
from atlasdist.charts import VQAutoencoder
from atlasdist.training import AtlasObjective, fit

# -- distances to the true manifolds ----------------------------------------------------------


def _circle_distance(x, centre, normal, radius=1.0):
    rel = x - centre
    h = rel @ normal
    rho = (rel - h[:, None] * normal).norm(dim=-1)
    return ((rho - radius).pow(2) + h.pow(2)).sqrt()


def _curve_distance(x, curve, chunk=2048):
    return torch.cat([torch.cdist(c, curve).min(-1).values for c in x.split(chunk)])


def distance_to_manifold(name: str, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    if name == "sphere":
        return (x.norm(dim=-1) - 1).abs()
    if name == "torus":
        ring = x[:, :2].norm(dim=-1)
        return ((ring - 1).pow(2) + x[:, 2].pow(2)).sqrt().sub(0.4).abs()
    if name == "interlocked_rings":
        e = torch.eye(3, dtype=x.dtype)
        a = _circle_distance(x, torch.zeros(3, dtype=x.dtype), e[2])
        b = _circle_distance(x, e[0], e[1])
        return torch.minimum(a, b)
    if name == "swiss_roll":
        t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 20000, dtype=x.dtype)
        spiral = torch.stack([t * t.cos() / 6, t * t.sin() / 6], -1)
        in_plane = _curve_distance(x[:, [0, 2]], spiral)
        outside = (x[:, 1].abs() - 1).clamp_min(0)
        return (in_plane.pow(2) + outside.pow(2)).sqrt()
    if name == "trefoil_knot":
        t = torch.linspace(0, 2 * math.pi, 20000, dtype=x.dtype)
        knot = torch.stack(
            [t.sin() + 2 * (2 * t).sin(), t.cos() - 2 * (2 * t).cos(), -(3 * t).sin()], -1
        )
        return _curve_distance(x, knot / 3)
    raise ValueError(f"no distance function for {name}")


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0):
    """Mean over random directions of the 1-D Wasserstein-1 distance of the projections
    (equal sample sizes)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[-1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0)
    pa = (a.double() @ dirs).sort(0).values
    pb = (b.double() @ dirs).sort(0).values
    return float((pa - pb).abs().mean())


# -- models -----------------------------------------------------------------------------------


class RealNVP(nn.Module):
    """Full-dimensional flow: ``layers`` blocks of [spline, affine coupling, permutation]."""

    def __init__(self, D: int, layers: int, hidden=(64, 64)):
        super().__init__()
        self.parts = []
        for _ in range(layers):
            self.parts += [
                T.Spline(D, count_bins=8, bound=4.0),
                T.affine_coupling(D, hidden_dims=list(hidden)),
                T.Permute(torch.roll(torch.arange(D), 1)),
            ]
        self.modules_ = nn.ModuleList([p for p in self.parts if isinstance(p, nn.Module)])
        self.register_buffer("loc", torch.zeros(D))

    def flow(self):
        base = dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)
        return dist.TransformedDistribution(base, self.parts)


@dataclass
class Config:
    charts: int
    epochs: int
    vq_epochs: int
    n_train: int
    n_test: int
    layers: int = 2
    beta: float = 100.0
    noise: float = 0.01
    delta: float = 0.05


def run_set(name: str, cfg: Config, seed: int):
    gen, D, d = datasets.MANIFOLDS[name]
    x = gen(cfg.n_train, noise=cfg.noise, seed=seed)
    test = gen(cfg.n_test, noise=cfg.noise, seed=seed + 1)
    result = {}
    # (a) RealNVP
    torch.manual_seed(seed)
    start = time.perf_counter()
    nvp = RealNVP(D, cfg.layers)
    fit(nvp, x, epochs=cfg.epochs, lr=3e-3, seed=seed, progress=True)
    with torch.no_grad():
        nvp_samples = nvp.flow().sample((cfg.n_test,))
    result["realnvp"] = (nvp_samples, None, time.perf_counter() - start)
    # (b) atlas
    torch.manual_seed(seed)
    start = time.perf_counter()
    vq = VQAutoencoder(D, cfg.charts)
    vq.fit(x, epochs=cfg.vq_epochs, seed=seed, progress=True)
    atlas = AtlasFlow.from_autoencoder(vq, x, d, m=2, layers=cfg.layers, hidden=(64, 64))
    objective = AtlasObjective(
        beta=cfg.beta, schedule="manifold-first", manifold_epochs=max(1, cfg.epochs // 10)
    )
    fit(atlas, x, epochs=cfg.epochs, lr=3e-3, loss_fn=objective, seed=seed, progress=True)
    with torch.no_grad():
        samples, charts = atlas.flow().rsample_with_charts((cfg.n_test,))
    result["atlas"] = (samples, charts, time.perf_counter() - start)
    rows = {}
    for model, (s, _, seconds) in result.items():
        rows[model] = {
            "sw": sliced_wasserstein(s, test),
            "within": float((distance_to_manifold(name, s) < cfg.delta).double().mean()),
            "seconds": seconds,
        }
    return test, result, rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 3.6 * len(results)))
    for i, (name, (test, result, _)) in enumerate(results.items()):
        panels = [
            ("data", test, None),
            ("RealNVP", *result["realnvp"][:2]),
            ("atlas (by chart)", *result["atlas"][:2]),
        ]
        for j, (title, pts, colour) in enumerate(panels):
            ax = fig.add_subplot(len(results), 3, 3 * i + j + 1, projection="3d")
            kwargs = {"c": "grey"}
            if colour is not None:  # one discrete colour per chart index
                charts = int(colour.max()) + 1
                cmap = matplotlib.colormaps["tab20"].resampled(charts)
                kwargs = {"c": colour, "cmap": cmap, "vmin": -0.5, "vmax": charts - 0.5}
            points = ax.scatter(*pts[:2000].T, s=1.5, **kwargs)
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("x"), ax.set_ylabel("y"), ax.set_zlabel("z")
            if colour is not None:
                bar = fig.colorbar(points, ax=ax, label="chart index", shrink=0.6, pad=0.1)
                bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
                bar.update_ticks()
            lim = float(test.abs().max()) * 1.1
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_zlim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


SETS = {"sphere": 16, "torus": 32, "swiss_roll": 24, "interlocked_rings": 16, "trefoil_knot": 16}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budget, two sets")
    parser.add_argument("--sets", nargs="*", default=None, choices=sorted(SETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="toy3d")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    sets = args.sets or (["sphere", "interlocked_rings"] if args.quick else list(SETS))
    start = time.perf_counter()
    results, lines = {}, []
    for name in sets:
        cfg = (
            Config(charts=4, epochs=2, vq_epochs=2, n_train=400, n_test=300)
            if args.quick
            else Config(charts=SETS[name], epochs=60, vq_epochs=40, n_train=4000, n_test=2000)
        )
        test, result, rows = run_set(name, cfg, args.seed)
        results[name] = (test, result, rows)
        a, r = rows["atlas"], rows["realnvp"]
        lines.append(
            f"| {name} | {r['sw']:.4f} | {a['sw']:.4f} | {r['within']:.3f} | {a['within']:.3f} "
            f"| {r['seconds']:.0f} / {a['seconds']:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(
        [
            f"delta = {cfg.delta}, data noise = {cfg.noise}, {cfg.n_train} training points, "
            f"{cfg.epochs} epochs each (seed {args.seed})",
            "",
            "| set | SW RealNVP | SW atlas | within delta RealNVP | within delta atlas "
            "| seconds RealNVP / atlas |",
            "|---|---:|---:|---:|---:|---:|",
            *lines,
        ]
    )
    with open(f"{args.out}.md", "w") as f:
        f.write(table + "\n")
    plot(results, f"{args.out}.png")
    print(table)
    print(f"wrote {args.out}.md and {args.out}.png ({time.perf_counter() - start:.0f} s)")
    return {name: rows for name, (_, _, rows) in results.items()}


if __name__ == "__main__":
    main()
