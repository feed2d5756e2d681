r"""Calibration flows on the open probability simplex
:math:`\Delta^{n-1} = \{p \in \mathbb{R}^n : p_i > 0, \sum_i p_i = 1\}`.

Both flows act in log-probability space and renormalize with a softmax:

- :class:`Calibration`: :math:`q = \operatorname{softmax}(\log(p) / a + c)`, :math:`a > 0`;
- :class:`GeneralizedCalibration`: :math:`q = \operatorname{softmax}(A \log p + c)` with
  :math:`A \mathbf{1} = \lambda \mathbf{1}`, :math:`A` invertible.

``log_abs_det_jacobian(x, y)`` returns the differential volume ratio :math:`\log R_f(p)`,
shape :math:`(*)`:

.. math::
    R_\mathrm{cal}(p) = a^{1-n} \prod_i \frac{q_i}{p_i}, \qquad
    R_\mathrm{gcal}(p) = \frac{|\det A|}{|\lambda|} \prod_i \frac{q_i}{p_i}.

**Measure.** :math:`R_f` is the ratio of :math:`(n-1)`-dimensional volumes at :math:`q` and
:math:`p`. It is the same whether volume is the Hausdorff (surface) measure of the simplex as a
subset of :math:`\mathbb{R}^n` or the Lebesgue measure :math:`dp_1 \cdots dp_{n-1}` of the
first :math:`n-1` coordinates (torch's convention, used by ``Dirichlet`` and
``StickBreakingTransform``), because the two differ by the constant factor
:math:`d\mathcal{H}^{n-1} = \sqrt{n}\, dp_1 \cdots dp_{n-1}`. So the flows push a density
w.r.t. either measure to a density w.r.t. the same measure; see
:mod:`atlasdist.manifolds.simplex` for the measures and :mod:`atlasdist.distributions.simplex`
for the densities themselves.

**Off-simplex inputs.** Both maps are invariant to :math:`p \mapsto \alpha p`,
:math:`\alpha > 0` (the softmax ignores a multiple of :math:`\mathbf{1}`), so a positive input
is read as its projection :math:`p / \sum_i p_i`. With validation on, an input with an entry
:math:`\le 0` or a sum off 1 by more than
:data:`~atlasdist.manifolds.SIMPLEX_TOLERANCE` raises ``ValueError`` stating how far off it
is.

Parameters are unconstrained, and 0 gives the identity. Given with leading batch dimensions
(:meth:`~atlasdist.transforms.manifold.ManifoldFlow.from_parameters`, e.g. produced from a
context by :class:`~atlasdist.transforms.Conditional`), parameters of shape :math:`(B, \dots)`
give one flow per row for points of shape :math:`(*, B, n)`.

References:
    *Flow-based generative model*, Wikipedia, sections "Simplex flow", "Simplex calibration
    transform" (reference/003).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_features, check_parameter
from ..manifolds.simplex import SIMPLEX_TOLERANCE as SIMPLEX_TOLERANCE
from ..manifolds.simplex import check_on_simplex as check_on_simplex
from ..manifolds.simplex import helmert_basis, unit_simplex
from .conformal import matvec
from .manifold import ManifoldFlow, qr_inverse, qr_parametrized

# helmert_basis, check_on_simplex and SIMPLEX_TOLERANCE live in atlasdist.manifolds.simplex;
# they stay importable from here.
__all__ = ["Calibration", "GeneralizedCalibration"]


def _log_normalized(p: torch.Tensor) -> torch.Tensor:
    """log(p / sum p): the projection onto the simplex, in log space."""
    return p.log() - p.sum(-1, keepdim=True).log()


class _SimplexFlow(ManifoldFlow):
    manifold = "the simplex Delta^(n-1)"
    domain = unit_simplex
    codomain = unit_simplex


class Calibration(_SimplexFlow):
    r"""Calibration transform :math:`q = \operatorname{softmax}(\log(p) / a + c)` on
    :math:`\Delta^{n-1}`, temperature :math:`a > 0`.

    Inverse :math:`p = \operatorname{softmax}(a \log q - a c)`; volume ratio

    .. math::
        R_\mathrm{cal}(p; a, c) = a^{1-n} \prod_{i=1}^n \frac{q_i}{p_i}

    (w.r.t. either simplex measure, see the module notes). :math:`a = e^{s}` for the
    unconstrained ``log_temperature`` :math:`s`, :math:`c` unconstrained (only
    :math:`c \bmod \mathbf{1}` matters). With :math:`c = 0` this is temperature scaling.
    Points have shape :math:`(*, n)`, the log-det :math:`(*)`. Cost :math:`O(n)` per point.

    Arguments:
        features: :math:`n \ge 2`.
        temperature: initial :math:`a > 0`.
        shift: optional initial :math:`c` of shape :math:`(n,)` (default 0).

    Example:
        >>> f = Calibration(3, temperature=2.0)
        >>> p = torch.tensor([[0.1, 0.3, 0.6]])
        >>> f(p)  # softmax(log(p) / 2): proportional to sqrt(p)
        tensor([[0.1930, 0.3343, 0.4727]], grad_fn=<SoftmaxBackward0>)

    References:
        reference/003, "Simplex calibration transform"; Guo et al., *On calibration of modern
        neural networks*, ICML 2017 (temperature scaling).
    """

    def __init__(self, features: int, temperature: float = 1.0, shift: torch.Tensor | None = None):
        super().__init__(features)
        check_parameter(float(temperature), "temperature", self.name, positive=True)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        if shift is None:
            shift = torch.zeros(self.in_features)
        check_features(shift, self.in_features, self.name, "shift")
        check_parameter(shift, "shift", self.name, tensor=True)
        self.shift = nn.Parameter(shift.detach().clone())

    @property
    def temperature(self) -> torch.Tensor:
        """:math:`a = e^s > 0`."""
        return self.log_temperature.exp()

    def _call(self, x):
        check_on_simplex(x, self.name)
        s, c = self.log_temperature.to(x.dtype), self.shift.to(x.dtype)
        return torch.softmax(_log_normalized(x) * (-s).exp().unsqueeze(-1) + c, -1)

    def _inverse(self, y):
        check_on_simplex(y, self.name + ".inv")
        s, c = self.log_temperature.to(y.dtype), self.shift.to(y.dtype)
        return torch.softmax((_log_normalized(y) - c) * s.exp().unsqueeze(-1), -1)

    def log_abs_det_jacobian(self, x, y):
        s, c = self.log_temperature.to(x.dtype), self.shift.to(x.dtype)
        log_p = _log_normalized(x)
        log_q = torch.log_softmax(log_p * (-s).exp().unsqueeze(-1) + c, -1)
        return (1 - x.shape[-1]) * s + (log_q - log_p).sum(-1)


class GeneralizedCalibration(_SimplexFlow):
    r"""Generalized calibration transform :math:`q = \operatorname{softmax}(A \log p + c)` on
    :math:`\Delta^{n-1}`, :math:`A \mathbf{1} = \lambda \mathbf{1}`, :math:`A` invertible.

    Inverse :math:`p = \operatorname{softmax}(A^{-1} (\log q - c))`; volume ratio

    .. math::
        R_\mathrm{gcal}(p; A, c) = \frac{|\det A|}{|\lambda|} \prod_{i=1}^n \frac{q_i}{p_i}

    (w.r.t. either simplex measure, see the module notes). The transforms form a group:
    :math:`f(\cdot; A_1, c_1) \circ f(\cdot; A_2, c_2) = f(\cdot; A_1 A_2, c_1 + A_1 c_2)`.

    **Parametrization.** The map only sees :math:`A` through its action :math:`B = V^\top A V`
    on :math:`\mathbf{1}^\perp` (:math:`V` = :func:`~atlasdist.manifolds.helmert_basis`): adding
    :math:`\mathbf{1} w^\top` to :math:`A` or changing :math:`\lambda` changes
    :math:`A \log p` by a multiple of :math:`\mathbf{1}`, which the softmax ignores, and
    :math:`|\det A| / |\lambda| = |\det B|`. So :math:`A = \mathbf{1}\mathbf{1}^\top / n +
    V B V^\top` (:math:`\lambda = 1`, :math:`\mathbf{1}^\top A = \mathbf{1}^\top`) with
    :math:`B = QR` from an unconstrained :math:`(n-1) \times (n-1)` ``weight``
    (:func:`atlasdist.transforms.manifold.qr_parametrized`): every value gives an invertible
    :math:`A`, and every :math:`B` with :math:`\det B > 0` is reached. :math:`c` is
    unconstrained. Cost :math:`O(n^2)` per point plus :math:`O(n^3)` per call.

    Arguments:
        features: :math:`n \ge 2`.
        shift: optional initial :math:`c` of shape :math:`(n,)` (default 0).

    Example:
        >>> f = GeneralizedCalibration(3)  # weight 0: A = I, the identity
        >>> p = torch.tensor([[0.1, 0.3, 0.6]])
        >>> torch.allclose(f(p), p), f.log_abs_det_jacobian(p, p).abs() < 1e-6
        (True, tensor([True]))

    References:
        reference/003, "Generalized calibration transform".
    """

    def __init__(self, features: int, shift: torch.Tensor | None = None):
        super().__init__(features)
        n = self.in_features
        self.weight = nn.Parameter(torch.zeros(n - 1, n - 1))
        if shift is None:
            shift = torch.zeros(n)
        check_features(shift, n, self.name, "shift")
        check_parameter(shift, "shift", self.name, tensor=True)
        self.shift = nn.Parameter(shift.detach().clone())

    def _params(self, x):
        q, r, logdet = qr_parametrized(self.weight.to(x.dtype))
        v = helmert_basis(self.in_features, x.dtype, x.device)
        return q, r, logdet, v, self.shift.to(x.dtype)

    @property
    def matrix(self) -> torch.Tensor:
        r""":math:`A = \mathbf{1}\mathbf{1}^\top / n + V B V^\top`, shape :math:`(n, n)`, with
        :math:`A \mathbf{1} = \mathbf{1}` (:math:`\lambda = 1`)."""
        q, r, _, v, _ = self._params(self.weight)
        n = self.in_features
        return torch.full((n, n), 1 / n, dtype=v.dtype, device=v.device) + v @ (q @ r) @ v.mT

    def _logits(self, log_p, q, r, v, c):
        # V B V^T log p + c: the 1 1^T / n part of A only adds a multiple of 1.
        return matvec(q @ r, log_p @ v) @ v.mT + c

    def _call(self, x):
        check_on_simplex(x, self.name)
        q, r, _, v, c = self._params(x)
        return torch.softmax(self._logits(_log_normalized(x), q, r, v, c), -1)

    def _inverse(self, y):
        check_on_simplex(y, self.name + ".inv")
        q, r, _, v, c = self._params(y)
        z = matvec(qr_inverse(q, r), (_log_normalized(y) - c) @ v)
        return torch.softmax(z @ v.mT, -1)

    def log_abs_det_jacobian(self, x, y):
        q, r, logdet, v, c = self._params(x)
        log_p = _log_normalized(x)
        log_q = torch.log_softmax(self._logits(log_p, q, r, v, c), -1)
        return logdet + (log_q - log_p).sum(-1)
