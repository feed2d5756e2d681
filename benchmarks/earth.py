"""Real-data density estimation: the four earth sets on S^2 and RNA torsion angles on T^7.

For each set and seed: the literature's split (``datasets.split``: numpy
``default_rng(seed).permutation``, 80 / 10 / 10), models fitted on the training part with
early stopping on the validation part (best state restored), test NLL in nats:

- earth (w.r.t. the area measure of the unit sphere, as in the published tables): an atlas of
  two stereographic charts (``AtlasFlow.spheres``), a closed-form ``SphereFlow`` and a von
  Mises-Fisher kernel density (one concentration chosen on validation);
- RNA (w.r.t. d theta_1 ... d theta_7, the volume of the flat torus of ``datasets.rna``): an
  atlas of ``--torus-charts`` product charts of seven circle charts (``AtlasFlow.tori``; the
  poles of each angle placed in the emptiest arcs of the training angles, a quarter turn or
  more apart between charts, so that every point is far from all poles of some chart), a
  product-of-von-Mises kernel density and a mixture of product von Mises distributions fitted
  by EM (both chosen on validation).

Prints each row next to the published ones, writes a Markdown table (``--out``.md) and, for
the first seed, density maps of each earth set on a longitude / latitude grid (``--out``_SET.png);
``--out`` is ``benchmarks/earth`` (``benchmarks/earth_quick`` with ``--quick``).

    python benchmarks/earth.py                          # full: 4 earth sets + RNA, 3 seeds
    python benchmarks/earth.py --dataset volcano fire   # some sets
    python benchmarks/earth.py --quick                  # smoke run (seconds)

One thread by default (``--threads``); the full mode prints its wall time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from atlasdist import AtlasFlow, datasets
from atlasdist.atlas import default_latent_flow
from atlasdist.distributions import SphereFlow
from atlasdist.training import fit
from atlasdist.transforms import (
    NormalizedAffine,
    NormalizedTranslation,
    ZukoTransform,
)

EARTH = ["volcano", "earthquake", "flood", "fire"]
# /work/shared/data/README.md: published test NLL (volcano / earthquake / flood / fire).
PUBLISHED = {
    "mixture of Kent": (-0.80, 0.33, 0.73, -1.18),
    "Riemannian CNF": (-6.05, 0.14, 1.11, -0.80),
    "Moser flow": (-4.21, -0.16, 0.57, -1.28),
    "Riemannian score-based": (-4.92, -0.19, 0.48, -1.33),
    "Riemannian flow matching": (-7.93, -0.28, 0.42, -1.86),
}


def kernel_log_prob(x, centres, kappa, log_norm, chunk=2048):
    r""":math:`\log \frac1n \sum_i e^{\kappa\, x \cdot c_i} + \log C(\kappa)`: a von
    Mises-Fisher kernel density on S^2 or, for flat-torus points, a product-von-Mises one
    (:math:`\sum_j \cos(\theta_j - \phi_j) = x \cdot c`)."""
    parts = [torch.logsumexp(kappa * block @ centres.T, -1) for block in x.split(chunk)]
    return torch.cat(parts) - math.log(len(centres)) + log_norm(kappa)


def vmf_log_norm(kappa):
    # log(kappa / (4 pi sinh kappa)), sinh without overflow
    log_sinh = kappa + math.log1p(-math.exp(-2 * kappa)) - math.log(2)
    return math.log(kappa) - math.log(4 * math.pi) - log_sinh


def von_mises_log_norm(kappa, dims=7):
    from scipy.special import i0e

    return -dims * (math.log(2 * math.pi * i0e(kappa)) + kappa)


def kernel_density(train, val, test, log_norm, kappas):
    """The concentration of best validation log-likelihood, its test NLL and its density."""
    scores = [float(kernel_log_prob(val, train, k, log_norm).mean()) for k in kappas]
    kappa = kappas[int(np.argmax(scores))]
    nll = -float(kernel_log_prob(test, train, kappa, log_norm).mean())
    return nll, kappa, lambda x: kernel_log_prob(x, train, kappa, log_norm)


def von_mises_mixture(train, val, test, components=(4, 8, 16, 32), iterations=200, seed=0):
    r"""Mixture of product von Mises distributions on T^n, by EM (Banerjee et al.'s
    concentration update per component and angle); the number of components is chosen on
    validation. Points are flat-torus points (cos, sin pairs)."""
    from scipy.special import i0e, i1e

    def log_prob(x, weights, mu, kappa):
        # x (N, n, 2); mu (K, n, 2) unit; kappa (K, n)
        cos = torch.einsum("pjc,kjc->pkj", x, mu)
        log_i0 = torch.from_numpy(np.log(i0e(kappa.numpy()))) + kappa
        comp = (kappa * cos - math.log(2 * math.pi) - log_i0).sum(-1)
        return torch.logsumexp(comp + weights.log(), -1), comp + weights.log()

    def fit_em(x, K):
        gen = torch.Generator().manual_seed(seed)
        mu = x[torch.randperm(len(x), generator=gen)[:K]].clone()
        kappa = torch.full(mu.shape[:2], 2.0, dtype=x.dtype)
        weights = torch.full((K,), 1.0 / K, dtype=x.dtype)
        for _ in range(iterations):
            _, joint = log_prob(x, weights, mu, kappa)
            resp = (joint - joint.logsumexp(-1, keepdim=True)).exp()
            mass = resp.sum(0) + 1e-10
            weights = mass / mass.sum()
            s = torch.einsum("pk,pjc->kjc", resp, x) / mass[:, None, None]
            r = s.norm(dim=-1).clamp(1e-6, 1 - 1e-6)
            mu = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            kappa = (r * (2 - r**2) / (1 - r**2)).clamp(1e-3, 1e4)
            # one Newton step on A(kappa) = r (Sra 2012) sharpens the approximation
            a = torch.from_numpy(i1e(kappa.numpy()) / i0e(kappa.numpy()))
            kappa = (kappa - (a - r) / (1 - a**2 - a / kappa)).clamp(1e-3, 1e4)
        return weights, mu, kappa

    x, v, t = (z.unflatten(-1, (-1, 2)) for z in (train, val, test))
    best = None
    for K in components:
        params = fit_em(x, K)
        score = float(log_prob(v, *params)[0].mean())
        if best is None or score > best[0]:
            best = (score, K, params)
    _, K, params = best
    return -float(log_prob(t, *params)[0].mean()), K


def sphere_atlas(layers, hidden, count_bins, coupling="affine"):
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    if coupling == "cnf":  # zuko's continuous flow (FFJORD), context: the one-hot chart
        import zuko

        flows = [ZukoTransform(zuko.flows.CNF(2, context=2, hidden_features=hidden))]
    else:
        flows = default_latent_flow(2, 2, layers, hidden, count_bins, coupling=coupling)
    return AtlasFlow.spheres(2, torch.zeros(2, 3), torch.ones(2), poles, flows=flows)


def sphere_flow():
    return SphereFlow(
        3,
        [NormalizedAffine(3) for _ in range(8)] + [NormalizedTranslation(3)],
        base="projected_normal",
    )


def torus_atlas(poles, layers, hidden, count_bins, coupling="affine"):
    flows = default_latent_flow(
        poles.shape[1], len(poles), layers, hidden, count_bins, coupling=coupling
    )
    return AtlasFlow.tori(poles, flows=flows)


def sparse_poles(angles, charts, bins=72, separation=math.pi / 2):
    """Pole angles ``(charts, n)`` for :meth:`AtlasFlow.tori`: per angle, chart 0's pole at the
    centre of the emptiest of ``bins`` equal arcs of the training angles, each further chart's
    at the emptiest arc at least ``separation`` from the poles already placed for that angle
    (so a point near one chart's pole in some angle is far from the others' there)."""
    idx = ((angles + math.pi) / (2 * math.pi) * bins).long().clamp(0, bins - 1)
    counts = torch.zeros(angles.shape[1], bins, dtype=torch.float64).scatter_add_(
        1, idx.T, torch.ones(idx.T.shape, dtype=torch.float64)
    )
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * (2 * math.pi / bins) - math.pi
    poles = []
    for _ in range(charts):
        blocked = torch.zeros_like(counts, dtype=torch.bool)
        for pole in poles:
            gap = torch.remainder(centres - pole[:, None] + math.pi, 2 * math.pi) - math.pi
            blocked |= gap.abs() < separation
        poles.append(centres[counts.masked_fill(blocked, math.inf).argmin(1)])
    return torch.stack(poles)


def fit_model(
    model, train, val, test, cfg, seed, lr=None, time_limit=None, batch_size=None, patience=None
):
    # At least 4 steps per epoch: patience and the plateau schedule count epochs, and a small
    # set (volcano: 661 training points) would otherwise take one full-batch step per epoch.
    batch_size = min(cfg.batch_size if batch_size is None else batch_size, len(train) // 4)
    start = time.perf_counter()
    history = fit(
        model,
        train.float(),
        val_data=val.float(),
        epochs=cfg.epochs,
        batch_size=max(batch_size, 1),
        lr=cfg.lr if lr is None else lr,
        patience=cfg.patience if patience is None else patience,
        schedule="plateau",
        time_limit=cfg.time_limit if time_limit is None else time_limit,
        seed=seed,
        progress=cfg.progress,
        log_every=60.0,
    )
    seconds = time.perf_counter() - start
    model.double()
    with torch.no_grad():
        nll = -float(model.flow().log_prob(test).mean())
    return nll, seconds, history


def run_earth(name, seed, cfg, maps):
    x = datasets.earth(name, dtype=torch.float64)
    if cfg.subset:
        x = x[: cfg.subset]
    train, val, test = datasets.split(x, seed)
    torch.manual_seed(seed)
    rows = {}
    nll, kappa, density = kernel_density(
        train, val, test, vmf_log_norm, [float(k) for k in np.logspace(0, 4.5, 37)]
    )
    rows["vMF kernel density"] = (nll, 0.0, f"kappa {kappa:.4g}")
    models = {
        "atlas (2 stereographic charts)": sphere_atlas(
            cfg.layers, cfg.hidden, cfg.bins, cfg.coupling
        ),
        "SphereFlow (8 affine + translation)": sphere_flow(),
    }
    densities = {"vMF kernel density": density}
    for label, model in models.items():
        limit = cfg.sphere_time_limit if isinstance(model, SphereFlow) else None
        nll, seconds, history = fit_model(model, train, val, test, cfg, seed, time_limit=limit)
        note = f"{len(history['loss'])} epochs, best {history.best_epoch + 1}, "
        note += history.stop_reason
        rows[label] = (nll, seconds, note)
        densities[label] = lambda z, m=model: m.flow().log_prob(z)
    if seed == cfg.seeds[0] and maps:
        plot_earth(name, test, densities, rows, f"{cfg.out}_{name}.png")
    return rows


def run_rna(seed, cfg):
    angles = datasets.rna_angles(torch.float64)
    if cfg.subset:
        angles = angles[: cfg.subset]
    train_a, val_a, test_a = datasets.split(angles, seed)
    train, val, test = (datasets.flat_torus(a) for a in (train_a, val_a, test_a))
    torch.manual_seed(seed)
    rows = {}
    nll, kappa, _ = kernel_density(
        train, val, test, von_mises_log_norm, [float(k) for k in np.logspace(0, 3, 25)]
    )
    rows["product von Mises kernel density"] = (nll, 0.0, f"kappa {kappa:.4g}")
    start = time.perf_counter()
    components = (2, 4) if cfg.quick else (4, 8, 16, 32, 64)
    nll, K = von_mises_mixture(train, val, test, components, 20 if cfg.quick else 200, seed)
    rows["product von Mises mixture (EM)"] = (nll, time.perf_counter() - start, f"K {K}")
    model = torus_atlas(
        sparse_poles(train_a, cfg.torus_charts).float(),
        cfg.layers,
        cfg.hidden,
        cfg.bins,
        cfg.torus_coupling,
    )
    start = time.perf_counter()
    try:
        nll, seconds, history = fit_model(
            model,
            train,
            val,
            test,
            cfg,
            seed,
            lr=cfg.rna_lr,
            batch_size=cfg.rna_batch_size,
            patience=cfg.rna_patience,
        )
        note = f"{len(history['loss'])} epochs, best {history.best_epoch + 1}, "
        note += history.stop_reason
    except (FloatingPointError, ValueError) as error:  # a diverged fit is a result too
        nll, seconds = math.nan, time.perf_counter() - start
        note = f"diverged: {str(error).splitlines()[0][:80]}"
    rows[f"atlas ({cfg.torus_charts} product charts of 7 circles)"] = (nll, seconds, note)
    return rows


def lon_lat_grid(n_lon=360, n_lat=180):
    lon = (torch.arange(n_lon, dtype=torch.float64) + 0.5) * (360 / n_lon) - 180
    lat = (torch.arange(n_lat, dtype=torch.float64) + 0.5) * (180 / n_lat) - 90
    ll = torch.stack(torch.meshgrid(lat, lon, indexing="ij"), -1)
    return datasets.lat_lon_to_unit(ll)


def plot_earth(name, test, densities, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = lon_lat_grid()
    with torch.no_grad():
        maps = {k: f(grid.reshape(-1, 3)).reshape(grid.shape[:2]) for k, f in densities.items()}
    top = max(float(m.max()) for m in maps.values())
    low = top - 12.0
    ll = datasets.unit_to_lat_lon(test)
    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 3.4), squeeze=False)
    for ax, (label, m) in zip(axes[0], maps.items(), strict=True):
        image = ax.imshow(
            m.clamp_min(low),
            origin="lower",
            extent=(-180, 180, -90, 90),
            vmin=low,
            vmax=top,
            cmap="viridis",
        )
        ax.scatter(ll[:, 1], ll[:, 0], s=1.5, c="w", alpha=0.6, linewidths=0)
        ax.set_title(f"{label}\ntest NLL {rows[label][0]:.3f}", fontsize=9)
        ax.set_xlabel("longitude (degrees)")
        ax.set_ylabel("latitude (degrees)")
        fig.colorbar(image, ax=ax, shrink=0.8, label="log density (nats / sr)")
    fig.suptitle(f"{name}: fitted densities, test points in white", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results, cfg, wall):
    earth = [s for s in EARTH if s in results]
    lines = [
        "Test NLL in nats (lower is better), mean ± std over seeds "
        f"{', '.join(map(str, cfg.seeds))}; split: `datasets.split` (80 / 10 / 10). Bold: "
        "the best of this run's rows.",
        "",
        f"Command: `python benchmarks/earth.py {cfg.argv}`",
        f"Settings: at most {cfg.epochs} epochs and {cfg.time_limit} s per atlas fit "
        f"({cfg.sphere_time_limit} s per SphereFlow fit), batch {cfg.batch_size} (at most a "
        f"quarter of the training set; RNA {cfg.rna_batch_size}), lr {cfg.lr} "
        f"(RNA atlas {cfg.rna_lr}; plateau schedule), patience {cfg.patience} (RNA "
        f"{cfg.rna_patience}), atlas latent "
        + (
            "flow zuko's CNF (exact trace in evaluation, Hutchinson's in training) "
            if cfg.coupling == "cnf"
            else f"flow {cfg.layers} layers of {cfg.bins}-bin splines with {cfg.coupling} "
            "coupling "
        )
        + f"(RNA: {cfg.torus_coupling}; {cfg.torus_charts} product charts), hidden "
        f"{cfg.hidden}; {cfg.jobs} parallel job(s) of {cfg.threads} thread(s). Wall time "
        f"{wall:.0f} s.",
    ]
    if earth:
        lines += ["", "| method | " + " | ".join(earth) + " |", "|---" * (len(earth) + 1) + "|"]
        for label, values in PUBLISHED.items():
            row = [f"{values[EARTH.index(s)]:.2f}" for s in earth]
            lines.append(f"| {label} (published) | " + " | ".join(row) + " |")
        labels = list(next(iter(results[earth[0]].values())))
        means = {
            (label, s): statistics.mean(r[label][0] for r in results[s].values())
            for label in labels
            for s in earth
        }
        for label in labels:
            row = []
            for s in earth:
                nll = [r[label][0] for r in results[s].values()]
                best = means[label, s] == min(means[other, s] for other in labels)
                row.append(f"**{summary(nll)}**" if best else summary(nll))  # best of this run
            lines.append(f"| {label} (this run) | " + " | ".join(row) + " |")
        lines += ["", "Seconds per fit (mean) and notes (first seed):", ""]
        for s in earth:
            first = next(iter(results[s].values()))
            for label in labels:
                secs = statistics.mean(r[label][1] for r in results[s].values())
                lines.append(f"- {s}, {label}: {secs:.0f} s; {first[label][2]}")
    if "rna" in results:
        labels = list(next(iter(results["rna"].values())))
        lines += [
            "",
            "RNA torsion angles on T^7 (nats w.r.t. d theta_1 ... d theta_7; uniform: "
            f"{7 * math.log(2 * math.pi):.2f}):",
            "",
            "| method | rna | seconds per fit | notes (first seed) |",
            "|---|---|---|---|",
        ]
        for label in labels:
            runs = list(results["rna"].values())
            nll = summary([r[label][0] for r in runs])
            secs = statistics.mean(r[label][1] for r in runs)
            lines.append(f"| {label} | {nll} | {secs:.0f} | {runs[0][label][2]} |")
    return "\n".join(lines) + "\n"


# Datasets by decreasing run time (the order of parallel jobs).
COST = ["fire", "earthquake", "rna", "flood", "volcano"]


def run_job(name, seed, cfg):
    torch.set_num_threads(cfg.threads)
    if name == "rna":
        return run_rna(seed, cfg)
    return run_earth(name, seed, cfg, maps=not cfg.no_maps)


def record(results, name, seed, rows, cfg, start):
    results.setdefault(name, {})[seed] = rows
    for label, (nll, seconds, note) in rows.items():
        print(f"{name:10s} seed {seed}  {label:40s} {nll:8.3f}  {seconds:6.0f} s  {note}")
    # The table is rewritten after every job, so a run cut short keeps what it did.
    with open(f"{cfg.out}.md", "w") as f:
        f.write(table(ordered(results, cfg), cfg, time.perf_counter() - start))


def ordered(results, cfg):
    """Results in the order of ``--dataset`` and ``--seeds`` (parallel jobs end in any order)."""
    return {
        n: {s: results[n][s] for s in cfg.seeds if s in results[n]}
        for n in cfg.dataset
        if n in results
    }


def main(argv=None):
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", nargs="+", default=[*EARTH, "rna"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sets, 2 epochs")
    parser.add_argument("--subset", type=int, default=0, help="use the first N points only")
    parser.add_argument("--epochs", type=int, default=20000)
    parser.add_argument("--time-limit", type=float, default=360.0, help="seconds per fit")
    parser.add_argument("--sphere-time-limit", type=float, default=60.0, help="per SphereFlow")
    parser.add_argument("--patience", type=int, default=300, help="epochs, earth fits")
    parser.add_argument("--rna-patience", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rna-batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rna-lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--bins", type=int, default=16)
    choice = {"choices": ["affine", "spline", "spline_coupling"]}
    parser.add_argument(
        "--coupling",
        default="spline_coupling",
        choices=[*choice["choices"], "cnf"],
        help="earth latent flow ('cnf': zuko's continuous flow, needs atlasdist[zuko])",
    )
    parser.add_argument("--torus-coupling", default="affine", **choice, help="RNA latent flow")
    parser.add_argument("--torus-charts", type=int, default=3, help="product charts on T^7")
    parser.add_argument("--threads", type=int, default=1, help="per job")
    parser.add_argument("--jobs", type=int, default=1, help="(set, seed) jobs run in parallel")
    parser.add_argument(
        "--out", default=None, help="benchmarks/earth (benchmarks/earth_quick with --quick)"
    )
    parser.add_argument("--no-maps", action="store_true")
    parser.add_argument("--progress", action="store_true")
    cfg = parser.parse_args(argv)
    cfg.argv = " ".join(sys.argv[1:] if argv is None else argv)
    if cfg.out is None:  # a smoke run leaves the committed results alone
        cfg.out = "benchmarks/earth_quick" if cfg.quick else "benchmarks/earth"
    if cfg.quick:
        cfg.subset, cfg.epochs, cfg.seeds = cfg.subset or 400, 2, cfg.seeds[:1]
        cfg.layers, cfg.hidden, cfg.bins = 1, [16], 4
    cfg.hidden = tuple(cfg.hidden)
    unknown = set(cfg.dataset) - {*EARTH, "rna"}
    if unknown:
        parser.error(f"unknown --dataset {sorted(unknown)}; choose from {[*EARTH, 'rna']}")
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    results: dict[str, dict[int, dict]] = {}
    # Longest first, so that parallel jobs end together.
    jobs = [(n, s) for n in sorted(cfg.dataset, key=COST.index) for s in cfg.seeds]
    if cfg.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing

        pool = cf.ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            futures = {pool.submit(run_job, n, s, cfg): (n, s) for n, s in jobs}
            for future in cf.as_completed(futures):  # in the order they finish
                record(results, *futures[future], future.result(), cfg, start)
    else:
        for name, seed in jobs:
            record(results, name, seed, run_job(name, seed, cfg), cfg, start)
    wall = time.perf_counter() - start
    results = ordered(results, cfg)
    text = table(results, cfg, wall)
    with open(f"{cfg.out}.md", "w") as f:
        f.write(text)
    print(text)
    print(f"wall time {wall:.0f} s ({cfg.jobs} job(s) of {cfg.threads} thread(s))")
    return results


if __name__ == "__main__":
    main()
