r"""The free-form injective flow (FIF) objective (reference/002, Sorrenson et al. 2023).

.. math::
    \mathcal{L}(x) = \beta\, |x - g(f(x))|^2 - \log q(f(x))
        - v^\top J_f(x)\, \mathrm{SG}\big(J_g(f(x))\, v\big),
    \qquad \mathbb{E}[v v^\top] = I_d.

The last term is a surrogate: its value is meaningless, its gradient (in expectation over
:math:`v`) is that of the log volume change :math:`\frac12 \log\det(J_f J_f^\top)(x)`
whenever :math:`J_g(f(x))` is the pseudo-inverse of :math:`J_f(x)`, which the reconstruction
term enforces. The encoder Jacobian is taken at the data point :math:`x` itself, off the
learned manifold, and the decoder Jacobian at :math:`z = f(x)` (i.e. at the reconstruction
:math:`\hat x = g(z)`): evaluating the volume change off the manifold is the reference's fix
for the divergence of naive maximum likelihood on curved manifolds (its section "Problems
with naive maximum likelihood", Fig. 2 and 4). See ``docs/free_form.rst``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import grad
from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual

__all__ = ["fif_loss", "fif_loss_terms", "volume_change_surrogate", "hutchinson_vectors"]


def hutchinson_vectors(
    n: int,
    d: int,
    samples: int = 1,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Hutchinson probes :math:`v_1, \dots, v_K \in \mathbb{R}^d` per point with
    :math:`\frac1K \sum_k \mathbb{E}[v_k v_k^\top] = I_d`: orthonormal columns (QR of a
    Gaussian matrix) scaled by :math:`\sqrt d`.

    With ``samples`` :math:`= d` the columns are a scaled orthonormal basis, so
    :math:`\frac1d \sum_k v_k^\top A v_k = \operatorname{tr} A` exactly; with fewer, the
    estimate is unbiased and its variance is lower than with independent Gaussian probes.

    Arguments:
        n: number of points.
        d: latent dimension.
        samples: :math:`K \le d` probes per point.

    Returns:
        Tensor of shape :math:`(n, d, K)`.

    Example:
        >>> v = hutchinson_vectors(1, 3, 3)
        >>> torch.allclose(v[0] @ v[0].T / 3, torch.eye(3), atol=1e-6)
        True
    """
    if not 1 <= samples <= d:
        raise ValueError(f"hutchinson_samples must be in [1, d={d}], got {samples}")
    gauss = torch.randn(n, d, samples, dtype=dtype, device=device, generator=generator)
    return torch.linalg.qr(gauss).Q * math.sqrt(d)


def volume_change_surrogate(
    encoder,
    decoder,
    x: torch.Tensor,
    hutchinson_samples: int = 1,
    vectors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Surrogate :math:`\frac1K \sum_k v_k^\top J_f(x)\, \mathrm{SG}(J_g(z) v_k)`,
    :math:`z = f(x)`, of the log volume change.

    :math:`J_g(z) v` is one forward-mode JVP through the decoder, :math:`v^\top J_f(x)` one
    reverse-mode VJP through the encoder (kept in the graph); the decoder side is detached
    (stop-gradient), so the surrogate's gradient flows into the encoder only and equals, in
    expectation, :math:`\operatorname{tr}\big(\partial J_f(x)\, J_g(z)\big)`: the gradient of
    :math:`\frac12\log\det(J_f J_f^\top)(x)` when :math:`J_g(z) = J_f(x)^+`.

    Cost: one encoder pass and one decoder pass over :math:`K N` points (the decoder pass
    carries the tangent), and one backward pass through the encoder.

    Arguments:
        encoder: :math:`f`, pointwise :math:`(N, D) \to (N, d)`.
        decoder: :math:`g`, pointwise :math:`(N, d) \to (N, D)`.
        x: data of shape :math:`(N, D)` (the encoder Jacobian is taken there, off the
            manifold).
        hutchinson_samples: :math:`K` probes per point (:math:`K = d`: the exact trace).
        vectors: explicit probes of shape :math:`(N, d, K)` (overrides ``hutchinson_samples``).

    Returns:
        ``(surrogate (N,), z (N, d), reconstruction g(z) (N, D))``; ``z`` and the
        reconstruction are in the graph of the encoder's and decoder's parameters.

    Example:
        >>> from torch import nn
        >>> s, z, x_hat = volume_change_surrogate(nn.Linear(3, 2), nn.Linear(2, 3),
        ...                                       torch.randn(8, 3))
        >>> s.shape, z.shape, x_hat.shape
        (torch.Size([8]), torch.Size([8, 2]), torch.Size([8, 3]))

    References:
        Sorrenson et al. (2023), reference/002, the maximum likelihood surrogate.
    """
    if x.dim() != 2:
        raise ValueError(
            f"volume_change_surrogate: x must have shape (N, D), got {tuple(x.shape)}"
        )
    n = x.shape[0]
    k = hutchinson_samples if vectors is None else vectors.shape[-1]
    if int(k) < 1:
        raise ValueError(f"hutchinson_samples must be >= 1, got {k}")
    # K copies of the batch, probe-major, so that all K probes take one encoder pass, one
    # decoder pass and one backward pass (the encoder acts row by row).
    xs = x.repeat(k, 1)
    if not xs.requires_grad:
        xs.requires_grad_(True)
    zs = encoder(xs)
    if zs.dim() != 2 or zs.shape[0] != k * n:
        raise ValueError(
            f"the encoder maps {tuple(xs.shape)} to {tuple(zs.shape)}, expected ({k * n}, d)"
        )
    d = zs.shape[1]
    if vectors is None:
        vectors = hutchinson_vectors(n, d, k, dtype=zs.dtype, device=zs.device)
    if vectors.dim() != 3 or vectors.shape[:2] != (n, d):
        raise ValueError(f"vectors must have shape ({n}, {d}, K), got {tuple(vectors.shape)}")
    v = vectors.to(zs.dtype).permute(2, 0, 1).reshape(k * n, d)
    with dual_level():
        recon, jvp = unpack_dual(decoder(make_dual(zs, v)))
    if jvp is None:
        raise RuntimeError("volume_change_surrogate: the decoder's output ignores its input")
    # v^T J_f(x), kept in the graph of the encoder's parameters (create_graph).
    (vjp,) = grad(zs, xs, v, create_graph=True)
    surrogate = (vjp * jvp.detach()).sum(-1).reshape(k, n).mean(0)
    return surrogate, zs[:n], recon[:n]


def fif_loss_terms(
    model: nn.Module,
    batch: torch.Tensor,
    beta: float = 1.0,
    hutchinson_samples: int = 1,
    noise: float = 0.0,
) -> dict[str, torch.Tensor]:
    r"""The per-point terms of :func:`fif_loss` (same arguments): ``reconstruction``
    :math:`|x - g(f(x))|^2`, ``latent_nll`` :math:`-\log q(f(x))`, ``surrogate`` and
    ``loss`` (their combination), each of shape :math:`(N,)`, and ``z`` :math:`(N, d)`."""
    if batch.dim() != 2:
        raise ValueError(f"fif_loss: batch must have shape (N, D), got {tuple(batch.shape)}")
    if not noise >= 0:
        raise ValueError(f"fif_loss: noise must be >= 0, got {noise}")
    if noise > 0:
        batch = batch + noise * torch.randn_like(batch)
    surrogate, z, recon = volume_change_surrogate(
        model.encoder, model.decoder, batch, hutchinson_samples
    )
    reconstruction = (batch - recon).pow(2).sum(-1)
    latent_nll = -model.base_distribution().log_prob(z)
    return {
        "loss": beta * reconstruction + latent_nll - surrogate,
        "reconstruction": reconstruction,
        "latent_nll": latent_nll,
        "surrogate": surrogate,
        "z": z,
    }


def fif_loss(model: nn.Module, batch: torch.Tensor, **options) -> torch.Tensor:
    r"""Mean FIF loss
    :math:`\beta |x - g(f(x))|^2 - \log q(f(x)) - v^\top J_f(x)\,\mathrm{SG}(J_g(f(x)) v)`
    of a batch.

    Its gradient is, in expectation over the probes, that of
    :math:`\beta |x - \hat x|^2 - \log q(z) - \frac12\log\det(J_f J_f^\top)(x)`: the
    negative log-likelihood with the volume change evaluated at the data point, off the
    manifold, plus the reconstruction term that keeps :math:`f` a left inverse of
    :math:`g`. Its value is not a likelihood (evaluate with
    :meth:`~atlasdist.distributions.free_form.FreeFormInjectiveDistribution.projected_log_prob`).

    Arguments:
        model: a :class:`~atlasdist.distributions.free_form.FreeFormInjectiveFlow` (anything
            with ``encoder``, ``decoder`` and ``base_distribution()``).
        batch: data of shape :math:`(N, D)`.
        options: ``beta``, ``hutchinson_samples``, ``noise`` (keywords, as below; the
            arguments of :func:`fif_loss_terms`).
        beta: reconstruction weight :math:`\beta`; too small a weight lets the encoder keep
            the noise instead of the position along the manifold (reference/002, Fig. 3).
        hutchinson_samples: probes per point, :math:`1 \le K \le d`.
        noise: standard deviation of Gaussian noise added to the batch before the loss is
            computed (noise augmentation; every term sees the noisy points).

    Returns:
        Scalar tensor.

    Cost: see :func:`volume_change_surrogate` (the backward pass then differentiates through
    the encoder twice).

    Under a data-parallel :func:`~atlasdist.training.fit` each rank draws its probes and noise
    from its own stream of the global torch generator (seeded by ``fit``), so the ranks'
    estimates are independent and the averaged gradient has :math:`1/N` of one rank's
    variance.

    Example:
        >>> from functools import partial
        >>> from torch import nn
        >>> from atlasdist.distributions.free_form import FreeFormInjectiveFlow
        >>> from atlasdist.training import fit
        >>> model = FreeFormInjectiveFlow(nn.Linear(2, 1), nn.Linear(1, 2))
        >>> history = fit(model, torch.randn(64, 2), epochs=1,
        ...               loss_fn=partial(fif_loss, beta=10.0), progress=False)
        >>> len(history["loss"])
        1

    References:
        Sorrenson et al. (2023), *Lifting Architectural Constraints of Injective Flows*
        (reference/002).
    """
    return fif_loss_terms(model, batch, **options)["loss"].mean()
