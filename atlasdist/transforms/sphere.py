r"""Simple flows on the unit sphere :math:`S^{n-1} \subset \mathbb{R}^n`: an invertible affine
map of :math:`\mathbb{R}^n` followed by the radial projection back onto the sphere.

Each flow is a bijection of the sphere (``event_dim`` 1) with a closed-form inverse and a
closed-form differential volume ratio :math:`R_f(x) = |\det(T_y^\top F_x T_x)|` (the factor by
which :math:`f` scales :math:`(n-1)`-dimensional surface area at :math:`x`):
``log_abs_det_jacobian(x, y)`` returns :math:`\log R_f(x)` with shape :math:`(*)`, so a density
w.r.t. the surface measure pushes forward as :math:`p_Y(y) = p_X(x) / R_f(x)`.

- :class:`NormalizedTranslation`: :math:`f(x) = \frac{x + c}{|x + c|}`,
  :math:`R_f(x) = \frac{1 + x^\top c}{|x + c|^n}`;
- :class:`NormalizedLinear`: :math:`f(x) = \frac{Mx}{|Mx|}`,
  :math:`R_f(x) = \frac{|\det M|}{|Mx|^n}`;
- :class:`NormalizedAffine`: :math:`f(x) = \frac{Mx + c}{|Mx + c|}`,
  :math:`R_f(x) = \frac{|\det M|\,(1 + x^\top M^{-1}c)}{|Mx + c|^n}`.

Parameters are unconstrained: every real value gives a bijection (:math:`|c| < 1`,
:math:`M` invertible, :math:`|M^{-1}c| < 1`), and 0 gives the identity. Given with leading
batch dimensions (:meth:`~atlasdist.transforms.manifold.ManifoldFlow.from_parameters`, e.g.
produced from a context by :class:`~atlasdist.transforms.Conditional`), parameters of shape
:math:`(B, \dots)` give one flow per row for points of shape :math:`(*, B, n)`.

**Off-sphere inputs.** With validation on (:func:`atlasdist._checks.validation_enabled`), a
point whose norm differs from 1 by more than :func:`~atlasdist.manifolds.sphere_tolerance`
raises ``ValueError`` stating how far off it is. With validation off, inputs of both ``f`` and
``f.inv`` are first projected radially (:func:`~atlasdist.manifolds.sphere_projection`).

References:
    *Flow-based generative model*, Wikipedia, section "Simple spherical flows"
    (reference/003); Boulerice & Ducharme (1994) for :math:`R_\mathrm{trans}`; the angular
    central Gaussian (Tyler 1987) for :math:`R_\mathrm{lin}`.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_features, check_parameter
from ..manifolds.sphere import check_on_sphere as check_on_sphere
from ..manifolds.sphere import sphere_projection, unit_sphere
from ..manifolds.sphere import sphere_tolerance as sphere_tolerance
from .conformal import matvec
from .manifold import ManifoldFlow, qr_inverse, qr_parametrized

# unit_sphere, sphere_tolerance and check_on_sphere live in atlasdist.manifolds.sphere; they
# stay importable from here.
__all__ = ["NormalizedTranslation", "NormalizedLinear", "NormalizedAffine"]


class _SphereFlow(ManifoldFlow):
    manifold = "the sphere S^(n-1)"
    domain = unit_sphere
    codomain = unit_sphere


def _squash(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`c = r / \sqrt{1 + |r|^2}` and :math:`1 - |c|^2 = 1 / (1 + |r|^2)`.

    The complement is computed from :math:`r`, not from :math:`c`: it stays positive to full
    relative precision while :math:`|r|^2` is finite (:math:`|r| < 10^{154}` in float64), where
    :math:`1 - |c|^2` would round to 0 from :math:`|r| \approx 10^8` on.
    """
    r2 = raw.pow(2).sum(-1, keepdim=True)
    return raw * (1 + r2).rsqrt(), (1 + r2).reciprocal()


def _unsquash(shift: torch.Tensor, name: str) -> torch.Tensor:
    norm2 = shift.pow(2).sum(-1, keepdim=True)
    if not bool((norm2 < 1).all()):
        raise ValueError(
            f"{name}: the shift must have norm < 1, got {float(norm2.sqrt().max()):.6g}; scale it "
            "down (any c with |c| < 1 is a bijection)"
        )
    return shift * (1 - norm2).rsqrt()


def _translation_inverse(
    y: torch.Tensor, c: torch.Tensor, one_minus_c2: torch.Tensor
) -> torch.Tensor:
    r""":math:`x = \rho y - c` with :math:`\rho > 0` the root of :math:`|\rho y - c| = 1`:
    :math:`\rho = t + \sqrt{t^2 + 1 - |c|^2}`, :math:`t = y^\top c`, for unit :math:`y`."""
    t = (y * c).sum(-1, keepdim=True)
    s = (t.square() + one_minus_c2).sqrt()
    # (t + s)(s - t) = 1 - |c|^2: the second form avoids cancellation when t < 0.
    rho = torch.where(t >= 0, t + s, one_minus_c2 / (s - t))
    return rho * y - c


class NormalizedTranslation(_SphereFlow):
    r"""Normalized translation flow :math:`f(x) = \frac{x + c}{|x + c|}` on :math:`S^{n-1}`,
    :math:`|c| < 1`.

    Inverse :math:`x = \rho y - c`, :math:`\rho = y^\top c + \sqrt{(y^\top c)^2 + 1 - |c|^2}`;
    volume ratio

    .. math::
        R_\mathrm{trans}(x; c) = \frac{1 + x^\top c}{|x + c|^n}.

    :math:`c = r / \sqrt{1 + |r|^2}` for the unconstrained parameter ``raw`` :math:`r`, so
    :math:`|c| < 1` for every :math:`r`. Points are tensors of shape :math:`(*, n)`; the
    log-det has shape :math:`(*)`. Cost :math:`O(n)` per point, forward and inverse.

    Arguments:
        features: :math:`n \ge 2`.
        shift: optional initial :math:`c` of shape :math:`(n,)`, :math:`|c| < 1` (default 0,
            the identity).

    Example:
        >>> f = NormalizedTranslation(3, shift=torch.tensor([0.0, 0.0, 0.5]))
        >>> x = torch.tensor([[1.0, 0.0, 0.0]])
        >>> y = f(x).detach()  # (1, 0, 0.5) / |(1, 0, 0.5)|
        >>> y
        tensor([[0.8944, 0.0000, 0.4472]])
        >>> f.log_abs_det_jacobian(x, y).detach()  # log(1 / 1.25^(3/2))
        tensor([-0.3347])

    References:
        reference/003, "Normalized translation flow"; Boulerice & Ducharme (1994).
    """

    def __init__(self, features: int, shift: torch.Tensor | None = None):
        super().__init__(features)
        if shift is None:
            raw = torch.zeros(self.in_features)
        else:
            check_features(shift, self.in_features, self.name, "shift")
            check_parameter(shift, "shift", self.name, tensor=True)
            raw = _unsquash(shift.detach().clone(), self.name)
        self.raw = nn.Parameter(raw)

    @property
    def shift(self) -> torch.Tensor:
        """:math:`c`, shape :math:`(n,)`, :math:`|c| < 1`."""
        return _squash(self.raw)[0]

    def _params(self, x):
        return _squash(self.raw.to(x.dtype))

    def _call(self, x):
        check_on_sphere(x, self.name)
        c, _ = self._params(x)
        return sphere_projection(sphere_projection(x) + c)

    def _inverse(self, y):
        check_on_sphere(y, self.name + ".inv")
        c, one_minus_c2 = self._params(y)
        return _translation_inverse(sphere_projection(y), c, one_minus_c2)

    def log_abs_det_jacobian(self, x, y):
        c, _ = self._params(x)
        x = sphere_projection(x)
        n = x.shape[-1]
        return (1 + (x * c).sum(-1)).log() - n * (x + c).norm(dim=-1).log()


class NormalizedLinear(_SphereFlow):
    r"""Normalized linear flow :math:`f(x) = \frac{Mx}{|Mx|}` on :math:`S^{n-1}`, :math:`M`
    invertible.

    Inverse :math:`f^{-1}(y) = \frac{M^{-1}y}{|M^{-1}y|}`; volume ratio

    .. math::
        R_\mathrm{lin}(x; M) = \frac{|\det M|}{|Mx|^n}.

    It pushes the uniform distribution on the sphere to the angular central Gaussian with
    :math:`\Sigma = M M^\top`. :math:`M = QR` is parametrized by an unconstrained
    :math:`n \times n` ``weight`` (:func:`atlasdist.transforms.manifold.qr_parametrized`): every
    value gives an invertible :math:`M` with :math:`\det M > 0`, and every such :math:`M` (up to
    the positive factor the flow ignores, fixed by :math:`\max_i R_{ii} = 1`) is reached. Cost
    :math:`O(n^2)` per point plus :math:`O(n^3)` per call for :math:`M` and :math:`M^{-1}`.

    Arguments:
        features: :math:`n \ge 2`.

    Example:
        >>> f = NormalizedLinear(3)  # weight 0: M = I, the identity
        >>> x = torch.tensor([[0.0, 0.6, 0.8]])
        >>> torch.equal(f(x), x), f.log_abs_det_jacobian(x, x)
        (True, tensor([0.], grad_fn=<SubBackward0>))

    References:
        reference/003, "Normalized linear flow"; Tyler, *Statistical analysis for the angular
        central Gaussian distribution on the sphere*, Biometrika 1987.
    """

    def __init__(self, features: int):
        super().__init__(features)
        self.weight = nn.Parameter(torch.zeros(self.in_features, self.in_features))

    def _qr(self, x):
        return qr_parametrized(self.weight.to(x.dtype), normalize=True)

    @property
    def matrix(self) -> torch.Tensor:
        """:math:`M`, shape :math:`(n, n)`."""
        q, r, _ = self._qr(self.weight)
        return q @ r

    def _call(self, x):
        check_on_sphere(x, self.name)
        q, r, _ = self._qr(x)
        return sphere_projection(matvec(q @ r, x))

    def _inverse(self, y):
        check_on_sphere(y, self.name + ".inv")
        q, r, _ = self._qr(y)
        return sphere_projection(matvec(qr_inverse(q, r), y))

    def log_abs_det_jacobian(self, x, y):
        q, r, logdet = self._qr(x)
        x = sphere_projection(x)
        return logdet - x.shape[-1] * matvec(q @ r, x).norm(dim=-1).log()


class NormalizedAffine(_SphereFlow):
    r"""Normalized affine flow :math:`f(x) = \frac{Mx + c}{|Mx + c|}` on :math:`S^{n-1}`,
    :math:`M` invertible, :math:`|M^{-1}c| < 1`.

    With :math:`b = M^{-1}c` it is the normalized translation by :math:`b` followed by the
    normalized linear flow of :math:`M`, hence the inverse
    :math:`f^{-1}(y) = \rho u - b`, :math:`u = \frac{M^{-1}y}{|M^{-1}y|}`,
    :math:`\rho = u^\top b + \sqrt{(u^\top b)^2 + 1 - |b|^2}` (the closed form of reference/003
    with :math:`W = (MM^\top)^{-1}`, rewritten in :math:`u`), and the volume ratio

    .. math::
        R_\mathrm{aff}(x; M, c) = \frac{|\det M|\,(1 + x^\top M^{-1}c)}{|Mx + c|^n}.

    Parametrized by an unconstrained :math:`n \times n` ``weight`` (:math:`M = QR` as in
    :class:`NormalizedLinear`) and ``raw`` :math:`r`, :math:`b = r / \sqrt{1 + |r|^2}`,
    :math:`c = Mb`: every value satisfies the constraints. Cost :math:`O(n^2)` per point plus
    :math:`O(n^3)` per call.

    Arguments:
        features: :math:`n \ge 2`.

    Example:
        >>> f = NormalizedAffine(2)  # the identity until trained
        >>> x = torch.tensor([[0.6, 0.8]])
        >>> torch.allclose(f.inv(f(x)), x)
        True

    References:
        reference/003, "Normalized affine flow".
    """

    def __init__(self, features: int):
        super().__init__(features)
        self.weight = nn.Parameter(torch.zeros(self.in_features, self.in_features))
        self.raw = nn.Parameter(torch.zeros(self.in_features))

    def _params(self, x):
        q, r, logdet = qr_parametrized(self.weight.to(x.dtype), normalize=True)
        b, one_minus_b2 = _squash(self.raw.to(x.dtype))
        return q, r, logdet, b, one_minus_b2

    @property
    def matrix(self) -> torch.Tensor:
        """:math:`M`, shape :math:`(n, n)`."""
        q, r, *_ = self._params(self.weight)
        return q @ r

    @property
    def shift(self) -> torch.Tensor:
        """:math:`c = Mb`, shape :math:`(n,)`."""
        q, r, _, b, _ = self._params(self.weight)
        return (q @ r) @ b

    @property
    def inner_shift(self) -> torch.Tensor:
        """:math:`b = M^{-1} c`, shape :math:`(n,)`, :math:`|b| < 1`."""
        return _squash(self.raw)[0]

    def _call(self, x):
        check_on_sphere(x, self.name)
        q, r, _, b, _ = self._params(x)
        return sphere_projection(matvec(q @ r, sphere_projection(x) + b))

    def _inverse(self, y):
        check_on_sphere(y, self.name + ".inv")
        q, r, _, b, one_minus_b2 = self._params(y)
        u = sphere_projection(matvec(qr_inverse(q, r), y))
        return _translation_inverse(u, b, one_minus_b2)

    def log_abs_det_jacobian(self, x, y):
        q, r, logdet, b, _ = self._params(x)
        x = sphere_projection(x)
        n = x.shape[-1]
        z = matvec(q @ r, x + b)
        return logdet + (1 + (x * b).sum(-1)).log() - n * z.norm(dim=-1).log()
