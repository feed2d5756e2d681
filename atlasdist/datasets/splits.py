r"""The train / validation / test split of the Riemannian density-estimation literature."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["split"]


def split(x, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple:
    r"""Shuffles the rows of ``x`` with numpy's ``default_rng(seed).permutation`` and cuts them
    into consecutive parts of the given fractions (the protocol of the published earth
    tables: 80 / 10 / 10 for train / validation / test, one split per seed).

    Every part after the first gets :math:`\lfloor f_i N \rfloor` rows and the first part the
    rest (for 80 / 10 / 10: :math:`N // 10` validation and test rows, as in the published
    code), so the parts are disjoint and cover ``x``.

    Arguments:
        x: a tensor or array with the points along the first dimension, shape :math:`(N, *)`.
        seed: the seed of numpy's ``default_rng``.
        fractions: positive fractions summing to 1, one per part.

    Returns:
        A tuple of ``x[indices]``, one per fraction, in order.

    Example:
        >>> train, val, test = split(torch.arange(827), seed=0)
        >>> len(train), len(val), len(test)
        (663, 82, 82)
    """
    fractions = [float(f) for f in fractions]
    if not fractions or not all(f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"split: fractions must be positive and sum to 1 (e.g. (0.8, 0.1, 0.1)), got "
            f"{tuple(fractions)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"split: seed must be an int, got {seed!r}")
    n = len(x)
    # 1e-9 guards floor(0.1 * N) against a product that lands just below an integer.
    sizes = [math.floor(f * n + 1e-9) for f in fractions[1:]]
    sizes.insert(0, n - sum(sizes))
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    index = [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if isinstance(x, np.ndarray):
        return tuple(x[i] for i in index)
    import torch

    return tuple(x[torch.from_numpy(i).to(getattr(x, "device", "cpu"))] for i in index)
