r"""Free-form injective flows: any encoder :math:`f: \mathbb{R}^D \to \mathbb{R}^d` and decoder
:math:`g: \mathbb{R}^d \to \mathbb{R}^D` (reference/002, Sorrenson et al. 2023).

The model is the pushforward :math:`P = g_\# q` of a base :math:`q` on :math:`\mathbb{R}^d`.
On the decoder's image :math:`S = g(\mathbb{R}^d)`, where the encoder is a left inverse
(:math:`g(f(x)) = x`), its density w.r.t. the :math:`d`-dimensional volume (Hausdorff)
measure on :math:`S` is evaluated exactly, with the :math:`D \times d` decoder Jacobian by
forward-mode automatic differentiation:

.. math:: \log p(x) = \log q(z) - \tfrac12 \log\det\big(J_g(z)^\top J_g(z)\big),
   \qquad z = f(x).

Training (reconstruction plus a surrogate of the likelihood gradient) is in
:mod:`atlasdist.training.fif`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution

from .._checks import (
    check_batch,
    check_count,
    check_features,
    check_finite,
    check_floating,
    check_parameter,
    check_sample_shape,
    no_validation,
)
from ..geometry import jacobian
from ..lazy import LazyDistribution
from ..transforms.injective import InjectiveTransform
from .embedded import EmbeddedDistribution, latent_dim_of

__all__ = [
    "FreeFormInjectiveFlow",
    "FreeFormInjectiveDistribution",
    "FreeFormEmbedding",
    "decoder_log_volume",
]

_EMPTY = torch.Size()


def _check_options(owner: str, encoder, decoder, atol, noise_scale, chunk_size) -> None:
    # The construction options the flow and its distribution share.
    for name, fn in (("encoder", encoder), ("decoder", decoder)):
        if not callable(fn):
            raise TypeError(
                f"{owner}: {name} must be a network (an nn.Module or a callable), got "
                f"{type(fn).__name__}"
            )
    if atol is not None:
        check_parameter(atol, "atol", owner, nonnegative=True)
    if noise_scale is not None:
        check_parameter(noise_scale, "noise_scale", owner, positive=True)
    if chunk_size is not None:
        check_count(chunk_size, "chunk_size", owner)


def decoder_log_volume(decoder, z: torch.Tensor, chunk_size: int | None = 4096) -> torch.Tensor:
    r""":math:`\frac12 \log\det\big(J_g(z)^\top J_g(z)\big)` of a decoder
    :math:`g: \mathbb{R}^d \to \mathbb{R}^D`, differentiable in :math:`z` and in the decoder's
    parameters.

    :math:`J_g` comes from :func:`atlasdist.geometry.jacobian` (``torch.func.vmap`` of
    ``jacfwd``, in chunks of ``chunk_size`` points); the log-determinant from the reduced QR
    factorization :math:`J_g = QR`, :math:`\sum_i \log|R_{ii}|`, which never forms the Gram
    matrix (whose condition number is the square of :math:`J_g`'s). Unlike
    :func:`atlasdist.geometry.log_volume_ratio` (``mode="r"`` QR, no backward), it supports
    gradients, so it can be trained through.

    Cost: :math:`d` forward-mode passes of the decoder per point, then :math:`O(D d^2)`.

    Arguments:
        decoder: pointwise map :math:`(*, d) \to (*, D)`, :math:`d \le D`.
        z: latent points of shape :math:`(*, d)`.
        chunk_size: points per vectorized chunk (bounds memory); ``None`` for all at once.

    Returns:
        Tensor of shape :math:`(*)`.

    Example:
        >>> g = lambda z: torch.cat([z, z.sin()], -1)  # graph of sin, |g'| = sqrt(1 + cos^2)
        >>> z = torch.zeros(1, 1)
        >>> decoder_log_volume(g, z)  # log sqrt(2)
        tensor([0.3466])
    """
    jac = jacobian(decoder, z, chunk_size)
    if jac.shape[-2] < jac.shape[-1]:
        raise ValueError(
            f"decoder_log_volume: the decoder must not lower the dimension, got "
            f"R^{jac.shape[-1]} -> R^{jac.shape[-2]}"
        )
    r = torch.linalg.qr(jac, mode="reduced").R
    return r.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)


def _module_tensor(*modules) -> torch.Tensor | None:
    # A floating parameter or buffer: the dtype and device the modules compute in.
    for module in modules:
        if isinstance(module, nn.Module):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.is_floating_point():
                    return tensor
    return None


def _module_dtype(*modules) -> torch.dtype | None:
    tensor = _module_tensor(*modules)
    return None if tensor is None else tensor.dtype


class FreeFormInjectiveDistribution(EmbeddedDistribution):
    r"""The pushforward :math:`P = g_\# q` of a base :math:`q` on :math:`\mathbb{R}^d` by a
    free-form decoder, with the exact log-density

    .. math:: \log p(x) = \log q(z) - \tfrac12\log\det\big(J_g(z)^\top J_g(z)\big),
       \qquad z = f(x),

    w.r.t. the :math:`d`-dimensional volume (Hausdorff) measure on the decoder image
    :math:`S = g(\mathbb{R}^d)` (arc length for :math:`d = 1`, surface area for :math:`d = 2`),
    not w.r.t. Lebesgue measure on :math:`\mathbb{R}^D`. It is exact at the points of
    :math:`S` where the encoder is a left inverse of the decoder, :math:`f(g(z)) = z`.

    **On and off the image.** A point counts as on the image when its reconstruction error
    :math:`|g(f(x)) - x| \le \text{atol}\,(1 + |x|)`; a learned encoder is a left inverse
    only approximately, so set ``atol`` to the pair's reconstruction error on samples (see
    :meth:`left_inverse_error`). Off the image, ``log_prob`` is :math:`-\infty`, or a
    ``ValueError`` giving the distance under ``validate_args``. :meth:`project` gives
    :math:`\pi(x) = g(f(x))` and its distance; :meth:`projected_log_prob` is the density at
    :math:`\pi(x)` for any :math:`x` (no on-image check). With ``noise_scale``
    :math:`\sigma`, ``log_prob`` is the thickened density on :math:`\mathbb{R}^D`

    .. math:: p_\sigma(x) = p(\pi(x))\, \mathcal{N}(x - \pi(x); 0, \sigma^2 I_{D-d}),

    which is normalized exactly when :math:`S` is flat and :math:`f` is the orthogonal
    projection onto it, and approximately otherwise (to first order in :math:`\sigma` times
    the curvature, and only as well as :math:`\pi` approximates the nearest-point
    projection); ``sample`` then adds normal noise of scale :math:`\sigma` orthogonal to
    :math:`S`.

    Cost: ``log_prob`` is one encoder pass, one decoder pass (for the reconstruction check)
    and :math:`d` forward-mode decoder passes (the Jacobian) per point, plus
    :math:`O(D d^2)`; ``sample`` is one decoder pass.

    Arguments:
        base: :math:`q`, a distribution with event shape :math:`(d,)` and batch shape ``()``.
        encoder: :math:`f`, pointwise :math:`(*, D) \to (*, d)`.
        decoder: :math:`g`, pointwise :math:`(*, d) \to (*, D)`.
        features: :math:`D > d`.
        atol: on-image tolerance (relative to :math:`1 + |x|`); default :math:`10^{-6}` in
            float64 and :math:`10^{-4}` in float32.
        noise_scale: :math:`\sigma` of the thickened density, or ``None`` (exact density).
        chunk_size: points per vectorized Jacobian chunk.

    Example:
        >>> from torch import nn
        >>> flow = FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3))
        >>> p = flow.flow()
        >>> x = p.sample((5,))
        >>> x.shape, p.projected_log_prob(x).shape
        (torch.Size([5, 3]), torch.Size([5]))

    References:
        Sorrenson et al. (2023), *Lifting Architectural Constraints of Injective Flows*
        (reference/002).
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        base: Distribution,
        encoder,
        decoder,
        features: int,
        atol: float | None = None,
        noise_scale: float | None = None,
        chunk_size: int | None = 4096,
        batch_shape: torch.Size = _EMPTY,
        validate_args: bool | None = None,
    ):
        name = "FreeFormInjectiveDistribution"
        d = latent_dim_of(base)
        features = check_count(features, "features", name)
        if not features > d:
            raise ValueError(
                f"{name}: an injective flow needs features D > latent dimension d, got "
                f"D={features}, d={d}"
            )
        _check_options(name, encoder, decoder, atol, noise_scale, chunk_size)
        self.base, self.encoder, self.decoder = base, encoder, decoder
        self.latent_dim, self.ambient_dim = d, features
        self.atol, self.noise_scale, self.chunk_size = atol, noise_scale, chunk_size
        self._like = _module_tensor(decoder, encoder)
        super().__init__(
            batch_shape=torch.Size(batch_shape),
            event_shape=torch.Size([self.ambient_dim]),
            validate_args=validate_args,
        )

    # -- maps ------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`z = f(x)`: :math:`(*, D) \to (*, d)`."""
        return self._apply(self.encoder, x, self.ambient_dim, self.latent_dim, "encoder")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`x = g(z)`: :math:`(*, d) \to (*, D)`."""
        return self._apply(self.decoder, z, self.latent_dim, self.ambient_dim, "decoder")

    @staticmethod
    def _apply(fn, x, n_in, n_out, name):
        flat = x.reshape(-1, n_in)
        out = fn(flat)
        if out.dim() != 2 or out.shape != (flat.shape[0], n_out):
            raise ValueError(
                f"FreeFormInjectiveDistribution: the {name} maps ({flat.shape[0]}, {n_in}) to "
                f"{tuple(out.shape)}, expected ({flat.shape[0]}, {n_out})"
            )
        return out.reshape(x.shape[:-1] + (n_out,))

    def log_volume(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\frac12\log\det(J_g(z)^\top J_g(z))`, shape :math:`(*)`, see
        :func:`decoder_log_volume`."""
        check_features(z, self.latent_dim, "FreeFormInjectiveDistribution.log_volume", "z")
        flat = z.reshape(-1, self.latent_dim)
        return decoder_log_volume(self.decoder, flat, self.chunk_size).reshape(z.shape[:-1])

    # -- sampling --------------------------------------------------------------------------

    def rsample(self, sample_shape=_EMPTY) -> torch.Tensor:
        r"""Draws :math:`z \sim q`, :math:`x = g(z)` (plus normal noise with ``noise_scale``);
        shape ``sample_shape + batch_shape + (D,)``, pathwise in the decoder's parameters."""
        shape = self._extended_shape(
            check_sample_shape(sample_shape, "FreeFormInjectiveDistribution")
        )
        n = math.prod(shape[:-1])
        if n == 0:
            return self.base.rsample((1,)).new_zeros(shape)
        z = self.base.rsample((n,))
        x = self.decode(z)
        if self.noise_scale is not None:
            x = x + self.noise_scale * self._normal_noise(z)
        return x.reshape(shape)

    def sample(self, sample_shape=_EMPTY) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def _normal_noise(self, z):
        # Isotropic noise in the (D - d)-dimensional normal space of the image at g(z).
        jac = jacobian(self.decoder, z.detach(), self.chunk_size)
        q = torch.linalg.qr(jac, mode="complete").Q[..., self.latent_dim :]
        eps = torch.randn(q.shape[:-2] + q.shape[-1:], dtype=z.dtype, device=z.device)
        return (q @ eps.unsqueeze(-1)).squeeze(-1)

    # -- evaluation ------------------------------------------------------------------------

    def _flat(self, value: torch.Tensor):
        name = "FreeFormInjectiveDistribution"
        check_floating(value, name, "value", self._like)
        check_features(value, self.ambient_dim, name, "value")
        check_finite(value, name, "value")
        shape = check_batch(value.shape[:-1], self.batch_shape, name)
        value = value.expand(shape + (self.ambient_dim,))
        return value.reshape(-1, self.ambient_dim), shape

    def _evaluate(self, flat: torch.Tensor):
        if flat.shape[0] == 0:  # an empty batch: nothing to differentiate
            empty = flat.new_zeros(0)
            return flat.new_zeros(0, self.latent_dim), flat, empty, empty
        with no_validation():
            z = self.encode(flat)
            recon = self.decode(z)
            log_p = self.base.log_prob(z) - self.log_volume(z)
        return z, recon, (recon - flat).norm(dim=-1), log_p

    def projected_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(f(x)) - \frac12\log\det(J_g^\top J_g)(f(x))` for any :math:`x`: the
        exact log-density at the projection :math:`\pi(x) = g(f(x))` (w.r.t. volume on the
        image) when :math:`f(\pi(x)) = f(x)`; no on-image check. The negative log-likelihood
        of the projected data reported by reference/002. Shape ``broadcast(*, batch_shape)``.
        """
        flat, shape = self._flat(value)
        return self._evaluate(flat)[3].reshape(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log density of ``value`` (shape ``(*, D)``), see the class docstring for the
        measure; returns shape ``broadcast(*, batch_shape)``."""
        flat, shape = self._flat(value)
        _, _, error, log_p = self._evaluate(flat)
        if self.noise_scale is not None:
            codim = self.ambient_dim - self.latent_dim
            sigma = self.noise_scale
            log_normal = -0.5 * codim * math.log(2 * math.pi * sigma**2) - error.pow(2) / (
                2 * sigma**2
            )
            return (log_p + log_normal).reshape(shape)
        off = ~(error <= self._tolerance(flat))
        if self._validate_args and bool(off.any()):
            raise ValueError(
                f"FreeFormInjectiveDistribution: {int(off.sum())} points lie off the decoder "
                f"image (reconstruction error |g(f(x)) - x| up to {error[off].max().item():.3g}, "
                f"tolerance {float(self._tolerance(flat)[off].max()):.3g}); use noise_scale "
                "for noisy data, or project() them"
            )
        return log_p.masked_fill(off, -math.inf).reshape(shape)

    def project(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\pi(x) = g(f(x))` and the distance :math:`|x - \pi(x)|`.

        :math:`\pi` is the nearest-point projection only as far as the encoder is trained to
        be one (the reconstruction loss pulls it there).

        Returns:
            ``(projection (*, D), distance (*))``.
        """
        flat, shape = self._flat(value)
        with no_validation():
            recon = self.decode(self.encode(flat))
        dist = (recon - flat).norm(dim=-1)
        return recon.reshape(shape + (self.ambient_dim,)), dist.reshape(shape)

    def distance_to_support(self, value: torch.Tensor) -> torch.Tensor:
        """Reconstruction error :math:`|g(f(x)) - x|`, shape ``(*)``."""
        return self.project(value)[1]

    def left_inverse_error(self, num_samples: int = 1024) -> torch.Tensor:
        r"""Largest reconstruction error :math:`|g(f(x)) - x|` of ``num_samples`` points
        :math:`x = g(z)`, :math:`z \sim q`: how far the encoder is from a left inverse on the
        image, a lower bound for a useful ``atol``."""
        with torch.no_grad(), no_validation():
            x = self.decode(self.base.sample((num_samples,)))
            return (self.decode(self.encode(x)) - x).norm(dim=-1).max()


class FreeFormInjectiveFlow(LazyDistribution):
    r"""A free-form injective flow :math:`x = g(z)`, :math:`z \sim q`, with an encoder
    :math:`f \approx g^{-1}`: a lazy module (:class:`~atlasdist.lazy.LazyDistribution`) whose
    ``forward()`` (or ``flow()``) returns the :class:`FreeFormInjectiveDistribution`.

    It takes no conditioning input: ``module(c)`` raises ``ValueError`` (the encoder and
    decoder are the user's networks, so a context would have to be one of their inputs).

    Any networks qualify; train with :func:`atlasdist.training.fif.fif_loss`, which makes
    :math:`f` a left inverse of :math:`g` on the data and fits the likelihood.

    Arguments:
        encoder: :math:`f: \mathbb{R}^D \to \mathbb{R}^d`, an ``nn.Module`` acting on
            :math:`(N, D)` row by row (no batch-coupling layers such as batch norm: the
            Jacobians are taken point by point with ``torch.func.vmap``).
        decoder: :math:`g: \mathbb{R}^d \to \mathbb{R}^D`, likewise.
        latent_features: :math:`d`; inferred from a linear first layer of the decoder when
            omitted.
        features: :math:`D`; inferred from a linear first layer of the encoder when omitted.
        base: :math:`q` on :math:`\mathbb{R}^d` (default standard normal, moved with the
            module).
        atol, noise_scale, chunk_size: see :class:`FreeFormInjectiveDistribution`.

    Example:
        >>> from torch import nn
        >>> encoder = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 1))
        >>> decoder = nn.Sequential(nn.Linear(1, 32), nn.SiLU(), nn.Linear(32, 2))
        >>> flow = FreeFormInjectiveFlow(encoder, decoder)
        >>> flow.flow().sample((4,)).shape
        torch.Size([4, 2])

    References:
        Sorrenson et al. (2023), *Lifting Architectural Constraints of Injective Flows*
        (reference/002).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_features: int | None = None,
        features: int | None = None,
        *,
        base: Distribution | None = None,
        atol: float | None = None,
        noise_scale: float | None = None,
        chunk_size: int | None = 4096,
    ):
        super().__init__()
        d = latent_features if latent_features is not None else _in_features(decoder)
        D = features if features is not None else _in_features(encoder)
        if d is None or D is None:
            raise ValueError(
                "FreeFormInjectiveFlow: pass latent_features and features (they cannot be read "
                "from the encoder's and decoder's first layers)"
            )
        name = "FreeFormInjectiveFlow"
        d = check_count(d, "latent_features", name)
        D = check_count(D, "features", name)
        if not 1 <= d < D:
            raise ValueError(f"FreeFormInjectiveFlow needs 1 <= d < D, got d={d}, D={D}")
        _check_options(name, encoder, decoder, atol, noise_scale, chunk_size)
        self.encoder, self.decoder = encoder, decoder
        self.latent_features, self.features = int(d), int(D)
        self.base = base
        dtype = _module_dtype(decoder, encoder) or torch.get_default_dtype()
        self.register_buffer("_base_loc", torch.zeros(d, dtype=dtype))
        self.atol, self.noise_scale, self.chunk_size = atol, noise_scale, chunk_size

    def extra_repr(self) -> str:
        return f"latent_features={self.latent_features}, features={self.features}"

    def forward(
        self,
        c: torch.Tensor | None = None,
        *,
        noise_scale: float | None = ...,
        validate_args: bool | None = None,
    ) -> FreeFormInjectiveDistribution:
        """The distribution with the current parameters (``noise_scale`` overrides the
        module's); ``flow(...)`` is an alias. ``c`` must be ``None``."""
        self._no_context(c)
        return FreeFormInjectiveDistribution(
            self.base_distribution(),
            self.encoder,
            self.decoder,
            self.features,
            atol=self.atol,
            noise_scale=self.noise_scale if noise_scale is ... else noise_scale,
            chunk_size=self.chunk_size,
            validate_args=validate_args,
        )


def _in_features(module) -> int | None:
    first = module
    while isinstance(first, nn.Sequential) and len(first) > 0:
        first = first[0]
    return getattr(first, "in_features", None)


class FreeFormEmbedding(InjectiveTransform):
    r"""A free-form decoder as a chart embedding: :math:`c(u) = g(u)`, left inverse
    :math:`c^\dagger(x) = f(x)`, volume term
    :math:`\frac12\log\det(J_g(u)^\top J_g(u))` by automatic differentiation.

    Usable as the ``embedding`` of :class:`~atlasdist.distributions.AtlasFlowDistribution` /
    :class:`~atlasdist.AtlasFlow` (one embedding shared by all charts). The encoder is a left
    inverse only where :math:`f(g(u)) = u`, which a trained pair satisfies approximately;
    the atlas decides image membership itself by the reconstruction error
    :math:`|g(f(x)) - x|` against its tolerance, so an inexact pair shows up as points off
    the support (raise the atlas's ``atol`` or use its ``noise_scale``).

    Cost: forward one decoder pass; inverse one encoder pass; volume term :math:`d`
    forward-mode decoder passes plus :math:`O(D d^2)` per point.

    Arguments:
        encoder: :math:`f`, pointwise :math:`(*, D) \to (*, d)`.
        decoder: :math:`g`, pointwise :math:`(*, d) \to (*, D)`.
        in_features: :math:`d`.
        out_features: :math:`D > d`.
        chunk_size: points per vectorized Jacobian chunk.

    Example:
        >>> from torch import nn
        >>> emb = FreeFormEmbedding(nn.Linear(3, 2), nn.Linear(2, 3), 2, 3)
        >>> u = torch.randn(4, 2)
        >>> y, ladj = emb.call_and_ladj(u)
        >>> y.shape, ladj.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        in_features: int,
        out_features: int,
        chunk_size: int | None = 4096,
    ):
        if not int(out_features) > int(in_features):
            raise ValueError(
                f"FreeFormEmbedding needs out_features > in_features, got d={in_features}, "
                f"D={out_features}"
            )
        super().__init__(in_features, out_features)
        _check_options(self.name, encoder, decoder, None, None, chunk_size)
        self.encoder, self.decoder = encoder, decoder
        self.chunk_size = chunk_size

    def _call(self, u):
        return self.decoder(u)

    def _inverse(self, x):
        return self.encoder(x)

    def log_abs_det_jacobian(self, u, x):
        flat = u.reshape(-1, self.in_features)
        return decoder_log_volume(self.decoder, flat, self.chunk_size).reshape(u.shape[:-1])
