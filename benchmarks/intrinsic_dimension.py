r"""Intrinsic dimension on the Hein-Audibert / Campadelli benchmark manifolds of
scikit-dimension (``skdim.datasets.BenchmarkManifolds``): the library's estimator against
scikit-dimension's MLE, TwoNN, lPCA and DANCo in the same run, as a Markdown table of rounded
estimates against the truth, exact hits per method and wall time per method.

    python benchmarks/intrinsic_dimension.py                  # full: 24 manifolds, N = 2500,
                                                             # noise 0 and 0.01, seeds 0 1 2
    python benchmarks/intrinsic_dimension.py --quick          # smoke run: 4 small manifolds,
                                                             # N = 500, seed 0, no DANCo
    python benchmarks/intrinsic_dimension.py --out benchmarks/intrinsic_dimension.md

Needs ``pip install scikit-dimension pandas``. Noise is scikit-dimension's default uniform
noise: each coordinate plus ``noise * (U - 0.5)``, ``U ~ U(0, 1)``. A cell reads
``rounded estimate`` (one per seed, separated by ``/``); a hit is a rounded estimate equal to
the true dimension. Everything runs single-threaded (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1`` recommended) so that times compare.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings

import numpy as np
import torch

from atlasdist.intrinsic_dimension import estimate_intrinsic_dimension

QUICK = ["M2_Affine_3to5", "M5a_Helix1d", "M7_Roll", "M11_Moebius"]


def _ours(x):
    return float(estimate_intrinsic_dimension(torch.from_numpy(x)).dimension)


def _skdim(name):
    def run(x):
        import skdim

        return float(getattr(skdim.id, name)().fit(x).dimension_)

    return run


METHODS = {
    "ours": _ours,
    "MLE": _skdim("MLE"),
    "TwoNN": _skdim("TwoNN"),
    "lPCA": _skdim("lPCA"),
    "DANCo": _skdim("DANCo"),
}


def generate(name, n, noise, seed):
    """One benchmark manifold, shape (n, D), and its true dimension."""
    import skdim

    bench = skdim.datasets.BenchmarkManifolds(random_state=seed)
    d, D, _ = bench._dict_truth[name]
    # BenchmarkManifolds.generate passes dim and d through even when None: give both
    return bench.generate(name, n=n, dim=D, d=d, noise=noise), d, D


def run(names, noises, seeds, methods, n, log=None):
    """Rows {manifold, D, d, noise, seed, method, estimate, seconds}, one per run."""
    rows = []
    for noise in noises:
        for name in names:
            for seed in seeds:
                x, d, D = generate(name, n, noise, seed)
                for method in methods:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        try:
                            value = METHODS[method](x)
                        except Exception as error:  # a failing estimator is a result too
                            print(f"{method} failed on {name}: {error!r}", file=sys.stderr)
                            value = math.nan
                    row = dict(
                        manifold=name,
                        D=D,
                        d=d,
                        noise=noise,
                        seed=seed,
                        method=method,
                        estimate=value,
                        seconds=time.perf_counter() - t0,
                    )
                    rows.append(row)
                    print(json.dumps(row), file=log or sys.stderr, flush=True)
    return rows


def _rounded(v):
    return "nan" if not math.isfinite(v) else str(int(round(v)))


def table(rows, methods):
    """The Markdown table: one line per (noise, manifold), hits and time per method."""
    lines = []
    for noise in sorted({r["noise"] for r in rows}):
        sub = [r for r in rows if r["noise"] == noise]
        names = list(dict.fromkeys(r["manifold"] for r in sub))
        lines += [f"\n**noise {noise}**\n", "| manifold | D | d | " + " | ".join(methods) + " |"]
        lines.append("|---|---|---|" + "---|" * len(methods))
        hits = {m: 0 for m in methods}
        runs = {m: 0 for m in methods}
        low = {m: 0 for m in methods}  # hits on the manifolds of dimension <= 5
        low_runs = {m: 0 for m in methods}
        for name in names:
            cells = []
            for m in methods:
                rs = sorted(
                    (r for r in sub if r["manifold"] == name and r["method"] == m),
                    key=lambda r: r["seed"],
                )
                runs[m] += len(rs)
                hit = sum(_rounded(r["estimate"]) == str(r["d"]) for r in rs)
                hits[m] += hit
                if rs and rs[0]["d"] <= 5:
                    low[m] += hit
                    low_runs[m] += len(rs)
                text = "/".join(_rounded(r["estimate"]) for r in rs) or "-"
                cells.append(
                    f"**{text}**"
                    if rs and all(_rounded(r["estimate"]) == str(r["d"]) for r in rs)
                    else text
                )
            r0 = next(r for r in sub if r["manifold"] == name)
            lines.append(f"| {name} | {r0['D']} | {r0['d']} | " + " | ".join(cells) + " |")
        lines.append(
            "| **exact hits** | | | "
            + " | ".join(f"**{hits[m]}/{runs[m]}**" for m in methods)
            + " |"
        )
        lines.append(
            "| exact hits, d <= 5 | | | "
            + " | ".join(f"{low[m]}/{low_runs[m]}" for m in methods)
            + " |"
        )
        seconds = {m: sum(r["seconds"] for r in sub if r["method"] == m) for m in methods}
        lines.append(
            "| wall time per run (s, mean) | | | "
            + " | ".join(f"{seconds[m] / max(runs[m], 1):.2f}" for m in methods)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--noise", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--manifolds", nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--log", default=None, help="append one JSON line per run here")
    parser.add_argument(
        "--from-log", nargs="+", default=None, help="only tabulate the runs of these logs"
    )
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import skdim

    if args.from_log:
        rows = []
        for path in args.from_log:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        methods = list(dict.fromkeys(r["method"] for r in rows))
    else:
        names = args.manifolds or (
            QUICK if args.quick else list(skdim.datasets.BenchmarkManifolds()._dict_truth)
        )
        n = args.n or (500 if args.quick else 2500)
        noises = args.noise or ([0.0] if args.quick else [0.0, 0.01])
        seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
        methods = args.methods or (
            ["ours", "MLE", "TwoNN", "lPCA"] if args.quick else list(METHODS)
        )
        log = open(args.log, "a") if args.log else None
        start = time.perf_counter()
        rows = run(names, noises, seeds, methods, n, log)
        print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    command = "python benchmarks/intrinsic_dimension.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    text = (
        f"`{command.strip()}`: scikit-dimension {skdim.__version__}, numpy {np.__version__}, "
        f"torch {torch.__version__}; cells are rounded estimates per seed\n" + table(rows, methods)
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
