r"""Product embeddings :math:`(u_1, \dots, u_n) \mapsto (c_1(u_1), \dots, c_n(u_n))`."""

from __future__ import annotations

import torch
from torch import nn

from .injective import InjectiveTransform

__all__ = ["ProductEmbedding"]


class ProductEmbedding(InjectiveTransform):
    r"""Block-diagonal product of injective maps
    :math:`c(u_1, \dots, u_n) = (c_1(u_1), \dots, c_n(u_n))`,
    :math:`\mathbb{R}^{d_1+\dots+d_n} \to \mathbb{R}^{D_1+\dots+D_n}`.

    The Jacobian is block diagonal, so :math:`J^\top J` is too and the volume term is the sum
    of the parts' terms, :math:`\sum_i \frac{1}{2}\log\det(J_i^\top J_i)`. The product of
    conformal maps is not conformal in general (the factors differ), but its volume term is
    still closed-form. Example: the flat-coordinate torus
    :math:`S^1 \times S^1 \subset \mathbb{R}^4` as the product of two inverse stereographic
    charts.

    The left inverse applies each part's left inverse to its block.

    Arguments:
        parts: injective transforms (each with ``in_features``/``out_features``).

    Example:
        >>> from atlasdist.transforms import InverseStereographic
        >>> torus = ProductEmbedding([InverseStereographic(1), InverseStereographic(1)])
        >>> torus(torch.zeros(2))
        tensor([ 0., -1.,  0., -1.])
    """

    def __init__(self, parts):
        parts = list(parts)
        if not parts:
            raise ValueError("ProductEmbedding needs at least one part")
        for i, part in enumerate(parts):
            if not isinstance(part, InjectiveTransform):
                raise TypeError(
                    f"ProductEmbedding: part {i} ({type(part).__name__}) is not an "
                    "InjectiveTransform"
                )
        self._splits_in = [p.in_features for p in parts]
        self._splits_out = [p.out_features for p in parts]
        super().__init__(sum(self._splits_in), sum(self._splits_out))
        self.parts = nn.ModuleList(parts)

    def _call(self, x):
        blocks = torch.split(x, self._splits_in, dim=-1)
        return torch.cat([p(b) for p, b in zip(self.parts, blocks, strict=True)], -1)

    def _inverse(self, y):
        blocks = torch.split(y, self._splits_out, dim=-1)
        return torch.cat([p.inv(b) for p, b in zip(self.parts, blocks, strict=True)], -1)

    def call_and_ladj(self, x):
        ys, ladj = [], 0.0
        for part, block in zip(self.parts, torch.split(x, self._splits_in, dim=-1), strict=True):
            y, term = part.call_and_ladj(block)
            ys.append(y)
            ladj = ladj + term
        return torch.cat(ys, -1), ladj

    def log_abs_det_jacobian(self, x, y):
        xs = torch.split(x, self._splits_in, dim=-1)
        ys = torch.split(y, self._splits_out, dim=-1)
        return sum(
            p.log_abs_det_jacobian(a, b) for p, a, b in zip(self.parts, xs, ys, strict=True)
        )
