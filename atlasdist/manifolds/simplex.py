r"""The open probability simplex
:math:`\Delta^{n-1} = \{p \in \mathbb{R}^n : p_i > 0, \sum_i p_i = 1\}`: the facts that the
flows of :mod:`atlasdist.transforms.simplex` and the distributions of
:mod:`atlasdist.distributions.simplex` share.

- the projection :func:`simplex_projection`, :math:`\pi(z) = z / \sum_i z_i`, and the tangent
  basis :func:`helmert_basis`;
- the tolerance :data:`SIMPLEX_TOLERANCE`, the constraint :data:`unit_simplex` and the check
  :func:`check_on_simplex`;
- the measure factor :func:`simplex_hausdorff_log_factor` and the volume
  :func:`log_simplex_volume`.

**Measure.** Two measures on the simplex are in use, and they differ by a constant:

- the **Hausdorff (surface) measure** :math:`\mathcal{H}^{n-1}` of :math:`\Delta^{n-1}` as a
  subset of :math:`\mathbb{R}^n`, the :math:`(n-1)`-dimensional volume on the manifold and the
  measure of every other density in atlasdist;
- the **Lebesgue measure** :math:`dp_1 \cdots dp_{n-1}` of the first :math:`n-1` coordinates,
  torch's convention (``Dirichlet.log_prob``, ``StickBreakingTransform``).

The embedding :math:`(p_1, \dots, p_{n-1}) \mapsto (p_1, \dots, p_{n-1}, 1 - \sum_i p_i)` has
Jacobian :math:`E = [I;\, -\mathbf{1}^\top]` with :math:`\sqrt{\det(E^\top E)} = \sqrt{n}`, so
:math:`d\mathcal{H}^{n-1} = \sqrt{n}\, dp_1 \cdots dp_{n-1}` (reference/003, "Simplex flow").

Example:
    >>> p = simplex_projection(torch.tensor([[1.0, 3.0, 4.0], [1.0, 1.0, -1.0]]))
    >>> unit_simplex.check(p), unit_simplex.check(2 * p)
    (tensor([ True, False]), tensor([False, False]))

References:
    *Flow-based generative model*, Wikipedia, section "Simplex flow" (reference/003).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from .._checks import validation_enabled

__all__ = [
    "simplex_projection",
    "helmert_basis",
    "SIMPLEX_TOLERANCE",
    "unit_simplex",
    "check_on_simplex",
    "simplex_hausdorff_log_factor",
    "log_simplex_volume",
]

SIMPLEX_TOLERANCE = 1e-6
r"""Largest accepted :math:`|\sum_i p_i - 1|` of a point on the simplex: the tolerance of
torch's ``constraints.simplex`` (:data:`unit_simplex`), in every dtype."""

unit_simplex = constraints.simplex
r"""The constraint :math:`p_i \ge 0`, :math:`|\sum_i p_i - 1| <` :data:`SIMPLEX_TOLERANCE`
(``event_dim`` 1): torch's ``constraints.simplex`` itself, the ``support``, ``domain`` and
``codomain`` of the flows and distributions on simplices (``transform_to`` gives torch's
``StickBreakingTransform``)."""


def simplex_projection(z: torch.Tensor) -> torch.Tensor:
    r"""Projection :math:`\pi(z) = z / \sum_i z_i` of the positive orthant onto the simplex
    :math:`\Delta^{n-1}`.

    Its Jacobian on the simplex is the oblique tangent projection
    :math:`I - x \mathbf{1}^\top` (not the nearest-point projection, which is fine for the
    volume ratio: the simplex is flat). Cost :math:`O(n)` per point.

    Arguments:
        z: points of shape :math:`(*, n)` with positive entries.

    Returns:
        :math:`\pi(z)`, shape :math:`(*, n)`.

    Example:
        >>> simplex_projection(torch.tensor([[1.0, 3.0, 4.0]]))
        tensor([[0.1250, 0.3750, 0.5000]])
    """
    return z / z.sum(-1, keepdim=True)


def helmert_basis(n: int, dtype=None, device=None) -> torch.Tensor:
    r"""Orthonormal basis :math:`V \in \mathbb{R}^{n \times (n-1)}` of
    :math:`\mathbf{1}^\perp`, the tangent space of the simplex:
    :math:`v_k = (1, \dots, 1, -k, 0, \dots, 0) / \sqrt{k(k+1)}` with :math:`k` ones.

    Built in ``dtype`` (default torch's) on ``device``, so :math:`V^\top V = I` to working
    precision. Cost :math:`O(n^2)`.

    Example:
        >>> helmert_basis(3, torch.float64) * 6**0.5
        tensor([[ 1.7321,  1.0000],
                [-1.7321,  1.0000],
                [ 0.0000, -2.0000]], dtype=torch.float64)
    """
    i = torch.arange(n, device=device).unsqueeze(-1)
    k = torch.arange(1, n, device=device)
    # Built in the target dtype (not cast from float32): V^T V = I to working precision.
    entries = torch.where(i < k, 1, torch.where(i == k, -k, 0))
    return (
        entries.to(dtype or torch.get_default_dtype())
        / (k * (k + 1)).to(dtype or torch.get_default_dtype()).sqrt()
    )


def check_on_simplex(
    p: torch.Tensor,
    name: str,
    what: str = "input",
    open_: bool = True,
    enabled: bool | None = None,
) -> None:
    r"""Raises ``ValueError`` if a point of ``p`` has an entry :math:`\le 0` (:math:`< 0` if
    not ``open_``) or a sum off 1 by more than :data:`SIMPLEX_TOLERANCE`, stating how far; the
    message names ``name`` and ``what``.

    Runs while validation is on (:func:`atlasdist._checks.validation_enabled`), or as
    ``enabled`` says when given. Cost: :math:`O(n)` per point and a device sync.

    Arguments:
        p: points of shape :math:`(*, n)`.
        name: who checks (e.g. the transform's name).
        what: what ``p`` is (``"input"``, ``"value"``).
        open_: whether the open simplex is meant (entries > 0).
        enabled: force the check on or off.

    Example:
        >>> check_on_simplex(torch.tensor([0.2, 0.3, 0.6]), "f", enabled=True)
        Traceback (most recent call last):
        ...
        ValueError: f: 1 input point(s) off the simplex: |sum(p) - 1| up to 0.1 ...
    """
    if not (validation_enabled() if enabled is None else enabled):
        return
    p = p.detach()
    low = p.min(-1).values
    bad = ~(low > 0) if open_ else ~(low >= 0)
    if bool(bad.any()):
        where = "open simplex (entries > 0)" if open_ else "simplex (entries >= 0)"
        raise ValueError(
            f"{name}: {int(bad.sum())} {what} point(s) outside the {where}: smallest entry "
            f"{float(low.min()):.3g}"
        )
    off = (p.sum(-1) - 1).abs()
    bad = ~(off <= SIMPLEX_TOLERANCE)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: {int(bad.sum())} {what} point(s) off the simplex: |sum(p) - 1| up to "
            f"{float(off[bad].max()):.3g} (tolerance {SIMPLEX_TOLERANCE:g}); normalize them "
            "with p / p.sum(-1, keepdim=True)"
        )


def simplex_hausdorff_log_factor(features: int) -> float:
    r"""The log density of the Hausdorff measure w.r.t. torch's Lebesgue measure,

    .. math::
        \log \frac{d\mathcal{H}^{n-1}}{dp_1 \cdots dp_{n-1}} = \tfrac{1}{2}\log n,

    :math:`n` = ``features``: subtract it from a log-density w.r.t. the Lebesgue measure of the
    first :math:`n-1` coordinates (torch's ``Dirichlet``) to get one w.r.t. the Hausdorff
    measure of the simplex, :math:`\log p_{\mathcal{H}} = \log p_\mathrm{Leb} -
    \tfrac{1}{2}\log n`.

    Example:
        >>> simplex_hausdorff_log_factor(4) == math.log(2)
        True
    """
    return 0.5 * math.log(features)


def log_simplex_volume(features: int) -> float:
    r"""The log volume of :math:`\Delta^{n-1}` w.r.t. its Hausdorff measure,

    .. math::
        \log \mathcal{H}^{n-1}(\Delta^{n-1}) = \tfrac{1}{2}\log n - \log (n-1)!,

    :math:`n` = ``features`` (:math:`\sqrt{2}` for the segment, :math:`\sqrt{3}/2` for the
    triangle): minus the log-density of the uniform distribution (its Lebesgue volume is
    :math:`1/(n-1)!`, the normalizer of ``Dirichlet(torch.ones(n))``).

    Example:
        >>> math.isclose(math.exp(log_simplex_volume(3)), math.sqrt(3) / 2)
        True
    """
    return simplex_hausdorff_log_factor(features) - math.lgamma(features)
