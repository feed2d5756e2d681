r"""Intrinsic dimension of toy manifolds: the learned manifold prior against the classical
estimators of scikit-dimension (TwoNN, MLE), as a Markdown table.

    python examples/intrinsic_dimension_table.py            # full: N = 2000
    python examples/intrinsic_dimension_table.py --quick    # smoke run: N = 500
    python examples/intrinsic_dimension_table.py --steps 1500  # also train the flow

scikit-dimension (``pip install scikit-dimension``) is optional: without it its columns read
"not installed". Every data set has isotropic Gaussian noise of standard deviation ``--noise``
in the ambient space.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch

from atlasdist import datasets
from atlasdist.intrinsic_dimension import estimate_intrinsic_dimension


def circle(n, noise, seed):
    g = torch.Generator().manual_seed(seed)
    t = 2 * math.pi * torch.rand(n, generator=g)
    x = torch.stack([t.cos(), t.sin()], -1)
    return x + noise * torch.randn(x.shape, generator=g)


def flat_torus(n, noise, seed):
    """S^1 x S^1 in R^4, (cos a, sin a, cos b, sin b): flat, closed, d = 2."""
    g = torch.Generator().manual_seed(seed)
    a, b = 2 * math.pi * torch.rand(2, n, generator=g)
    x = torch.stack([a.cos(), a.sin(), b.cos(), b.sin()], -1)
    return x + noise * torch.randn(x.shape, generator=g)


def linear_subspace(n, noise, seed, d=5, D=20):
    """A random d-dimensional linear subspace of R^D with standard normal coordinates."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, d, generator=g)).Q
    x = torch.randn(n, d, generator=g) @ basis.T
    return x + noise * torch.randn(x.shape, generator=g)


CASES = [  # name, true d, generator(n, noise, seed)
    ("circle S^1 in R^2", 1, circle),
    ("sphere S^2 in R^3", 2, lambda n, s, seed: datasets.sphere(n, s, seed, dim=2)),
    ("flat torus S^1 x S^1 in R^4", 2, flat_torus),
    ("Swiss roll in R^3", 2, lambda n, s, seed: datasets.swiss_roll(n, s, seed)),
    ("linear subspace R^5 in R^20", 5, linear_subspace),
    ("sphere S^3 in R^4", 3, lambda n, s, seed: datasets.sphere(n, s, seed, dim=3)),
]


def classical(x):
    """TwoNN and MLE estimates of scikit-dimension, or "not installed"."""
    try:
        import skdim
    except ImportError:
        return "not installed", "not installed"
    data = x.double().numpy()
    return (
        f"{skdim.id.TwoNN().fit(data).dimension_:.2f}",
        f"{skdim.id.MLE().fit(data).dimension_:.2f}",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (small, wrong answers ok)")
    parser.add_argument("--n", type=int, default=None, help="points per data set")
    parser.add_argument(
        "--steps", type=int, default=None, help="also train the manifold-prior flow this long"
    )
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    n = args.n or (500 if args.quick else 2000)
    steps = args.steps
    torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.perf_counter()
    rows = []
    for name, d, generator in CASES:
        x = generator(n, args.noise, args.seed).float()
        t0 = time.perf_counter()
        result = estimate_intrinsic_dimension(
            x, steps=steps, seed=args.seed, progress=args.progress
        )
        seconds = time.perf_counter() - t0
        two_nn, mle = classical(x)
        spectrum = ", ".join(f"{s:.2g}" for s in result.spectrum.tolist()[:6])
        if x.shape[1] > 6:
            spectrum += ", ..."
        rows.append(
            f"| {name} | {x.shape[1]} | {d} | **{result.dimension}** | {two_nn} | {mle} | "
            f"{spectrum} | {seconds:.0f} |"
        )
        print(f"{name}: ours {result.dimension} (true {d}), {seconds:.0f} s", file=sys.stderr)

    command = "python examples/intrinsic_dimension_table.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print(
        f"\n`{command.strip()}` (N = {n}, noise = {args.noise}, flow steps {steps}, "
        f"seed {args.seed})\n"
    )
    print("| data | D | true d | ours | TwoNN | MLE | our median spectrum | our time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
