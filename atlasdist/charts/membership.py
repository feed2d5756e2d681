r"""Chart membership: candidate charts of a point from its distances to the chart centres.

With an encoder :math:`E` into a code space, chart centres :math:`v_1, \dots, v_K`,
:math:`d_k(x) = |E(x) - v_k|` and :math:`\tilde d_m(x)` the :math:`m`-th smallest of them, the
chart regions are (reference/000, "The chart regions")

.. math:: U_k = \{x : d_k(x) < (1 + \varepsilon)\, \tilde d_m(x)\}.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_count, check_features, check_floating, check_parameter

__all__ = ["ChartMembership"]


class ChartMembership(nn.Module):
    r"""Candidate charts :math:`\{k : x \in U_k\}` of points, batched, with a fixed cap.

    ``candidates(x, centres)`` returns the indices of the ``cap`` nearest centres in code space
    and a mask of those inside their region :math:`U_k` (the :math:`m` nearest always are;
    the :math:`\varepsilon` slack admits up to ``cap - m`` more). Cost: the :math:`K` code-space
    distances plus a top-``cap`` selection; the flows downstream run on ``cap`` charts per
    point, not :math:`K`.

    Arguments:
        m: number of nearest charts that are always candidates.
        eps: slack :math:`\varepsilon \ge 0` of the regions.
        cap: most candidates per point (default :math:`m`, i.e. no slack beyond ties);
            clipped to :math:`K`.
        encoder: the code map :math:`E` (default: the identity, code space = data space).

    Example:
        >>> membership = ChartMembership(m=1)
        >>> centres = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
        >>> idx, mask = membership.candidates(torch.tensor([[3.0, 1.0]]), centres)
        >>> idx, mask
        (tensor([[1]]), tensor([[True]]))
    """

    def __init__(self, m: int = 2, eps: float = 0.0, cap: int | None = None, encoder=None):
        super().__init__()
        m = check_count(m, "m", "ChartMembership")
        check_parameter(eps, "eps", "ChartMembership", nonnegative=True)
        cap = m if cap is None else check_count(cap, "cap", "ChartMembership")
        if cap < m:
            raise ValueError(f"ChartMembership: cap must be >= m, got cap={cap} < m={m}")
        self.m, self.eps, self.cap = m, float(eps), cap
        self.encoder = nn.Identity() if encoder is None else encoder

    def extra_repr(self) -> str:
        return f"m={self.m}, eps={self.eps}, cap={self.cap}"

    def distances(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        r""":math:`d_k(x)` for all charts: ``x`` :math:`(*, D)`, ``centres`` :math:`(K, c)`
        :math:`\to (*, K)`."""
        code = self._code(x, centres)
        return torch.cdist(code.reshape(-1, code.shape[-1]), centres).reshape(
            code.shape[:-1] + centres.shape[:1]
        )

    def _code(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        # dtype and device only (metadata): an atlas has checked its values for NaN already,
        # and a second finiteness check here would cost a device sync per call.
        check_floating(x, "ChartMembership", "point", centres)
        code = self.encoder(x)
        check_features(code, centres.shape[-1], "ChartMembership", "encoded point")
        return code

    def _squared_distances(
        self, x: torch.Tensor, centres: torch.Tensor, per_row_offset: bool = True
    ) -> torch.Tensor:
        # For the choice of charts (no gradient): |E(x) - v|^2 = |y|^2 + |w|^2 - 2 y.w with
        # y = E(x) - mu, w = v - mu, mu the mean centre, as one product with the centres:
        # centred, so |E(x)|^2 does not cancel against |v|^2 for data far from the origin.
        # Without ``per_row_offset`` the |y|^2 of each row is left out: the same order and
        # ties within a row, for a ranking.
        code = self._code(x, centres)
        mu = centres.mean(0)
        y = code.reshape(-1, code.shape[-1]) - mu
        w = centres - mu
        squared = torch.addmm(w.square().sum(-1), y, w.mT, alpha=-2)
        if per_row_offset:
            offset = torch.linalg.vector_norm(y, dim=-1).square().unsqueeze(-1)
            squared = (squared + offset).clamp(min=0)
        return squared.reshape(code.shape[:-1] + centres.shape[:1])

    def candidates(
        self, x: torch.Tensor, centres: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Candidate charts of each point.

        Returns:
            ``(index, mask)``, both of shape :math:`(*, \min(\text{cap}, K))`: chart indices
            sorted by distance, and whether each lies in its region :math:`U_k`.
        """
        # Squared distances (up to a per-row offset, which the region test only needs for eps
        # > 0): the same order as the distances.
        squared = self._squared_distances(x, centres, per_row_offset=self.eps > 0)
        num_charts = squared.shape[-1]
        cap, m = min(self.cap, num_charts), min(self.m, num_charts)
        near, index = squared.topk(cap, dim=-1, largest=False, sorted=True)
        d_m = near[..., m - 1 : m]
        mask = near <= d_m if self.eps == 0 else near < (1 + self.eps) ** 2 * d_m
        # The m nearest are always in (ties at d_m included); <= keeps exact ties for eps = 0.
        mask[..., :m] = True
        return index, mask

    def regions(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        r"""Membership of every chart, :math:`1[x \in U_k]`, shape :math:`(*, K)` (all
        :math:`K` charts; for tests and diagnostics, not the hot path)."""
        squared = self._squared_distances(x, centres, per_row_offset=self.eps > 0)
        m = min(self.m, squared.shape[-1])
        nearest = squared.topk(m, dim=-1, largest=False)
        d_m = nearest.values[..., m - 1 : m]
        if self.eps == 0:
            return squared <= d_m
        # The m nearest always are in, as in candidates (a point on a centre has d_m = 0).
        inside = squared < (1 + self.eps) ** 2 * d_m
        return inside.scatter(-1, nearest.indices, True)
