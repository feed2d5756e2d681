r"""The latent space of a flow on manifold data (reference/001, Section 2, Figure 1).

Data on the curve :math:`x_2 = \sin(2 x_1)`, :math:`x_1 \sim \mathcal{N}(0, 1)` (d = 1 in
D = 2), with noise 0.01. Two flows, each shown by its data pushed through the inverse flow:

- a RealNVP-style flow (affine couplings and permutations) with a standard normal prior,
  trained by maximum likelihood: to fill a 2-D Gaussian with 1-D data it spreads the curve
  (and its noise) over the whole latent plane, the reference's "curling up";
- a :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow` (one chart, additive
  couplings, learned prior with collapsing scales), trained on the spread data: the curve is
  straightened onto one axis and the other scale collapses.

    python examples/manifold_prior_sinusoid.py            # full run, about a minute
    python examples/manifold_prior_sinusoid.py --quick    # smoke run, < 30 s

Writes ``manifold_prior_sinusoid.png`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as pyro_t  # noqa: E402
import torch  # noqa: E402
from pyro.nn import DenseNN  # noqa: E402
from torch import nn  # noqa: E402

from atlasdist import datasets  # noqa: E402
from atlasdist.intrinsic_dimension import estimate_intrinsic_dimension  # noqa: E402
from atlasdist.lazy import LazyDistribution  # noqa: E402
from atlasdist.training import fit  # noqa: E402


class StandardFlow(LazyDistribution):
    """Affine couplings with permutations on a standard normal prior (RealNVP-style)."""

    def __init__(self, layers: int = 6, hidden: int = 64):
        super().__init__()
        self.couplings = nn.ModuleList(
            pyro_t.AffineCoupling(1, DenseNN(1, [hidden, hidden], [1, 1])) for _ in range(layers)
        )
        self.swap = pyro_t.Permute(torch.tensor([1, 0]))
        self.register_buffer("zero", torch.zeros(2))

    def transforms(self):
        parts = []
        for coupling in self.couplings:
            parts += [coupling, self.swap]
        return parts

    def forward(self, c=None):
        self._no_context(c)
        base = dist.Normal(self.zero, torch.ones_like(self.zero)).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())

    def latent(self, x):
        for part in reversed(self.transforms()):
            x = part.inv(x)
        return x


def main(argv=None):
    parser = argparse.ArgumentParser(description="latent spaces on x2 = sin(2 x1)")
    parser.add_argument("--quick", action="store_true", help="smoke run (< 30 s)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="manifold_prior_sinusoid.png")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    n = args.n or (1000 if args.quick else 4000)
    steps = args.steps or (150 if args.quick else 4000)
    batch = 256
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()

    x = datasets.sinusoid(n, noise=0.01, seed=args.seed)
    torch.manual_seed(args.seed)
    standard = StandardFlow()
    epochs = -(-steps * batch // n)
    fit(
        standard,
        x,
        epochs=epochs,
        batch_size=batch,
        lr=1e-3,
        seed=args.seed,
        progress=args.progress,
    )
    result = estimate_intrinsic_dimension(
        x, charts=1, steps=steps, batch_size=batch, seed=args.seed, progress=args.progress
    )
    model = result.model
    with torch.no_grad():
        z_standard = standard.latent(x)
        z = model.latent(x)
        R = model.prior.rotation()
        u = z if R is None else z @ R  # the prior's own axes
        order = model.prior.scales.argsort(descending=True)
        u = u[:, order] * model.scale
        u = u * torch.where((u * (x - x.mean(0))).sum(0) < 0, -1.0, 1.0)  # orient like x

    colour = x[:, 0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    points = axes[0].scatter(x[:, 0], x[:, 1], c=colour, s=2, cmap="viridis")
    axes[0].set_title(r"data $x_2 = \sin(2x_1)$")
    axes[1].scatter(z_standard[:, 0], z_standard[:, 1], c=colour, s=2, cmap="viridis")
    axes[1].set_title("standard normal prior: latent $f^{-1}(x)$")
    axes[2].scatter(u[:, 0], u[:, 1], c=colour, s=2, cmap="viridis")
    scales = ", ".join(f"{s:.3f}" for s in result.spectrum.tolist())
    axes[2].set_title(f"manifold prior: latent (scales {scales}, d = {result.dimension})")
    labels = [("$x_1$", "$x_2$"), ("$z_1$", "$z_2$"), ("$u_1$ (largest scale)", "$u_2$")]
    for ax, (xlabel, ylabel) in zip(axes, labels, strict=True):
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.colorbar(points, ax=axes, label="colour: data coordinate $x_1$", fraction=0.02, pad=0.01)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"learned prior scales: {scales}; intrinsic dimension {result.dimension}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
