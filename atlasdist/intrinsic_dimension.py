r"""Intrinsic dimension from a learned manifold prior: fit a
:class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow` and count the prior scales
that do not collapse.

References:
    reference/001 (*On the latent space of flow-based models*), Sections 1-2; Zhang, Sun,
    Zhang & McDonagh, *Spread flows for manifold modelling*, AISTATS 2023, arXiv:2109.14216.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distributions.manifold_prior import (
    ManifoldPriorFlow,
    largest_gap_dimension,
    spread_negative_log_likelihood,
)
from .training.mle import fit

__all__ = ["IntrinsicDimension", "estimate_intrinsic_dimension"]


@dataclass(frozen=True)
class IntrinsicDimension:
    r"""What :func:`estimate_intrinsic_dimension` returns.

    Attributes:
        dimension: the estimate :math:`\hat d` (the rule applied to ``spectrum``).
        spectrum: median over charts of the sorted chart spectra, shape :math:`(D,)`, data
            units.
        chart_spectra: each chart's sorted scales, shape :math:`(K, D)`.
        chart_dimensions: the rule applied to each chart, shape :math:`(K,)`.
        model: the fitted :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow`.
        history: the training history of :func:`~atlasdist.training.fit`.
    """

    dimension: int
    spectrum: torch.Tensor
    chart_spectra: torch.Tensor
    chart_dimensions: torch.Tensor
    model: ManifoldPriorFlow
    history: dict


def estimate_intrinsic_dimension(
    x: torch.Tensor,
    *,
    charts: int | None = None,
    noise: float = 0.05,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 3e-3,
    min_ratio: float = 2.5,
    seed: int | None = 0,
    progress: bool = False,
    **model_kwargs,
) -> IntrinsicDimension:
    r""":math:`\hat d = \arg\max_k \log(\tilde s_{(k)}/\tilde s_{(k+1)})` (or :math:`D` when
    no ratio reaches ``min_ratio``), :math:`\tilde s` the median chart spectrum of a
    :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow` fitted to :math:`x`.

    The method:

    1. Normalise :math:`x` by its mean and its largest principal standard deviation
       :math:`\rho`; cut it into :math:`K` charts by k-means; give each chart the principal
       axes of its cell as frame (then turned by a learned rotation) and its principal
       standard deviations as initial scales.
    2. Fit volume-preserving coupling flows (shared, conditioned on the chart) and the
       per-chart diagonal priors :math:`\mathcal{N}(0, S_k^2 + \sigma^2 I)` by maximum
       likelihood on the data spread by :math:`\mathcal{N}(0, \rho^2\sigma^2 I)`
       (:func:`~atlasdist.distributions.manifold_prior.spread_negative_log_likelihood`).
       The flows flatten each chart; the prior scales along the directions the data do not
       fill collapse to the noise level.
    3. Apply :func:`~atlasdist.distributions.manifold_prior.largest_gap_dimension` to the
       median chart spectrum.

    **Picking** :math:`d` **for an atlas.** Use ``dimension`` as the latent dimension ``d``
    of :class:`~atlasdist.AtlasFlow` (``AtlasFlow(D, d, charts)``). Look at ``spectrum``
    first: a clear gap (ratio well above ``min_ratio``) means a clear answer; a ratio near
    ``min_ratio`` or charts that disagree (``chart_dimensions``) mean the data are too noisy,
    too sparse or too curved for this chart size: try more charts, more points or a
    different ``noise``. Directions with an extent below about :math:`\rho\sigma` (the
    resolution) count as noise.

    Arguments:
        x: data, shape :math:`(N, D)`.
        charts: :math:`K` (default :math:`\min(16, \lfloor N / \max(50, 10D) \rfloor)`, at
            least 1: 16 charts of 125 points for 2000 points in :math:`D \le 5`).
        noise: spread :math:`\sigma` relative to :math:`\rho`; keep it above the data's own
            noise and well below a chart's extent.
        steps: optimiser steps (Adam).
        batch_size, lr: of the optimiser.
        min_ratio: see :func:`~atlasdist.distributions.manifold_prior.largest_gap_dimension`.
        seed: seeds k-means and training (``None``: random).
        progress: show a progress bar.
        model_kwargs: passed to :class:`~atlasdist.distributions.manifold_prior.ManifoldPriorFlow`
            (``hidden``, ``blocks``, ``splits``...).

    Returns:
        An :class:`IntrinsicDimension`.

    Example:
        >>> from atlasdist import datasets
        >>> x = datasets.sinusoid(1000, noise=0.01, seed=0)
        >>> estimate_intrinsic_dimension(x, charts=1, steps=200).dimension
        1

    Cost: ``steps`` passes of the coupling flow over a batch; about 10-40 s for the default
    settings on two CPU cores for :math:`D \le 20`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"estimate_intrinsic_dimension: x must be a torch.Tensor of shape (N, D), got "
            f"{type(x).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(
            f"estimate_intrinsic_dimension: x must have shape (N, D), got {tuple(x.shape)}"
        )
    N, D = x.shape
    if charts is None:
        per_chart = max(50, 10 * D)
        charts = max(1, min(16, N // per_chart))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"estimate_intrinsic_dimension: steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"estimate_intrinsic_dimension: batch_size must be an int >= 1, got {batch_size!r}"
        )
    if N < max(2 * charts, D + 1):
        raise ValueError(
            f"estimate_intrinsic_dimension: need N >= max(2 * charts, D + 1) points, got N={N}, "
            f"D={D}, charts={charts}"
        )
    if not min_ratio > 1:
        raise ValueError(f"estimate_intrinsic_dimension: min_ratio must be > 1, got {min_ratio}")
    model = ManifoldPriorFlow.from_data(x, charts, noise=noise, seed=seed, **model_kwargs)
    batch_size = min(batch_size, N)
    epochs = math.ceil(steps / math.ceil(N / batch_size))
    history = fit(
        model,
        x.detach(),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        loss_fn=spread_negative_log_likelihood,
        seed=seed,
        progress=progress,
    )
    chart_spectra = model.spectrum()
    spectrum = chart_spectra.median(0).values
    return IntrinsicDimension(
        dimension=int(largest_gap_dimension(spectrum, min_ratio)),
        spectrum=spectrum,
        chart_spectra=chart_spectra,
        chart_dimensions=largest_gap_dimension(chart_spectra, min_ratio),
        model=model,
        history=history,
    )
