r"""Training objectives for atlases whose charts are learned from data."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AtlasObjective"]


class AtlasObjective:
    r"""Chart-mixture maximum likelihood plus reconstruction (reference/000, eq. 2):

    .. math::
        \mathcal{L}(x) = -\log \sum_{k \in C(x)} \pi_k\, p_k(\hat x_k)
        + \beta \sum_{k \in C(x)} p(k \mid x)\, |x - \hat x_k|^2,
        \qquad \hat x_k = g_k(f_k(x)),

    over the candidate charts :math:`C(x)` of the membership, each chart's density at its own
    projection :math:`\hat x_k` (the reference's eq. 2 for points near, not on, the chart
    images) and :math:`p(k|x) \propto \pi_k p_k(\hat x_k)` (held fixed in the gradient). The
    reconstruction term pulls the charts onto the data; without it a chart could raise its
    density by shrinking away from the data.

    Schedules (the ones users of injective flows rely on):

    - ``"joint"``: the whole loss from the start;
    - ``"manifold-first"``: only the reconstruction term for the first ``manifold_epochs``
      epochs (the charts settle on the data), then the whole loss.

    :meth:`monitor` reports, on held-out data, the log-likelihood of the thickened model with
    :math:`\sigma = (2\beta)^{-1/2}` (the noise level that the reconstruction weight
    corresponds to; a density on :math:`\mathbb{R}^D`, see
    :class:`~atlasdist.distributions.AtlasFlowDistribution`) and the mean distance to the
    support: the surrogate loss alone says little about fit.

    Arguments:
        beta: weight :math:`\beta` of the reconstruction term (in nats per squared data unit).
        schedule: ``"joint"`` or ``"manifold-first"``.
        manifold_epochs: length of the manifold phase.

    Under a data-parallel :func:`~atlasdist.training.fit` the parameters that the manifold phase
    leaves without a gradient keep none on every rank (no collective waits for them).

    Example:
        >>> objective = AtlasObjective(beta=100.0, schedule="manifold-first", manifold_epochs=5)
        >>> # fit(atlas, data, loss_fn=objective, val_data=held_out)
    """

    def __init__(self, beta: float = 100.0, schedule: str = "joint", manifold_epochs: int = 0):
        if schedule not in ("joint", "manifold-first"):
            raise ValueError(f"schedule must be 'joint' or 'manifold-first', got {schedule!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.schedule, self.manifold_epochs = float(beta), schedule, manifold_epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def manifold_phase(self) -> bool:
        return self.schedule == "manifold-first" and self.epoch < self.manifold_epochs

    def terms(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-point surrogate log-likelihood and posterior-weighted squared reconstruction."""
        terms = model.flow(noise_scale=None, validate_args=False).chart_terms(batch)
        log_joint = terms["log_joint"].masked_fill(~terms["region"], -math.inf)
        log_mix = log_joint.logsumexp(-1)
        posterior = (log_joint - log_mix.unsqueeze(-1)).exp().detach()
        # Pairs outside the region, or at a chart's pole (error inf, posterior 0), add nothing.
        error = terms["error"].masked_fill(~terms["region"] | terms["error"].isinf(), 0.0)
        return {"log_mix": log_mix, "reconstruction": (posterior * error.pow(2)).sum(-1)}

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        t = self.terms(model, batch)
        if self.manifold_phase:
            return t["reconstruction"].mean()
        return -t["log_mix"].mean() + self.beta * t["reconstruction"].mean()

    @property
    def noise_scale(self) -> float:
        return (2 * self.beta) ** -0.5 if self.beta > 0 else math.inf

    @torch.no_grad()
    def monitor(self, model: nn.Module, data: torch.Tensor) -> dict[str, float]:
        """Held-out log-likelihood of the thickened model and mean distance to the support:
        means over the points of ``data``, so that a data-parallel :func:`fit` averages the
        ranks' shards weighted by their sizes."""
        p = model.flow(noise_scale=self.noise_scale, validate_args=False)
        return {
            "val_log_prob_thickened": float(p.log_prob(data).mean()),
            "val_distance": float(p.distance_to_support(data).mean()),
        }
