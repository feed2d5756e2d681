"""benchmarks/mnist.py: the fast MAF inverse is Pyro's inverse, and the whole benchmark runs
end to end (four models, FID curves, table, figures) on synthetic images, without the data
wheel."""

import importlib.util
import math
import os
import sys

import pyro.distributions.transforms as T
import pytest
import torch
from pyro.nn import AutoRegressiveNN

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.join(os.path.dirname(HERE), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "mnist_benchmark", os.path.join(BENCHMARKS, "mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mnist_benchmark"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["mnist_benchmark"]


def _randomized(layer, generator):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [[24], [24, 24]])
def test_maf_inverse(bench, dtype, hidden):
    """The O(DH) inverse (one hidden layer) and the fallback (two) invert the forward pass,
    and match Pyro's own inverse (which only runs in float32: it starts from float32 zeros)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = _randomized(bench.MAFLayer(AutoRegressiveNN(10, hidden)).to(dtype), gen)
    y = torch.randn(7, 3, 10, generator=gen, dtype=dtype)
    with torch.no_grad():
        x = layer._inverse(y)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert x.dtype == dtype and x.shape == y.shape
        assert torch.allclose(layer._call(x), y, atol=10 * tol, rtol=10 * tol)
        # the cached log-scale gives the log-det of the inverse pass, as in Pyro
        _, log_scale = layer.arn(x)
        clipped = log_scale.clamp(layer.log_scale_min_clip, layer.log_scale_max_clip)
        assert torch.equal(layer._cached_log_scale, clipped)
        if dtype == torch.float32:
            pyro_x = T.AffineAutoregressive._inverse(layer, y.reshape(-1, 10)).reshape(y.shape)
            assert torch.allclose(x, pyro_x, atol=tol, rtol=tol)


def test_benchmark_end_to_end_on_synthetic_images(bench, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    fake = torch.randint(0, 256, (128, 784), generator=gen).float() / 256

    def fake_mnist(split="train", device=None, **_):
        part = fake[:96] if split == "train" else fake[96:]
        return part.to(device), torch.zeros(len(part), dtype=torch.int64)

    monkeypatch.setattr(bench, "mnist", fake_mnist)
    metrics = bench.mnist_metrics
    torch.manual_seed(0)
    classifier = metrics.MNISTClassifier().eval()
    cfg = bench.Config(
        train=96, epochs=2, eval_every=1, manifold_epochs=1, vq_epochs=1, samples=32,
        layers=2, hidden=784, d=4, charts=3, code_dim=4, batch_size=32,
    )  # fmt: skip
    features, test = bench.reference_features(classifier, cfg.samples, "cpu")
    assert features.shape[0] == cfg.samples

    class Bar:
        updates = 0

        def update(self, n):
            self.updates += n

        def set_postfix_str(self, text):
            pass

    bar = Bar()
    results = {0: bench.run_seed(cfg, 0, bench.MODELS, (classifier, features, test), "cpu", bar)}
    assert bar.updates == len(bench.MODELS) * 2
    for name in bench.MODELS:
        curve, final = results[0][name]["curve"], results[0][name]["final"]
        assert curve["epoch"] == [1, 2] and curve["step"] == [3, 6]
        assert all(math.isfinite(f) and f >= 0 for f in curve["fid"])
        assert all(0 <= e <= math.log(10) + 1e-9 for e in curve["entropy"])
        assert final["samples"].shape == (32, 784)
        assert 0 <= final["samples"].min() and final["samples"].max() <= 1
        if name.startswith("atlas"):
            assert 0 <= final["on_support"] <= 1 and final["test_distance"] > 0
        else:
            assert math.isfinite(final["test_bpd"])
    text = bench.table(results, cfg, bench.MODELS, [0], 1.0, 0.5, "cpu")
    assert all(f"| {name} |" in text for name in bench.MODELS)
    bench.plot_fid(results, bench.MODELS, [0], str(tmp_path / "fid.png"))
    bench.plot_samples(results, bench.MODELS, 0, str(tmp_path / "samples.png"))
    assert (tmp_path / "fid.png").stat().st_size > 0
    assert (tmp_path / "samples.png").stat().st_size > 0
