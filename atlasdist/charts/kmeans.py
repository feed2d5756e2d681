"""k-means with k-means++ initialisation, batched in torch (chart centres from data)."""

from __future__ import annotations

import torch

from .._checks import check_count, check_floating, check_parameter

__all__ = ["kmeans"]


def kmeans(
    x: torch.Tensor, k: int, iters: int = 50, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Lloyd's k-means from a k-means++ start.

    Arguments:
        x: points of shape :math:`(N, c)`, :math:`N \ge k`.
        k: number of centres.
        iters: Lloyd iterations (stops early when assignments settle).
        generator: random generator for the k-means++ draws.

    Returns:
        ``(centres (k, c), assignment (N,))``.

    Example:
        >>> x = torch.cat([torch.zeros(5, 2), torch.ones(5, 2)])
        >>> centres, labels = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
        >>> sorted(centres.sum(-1).tolist())
        [0.0, 2.0]
    """
    check_floating(x, "kmeans", "x")
    k = check_count(k, "k", "kmeans")
    iters = check_count(iters, "iters", "kmeans", minimum=0)
    if x.dim() != 2 or x.shape[0] < k:
        raise ValueError(
            f"kmeans: need x of shape (N, c) with N >= k >= 1, got {tuple(x.shape)}, k={k}"
        )
    check_parameter(x, "x", "kmeans")
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").to(x.device)
    centres = x[first]
    d2 = (x - centres).pow(2).sum(-1)
    for _ in range(1, k):
        weights = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / n)
        pick = torch.multinomial(weights.cpu(), 1, generator=generator).to(x.device)
        centres = torch.cat([centres, x[pick]])
        d2 = torch.minimum(d2, (x - x[pick]).pow(2).sum(-1))
    labels = torch.cdist(x, centres).argmin(-1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        # An empty cluster keeps its centre.
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        new = torch.cdist(x, centres).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return centres, labels
