r"""Elementwise monotonic rational-quadratic splines with per-chart knots.

Reference:
    Durkan, Bekasov, Murray & Papamakarios, *Neural spline flows*, NeurIPS 2019.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .._checks import check_parameter, parameters_trusted, trusted_parameters
from .cache import cached
from .conformal import store
from .injective import InjectiveTransform

__all__ = ["RationalQuadraticSpline", "spline_knots"]

_MIN_BIN = 1e-3
_MIN_DERIVATIVE = 1e-3


def _softmax(x: torch.Tensor) -> torch.Tensor:
    # Softmax over the last dimension. On CPU torch's kernel vectorizes along that dimension
    # and is about 5x slower (forward; 2.5x with backward) than four plain passes when it is
    # shorter than 16 (8 bins, measured on an AVX-512 core); longer ones keep it. The
    # shift is detached: the softmax does not depend on it, so its gradient is zero anyway.
    if x.device.type != "cpu" or x.shape[-1] >= 16:
        return x.softmax(-1)
    e = (x - x.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def spline_knots(widths, heights, derivatives, bound: float):
    r"""Knots of monotonic rational-quadratic splines on :math:`[-B, B]` from unconstrained
    parameters: ``widths`` and ``heights`` of shape :math:`(*, d, S)` (softmax over the
    :math:`S` bins, each bin at least :math:`10^{-3}` of the range), ``derivatives`` at the
    :math:`S - 1` inner knots :math:`(*, d, S-1)` (softplus, at least :math:`10^{-3}`); the
    derivative at :math:`\pm B` is 1, so the spline joins the identity outside.

    Returns:
        ``(xs, ys, ds)``, each of shape :math:`(*, d, S + 1)`: knot abscissae, ordinates and
        derivatives.
    """
    bins = widths.shape[-1]

    def knots(raw):
        size = _MIN_BIN + (1 - _MIN_BIN * bins) * _softmax(raw)
        cum = F.pad(size.cumsum(-1), (1, 0))
        cum = 2 * bound * cum - bound
        # Exact end points, whatever the rounding of the cumulative sum.
        return torch.cat(
            [
                cum[..., :1].clamp(-bound, -bound),
                cum[..., 1:-1],
                cum[..., -1:].clamp(bound, bound),
            ],
            -1,
        )

    inner = _MIN_DERIVATIVE + F.softplus(derivatives)
    one = torch.ones_like(inner[..., :1])
    return knots(widths), knots(heights), torch.cat([one, inner, one], -1)


def _check_knots(xs, ys, ds, bound: float) -> None:
    # Given knots (not those of spline_knots) must describe a monotonic spline joining the
    # identity at +-bound, else the map is not a bijection and its log-det is wrong.
    name = "RationalQuadraticSpline"
    for label, value in (("xs", xs), ("ys", ys), ("ds", ds)):
        check_parameter(value, label, name, tensor=True)
    for label, value in (("xs", xs), ("ys", ys)):
        if not bool((value[..., 1:] > value[..., :-1]).all()):
            raise ValueError(f"{name}: the knots {label} must increase along the last dimension")
        ends = value[..., [0, -1]].abs() - bound
        if not bool((ends.abs() <= 1e-6 * bound).all()):
            raise ValueError(
                f"{name}: the knots {label} must start at -bound and end at +bound "
                f"(bound = {bound}); build them with spline_knots(...)"
            )
    if not bool((ds > 0).all()):
        raise ValueError(f"{name}: the knot derivatives ds must be > 0")


def _pack(xs, ys, ds):
    # Per bin, the values the formulas of RationalQuadraticSpline._map read, so that a pass
    # gathers them once and does little per element: x_k, y_k, w_k, s_k, c_k, A_k, B_k,
    # delta_k and E_k, with c_k = delta_k + delta_{k+1} - 2 s_k, A_k = h_k (s_k - delta_k),
    # B_k = h_k delta_k and E_k = 2 (s_k - delta_k).
    x0, y0 = xs[..., :-1], ys[..., :-1]
    w, h = xs[..., 1:] - x0, ys[..., 1:] - y0
    slope = h / w
    d0, d1 = ds[..., :-1], ds[..., 1:]
    rise = slope - d0
    planes = [x0, y0, w, slope, d0 + d1 - 2 * slope, h * rise, h * d0, d0, 2 * rise]
    return torch.stack(planes).reshape(len(planes), -1)


class OnePassBijection(InjectiveTransform):
    r"""A bijection of :math:`\mathbb{R}^d` whose passes give their log-det with the output:
    subclasses implement ``_map(x, inverse) -> (out, ladj of that pass)``; the last pass's
    ``(x, y, ladj)`` is kept, so ``log_abs_det_jacobian(x, y)`` right after it costs nothing
    (the same tensors, by identity), and any other pair is recomputed."""

    sign = +1
    _last = None

    def _map(self, x, inverse: bool):
        raise NotImplementedError  # abstract

    def _call(self, x):
        y, ladj = self._map(x, inverse=False)
        self._last = (x, y, ladj)
        return y

    def _inverse(self, y):
        x, ladj = self._map(y, inverse=True)
        self._last = (x, y, -ladj)
        return x

    def call_and_ladj(self, x):
        y = self(x)
        return y, self._last[2]

    def log_abs_det_jacobian(self, x, y):
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        return self._map(x, inverse=False)[1]


class RationalQuadraticSpline(OnePassBijection):
    r"""Monotonic rational-quadratic spline applied to each coordinate of
    :math:`\mathbb{R}^d`, the identity outside :math:`[-B, B]` (Durkan et al. 2019). In bin
    :math:`k` with :math:`\xi = (x - x_k)/w_k` and slope :math:`s_k = h_k / w_k`,

    .. math::
        y = y_k + h_k \frac{s_k \xi^2 + \delta_k \xi(1-\xi)}
            {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi(1-\xi)},

    with the closed-form derivative and inverse (a quadratic). The log-det is summed over the
    :math:`d` coordinates (``event_dim`` 1).

    Knots are tables of shape :math:`(R, d, S + 1)` (:func:`spline_knots`); ``index``
    (:math:`(B,)`) gives the table row of each input row, e.g. its chart, so knots are computed
    once per chart. Without ``index`` the rows of the tables meet the rows of the input
    (:math:`R = B`, or :math:`R = 1` for all).

    Cost: :math:`S - 1` comparisons and a few gathers per coordinate.
    """

    def __init__(self, xs, ys, ds, bound: float, index: torch.Tensor | None = None):
        if xs.dim() != 3 or xs.shape != ys.shape or xs.shape != ds.shape:
            raise ValueError(
                "RationalQuadraticSpline: knots must have one shape (R, d, S + 1), got "
                f"{tuple(xs.shape)}, {tuple(ys.shape)}, {tuple(ds.shape)}"
            )
        check_parameter(float(bound), "bound", "RationalQuadraticSpline", positive=True)
        super().__init__(xs.shape[1], xs.shape[1])
        if not parameters_trusted():
            _check_knots(xs, ys, ds, float(bound))
        for name, value in (("xs", xs), ("ys", ys), ("ds", ds)):
            store(self, name, value)
        self.bound, self.index = float(bound), index
        self._last = None

    @classmethod
    def from_parameters(cls, widths, heights, derivatives, bound: float, index=None):
        """The spline of unconstrained parameters (see :func:`spline_knots`); the knots are
        valid by construction and not checked (the per-call path of a hypernetwork)."""
        knots = spline_knots(widths, heights, derivatives, bound)
        with trusted_parameters():
            return cls(*knots, bound=bound, index=index)

    def _rows(self, x):
        rows, features = x.shape[-2], x.shape[-1]
        if self.index is not None:
            table_row = self.index
        elif self.xs.shape[0] == rows:
            table_row = torch.arange(rows, device=x.device)
        else:
            table_row = torch.zeros(rows, dtype=torch.long, device=x.device)
        lead = x.numel() // max(1, rows * features)
        return table_row.repeat(lead) if lead > 1 else table_row

    def _bins(self):
        # Per table row (chart) and bin, the values the formulas need (_pack), packed once.
        # A table packed without a graph (under no_grad) is packed again when the knots need
        # a gradient and gradients are on, else that call would silently give none.
        knots = (self.xs, self.ys, self.ds)
        packed = getattr(self, "_packed", None)
        if packed is None or (
            not packed.requires_grad
            and torch.is_grad_enabled()
            and any(k.requires_grad for k in knots)
        ):
            packed = cached(RationalQuadraticSpline, "bins", knots, lambda: _pack(*knots))
            self._packed = packed
        return packed

    def _map(self, x, inverse: bool):
        if x.dim() == 1:
            y, ladj = self._map(x.unsqueeze(0), inverse)
            return y[0], ladj[0]
        shape = x.shape
        features = shape[-1]
        flat = x.reshape(-1, features)
        row = self._rows(x)
        knots_in = self.ys if inverse else self.xs
        bins = knots_in.shape[-1] - 1
        inside = flat.abs() < self.bound
        clamped = flat.clamp(-self.bound, self.bound)
        # The bin: how many inner knots lie below x, summed over the S - 1 knot planes (each
        # gathered per row as a contiguous (rows, d) plane; much faster than a search).
        planes = knots_in[..., 1:-1].permute(2, 0, 1).index_select(1, row)
        count = torch.uint8 if bins <= 255 else torch.int64  # small sums: no int64 pass
        k = (clamped.unsqueeze(0) > planes).sum(0, dtype=count)
        # The row of each (point, coordinate) in the bin table. 32-bit indices gather faster,
        # but the gather's backward then takes a path about 7 times slower (index_add_ instead
        # of scatter_add_, torch 2.13 CPU): 64-bit ones when the table needs a gradient.
        table = self._bins().to(x.dtype)
        index = torch.int64 if table.requires_grad or self.xs.numel() >= 2**31 else torch.int32
        first = (row.to(index) * (features * bins)).unsqueeze(-1)
        at = first + torch.arange(0, features * bins, bins, device=x.device, dtype=index) + k
        planes = table.index_select(1, at.reshape(-1))
        x0, y0, w, slope, c, rise_h, d0_h, d0, rise2 = planes.reshape((len(planes),) + flat.shape)
        # With xi = (x - x_k) / w_k in the bin: y = y_k + xi (A xi + B) / den,
        # den = s + c xi (1 - xi), and dy/dx = (s / den)^2 (delta_k + xi (c xi + E)).
        if inverse:
            # The root in [0, 1] of (A + dy c) xi^2 + (B - dy c) xi - s dy = 0, dy = y - y_k,
            # in the form without cancellation: xi = 2 s dy / (b + sqrt(b^2 + 4 a s dy)).
            dy = clamped - y0
            dyc = dy * c
            a = rise_h + dyc
            b = d0_h - dyc
            sdy = slope * dy
            root = torch.addcmul(b * b, a, sdy, value=4).clamp_min(0).sqrt()
            xi = (sdy + sdy) / (b + root)
            out = torch.addcmul(x0, xi, w)
        else:
            xi = (clamped - x0) / w
        cxi = c * xi
        denom = torch.addcmul(slope, cxi, 1 - xi)
        if not inverse:
            out = torch.addcdiv(y0, xi * torch.addcmul(d0_h, rise_h, xi), denom)
        q = slope / denom
        log_deriv = (q * q * torch.addcmul(d0, xi, cxi + rise2)).log()
        out = torch.where(inside, out, flat)
        log_det = torch.where(inside, log_deriv, 0.0).sum(-1)
        if inverse:
            log_det = -log_det
        return out.reshape(shape), log_det.reshape(shape[:-1])

    def extra_repr(self) -> str:
        return f"features={self.in_features}, bins={self.xs.shape[-1] - 1}, bound={self.bound}"
