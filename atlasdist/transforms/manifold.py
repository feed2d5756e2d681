r"""Maps between manifolds embedded in :math:`\mathbb{R}^n`, with the volume ratio by autodiff.

A bijection :math:`f` of an :math:`m`-dimensional manifold :math:`\mathcal{M} \subset
\mathbb{R}^n` pushes a density :math:`p_X` (w.r.t. the surface, i.e. :math:`m`-dimensional
Hausdorff, measure) to :math:`p_Y(y) = p_X(x) / R_f(x)` with the differential volume ratio

.. math::
    R_f(x) = |\det(T_y^\top F_x T_x)|, \qquad y = f(x),

where :math:`F_x` is the :math:`n \times n` Jacobian of (any smooth extension of) :math:`f` and
:math:`T_x, T_y` are orthonormal tangent frames. :class:`ManifoldTransform` wraps a user map
and evaluates :math:`\log R_f` by :func:`atlasdist.geometry.manifold_log_volume_ratio`: slow
(:math:`O(n^3)` per point after :math:`3n` forward-mode passes) but exact, the fallback for maps
without a closed form and the reference the closed forms of :mod:`atlasdist.transforms.sphere`
and :mod:`atlasdist.transforms.simplex` are tested against.

References:
    *Flow-based generative model*, Wikipedia, section "Flows on manifolds" (reference/003),
    subsection "Differential volume ratio for curved manifolds", after the appendix of
    Sorrenson et al., *Learning distributions on manifolds with free-form flows*, 2023.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions import constraints

from .._checks import check_count, no_validation, trusted_parameters
from .._linalg import matrix_exp
from ..geometry import jacobian, tangent_frame
from ..manifolds.simplex import simplex_projection as simplex_projection
from ..manifolds.sphere import sphere_projection as sphere_projection
from .conformal import store
from .injective import EventTransform

# sphere_projection and simplex_projection live in atlasdist.manifolds; importable from here too.
__all__ = ["ManifoldTransform", "ManifoldFlow", "qr_parametrized", "qr_inverse"]


def qr_parametrized(
    weight: torch.Tensor, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""An invertible matrix :math:`M = Q R` from an unconstrained square ``weight`` :math:`W`.

    :math:`Q = \exp(L - L^\top)` with :math:`L` the strict lower triangle of :math:`W` (a
    rotation), :math:`R` upper triangular with the strict upper triangle of :math:`W` and
    diagonal :math:`e^{W_{ii}}`. Every real :math:`W` gives an invertible :math:`M` with
    :math:`\det M = \prod_i e^{W_{ii}} > 0`, and every :math:`M` with :math:`\det M > 0` is
    reached (QR decomposition with positive diagonal; the exponential map onto :math:`SO(n)`
    is surjective). ``normalize=True`` divides :math:`M` by :math:`\max_i e^{W_{ii}}` (for
    scale-invariant uses: no overflow of the exponential).

    **Floating point.** Nothing bounds :math:`\operatorname{cond}(M)`: maps through :math:`M`,
    :math:`M^{-1}` and log-norms :math:`\log|Mx|` are accurate to about
    :math:`\operatorname{cond}(M)\,\varepsilon`, as for any linear map (raw entries of size
    ~1 kept it below 1e6 for :math:`n \le 5` in our tests). The :math:`e^{W_{ii}}` must stay normal
    numbers: log-diagonal entries (their spread when normalized) below ~700 in float64, ~85 in
    float32. The exponential (``torch.linalg.matrix_exp``, through ``atlasdist._linalg``,
    which avoids torch's inaccurate path for a single matrix) returns :math:`Q` orthogonal
    only to rounding (7e-14 in float64 over random raw entries of size up to 3), so the
    log-determinant and :func:`qr_inverse` use the computed :math:`Q` itself (not
    :math:`\det Q = 1`, :math:`Q^{-1} = Q^\top`): inverses and volume ratios are those of the
    matrix actually used.

    Returns:
        ``(Q, R, logabsdet)`` with ``logabsdet`` :math:`= \log|\det M|`.
    """
    low = weight.tril(-1)
    q = matrix_exp(low - low.mT)
    log_diag = weight.diagonal(dim1=-2, dim2=-1)
    if normalize:
        log_diag = log_diag - log_diag.max(-1, keepdim=True).values
    r = weight.triu(1) + torch.diag_embed(log_diag.exp())
    return q, r, log_diag.sum(-1) + torch.linalg.slogdet(q).logabsdet


def qr_inverse(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    r""":math:`M^{-1} = R^{-1} Q^{-1}` by an LU solve and a triangular solve (:math:`O(n^3)`,
    once per call); batched over leading dimensions like :func:`qr_parametrized`."""
    return torch.linalg.solve_triangular(r, torch.linalg.inv(q), upper=True)


class ManifoldFlow(EventTransform):
    r"""Base of the closed-form flows on a manifold (:mod:`atlasdist.transforms.sphere`,
    :mod:`atlasdist.transforms.simplex`): a bijection whose learnable parameters are
    unconstrained raw values, all 0 for the identity, and which can be conditioned.

    Like the conformal layers, it declares the shapes of its raw parameters
    (:meth:`parameter_shapes`) and builds itself from a batch of them (:meth:`from_parameters`),
    so :class:`~atlasdist.transforms.Conditional` can produce them from a context: raw
    parameters with leading shape :math:`(*B)` give one flow per row, for points of shape
    :math:`(*, *B, n)`.

    Example:
        >>> from atlasdist.transforms.sphere import NormalizedTranslation
        >>> NormalizedTranslation.parameter_shapes(3)
        {'raw': (3,)}
        >>> f = NormalizedTranslation.from_parameters(3, {"raw": torch.zeros(5, 3)})
        >>> f(torch.tensor([0.0, 0.0, 1.0])).shape  # five flows, one point
        torch.Size([5, 3])
    """

    bijective = True
    manifold = "a manifold"  # named by the error on too few features

    def __init__(self, features: int):
        super().__init__(cache_size=0)
        features = check_count(features, "features", self.name, minimum=0)
        if features < 2:
            raise ValueError(
                f"{self.name}: features must be >= 2 ({self.manifold}), got {features}"
            )
        self.in_features = self.out_features = features

    def extra_repr(self) -> str:
        return f"features={self.in_features}"

    @classmethod
    def parameter_shapes(cls, features: int) -> dict[str, tuple[int, ...]]:
        """Name and shape of each raw parameter of the flow on ``features`` coordinates."""
        return {name: tuple(p.shape) for name, p in cls(features).named_parameters()}

    @classmethod
    def from_parameters(
        cls, features: int, params: dict[str, torch.Tensor], index: torch.Tensor | None = None
    ) -> ManifoldFlow:
        r"""The flow with the given raw parameters, each of shape :math:`(*B, \dots)`
        (:math:`(K, \dots)` gathered by ``index``, shape :math:`(B,)`, when given); a tensor
        with a graph (a hypernetwork's output) stays differentiable."""
        flow = cls(features)
        with trusted_parameters():
            for name, value in params.items():
                delattr(flow, name)
                store(flow, name, value if index is None else value.index_select(0, index))
        return flow


class ManifoldTransform(EventTransform):
    r"""A user-given bijection :math:`f: \mathcal{M} \to \mathcal{N}` between
    :math:`m`-dimensional manifolds in :math:`\mathbb{R}^n` and :math:`\mathbb{R}^{n'}`, with
    :math:`\log R_f(x) = \log|\det(T_y^\top F_x T_x)|` by automatic differentiation.

    The manifolds are given by smooth idempotent projections :math:`\pi` onto them
    (:func:`~atlasdist.manifolds.sphere_projection`,
    :func:`~atlasdist.manifolds.simplex_projection` or your own); :math:`T_x` is computed from
    the Jacobian of :math:`\pi` (:func:`atlasdist.geometry.tangent_frame`). The map must be
    differentiable on a neighbourhood of :math:`\mathcal{M}` in :math:`\mathbb{R}^n` and batch
    over points with ``torch.func.vmap`` (Python control flow on values is not allowed;
    validation is switched off while differentiating).

    ``log_abs_det_jacobian(x, y)`` returns :math:`\log R_f(x)`, shape :math:`(*)`, so that a
    density w.r.t. the surface measure of :math:`\mathcal{M}` is pushed to one w.r.t. the
    surface measure of :math:`\mathcal{N}`. Its value is that of
    :func:`~atlasdist.geometry.manifold_log_volume_ratio`; its gradients (w.r.t. the
    parameters of ``fn`` and along the manifold) are exact when :math:`\pi` is the
    nearest-point projection or the manifold is flat, as for
    :func:`~atlasdist.manifolds.sphere_projection` and
    :func:`~atlasdist.manifolds.simplex_projection` (the frames are held constant in backward,
    see the code).

    Cost per point: :math:`n` forward-mode passes through :math:`f`, :math:`2n` through
    :math:`\pi`, two SVDs and one determinant (:math:`O(n^3)`). The autodiff value loses
    accuracy where the Jacobian is badly scaled (ill-conditioned maps, points near the boundary
    of the simplex); the closed-form flows do not.

    Arguments:
        fn: :math:`f`, pointwise :math:`(*, n) \to (*, n')`. An ``nn.Module`` is registered
            (its parameters get gradients through the log-det).
        projection: :math:`\pi` onto :math:`\mathcal{M}`.
        dim: :math:`m`.
        features: :math:`n`.
        inverse: :math:`f^{-1}`, pointwise; without it ``f.inv`` raises
            ``NotImplementedError`` (sampling works, ``log_prob`` does not).
        out_projection: projection onto :math:`\mathcal{N}` (default ``projection``).
        out_features: :math:`n'` (default :math:`n`).
        domain, codomain: constraints of :math:`\mathcal{M}`, :math:`\mathcal{N}` (default
            ``real_vector``).
        chunk_size: points per vectorized chunk of the autodiff (bounds memory).

    Example:
        >>> from atlasdist.transforms.sphere import NormalizedTranslation
        >>> g = NormalizedTranslation(3, shift=torch.tensor([0.0, 0.0, 0.5]))
        >>> f = ManifoldTransform(g, sphere_projection, dim=2, features=3, inverse=g.inv)
        >>> x = torch.tensor([[1.0, 0.0, 0.0]])
        >>> torch.allclose(f.log_abs_det_jacobian(x, f(x)), g.log_abs_det_jacobian(x, g(x)))
        True

    References:
        reference/003, "Differential volume ratio for curved manifolds".
    """

    bijective = True

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        projection: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        features: int,
        inverse: Callable[[torch.Tensor], torch.Tensor] | None = None,
        out_projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
        out_features: int | None = None,
        domain: constraints.Constraint | None = None,
        codomain: constraints.Constraint | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__(cache_size=0)
        name = "ManifoldTransform"
        dim = check_count(dim, "dim", name)
        features = check_count(features, "features", name)
        if not dim <= features:
            raise ValueError(
                f"{name}: need 1 <= dim <= features, got dim={dim}, features={features}"
            )
        for what, given in (("fn", fn), ("projection", projection)):
            if not callable(given):
                raise TypeError(f"{name}: {what} must be callable, got {type(given).__name__}")
        if chunk_size is not None:
            chunk_size = check_count(chunk_size, "chunk_size", name)
        self.in_features = features
        self.out_features = (
            features if out_features is None else check_count(out_features, "out_features", name)
        )
        self.dim = dim
        self.fn = fn
        self.inverse_fn = inverse
        self.projection = projection
        self.out_projection = projection if out_projection is None else out_projection
        self.chunk_size = chunk_size
        self.domain = constraints.real_vector if domain is None else domain
        self.codomain = constraints.real_vector if codomain is None else codomain

    def _call(self, x):
        return self.fn(x)

    def _inverse(self, y):
        if self.inverse_fn is None:
            raise NotImplementedError(
                "ManifoldTransform: no inverse was given (pass inverse=...), so .inv and "
                "log_prob are not available"
            )
        return self.inverse_fn(y)

    def log_abs_det_jacobian(self, x, y):
        # The value is atlasdist.geometry.manifold_log_volume_ratio(fn, x, projection, dim).
        # The frames are built without autograd: torch's SVD backward is undefined at the
        # repeated singular values of a projection's Jacobian (it returns NaN). Holding them
        # constant loses nothing: a moving orthonormal T_y changes log|det(T_y^T F T_x)| at
        # second order only (T_y^T dT_y is skew), and differentiating f o pi instead of f
        # removes the normal part of dT_x (exact for a nearest-point projection or a flat
        # manifold: the sphere and the simplex).
        with torch.no_grad(), no_validation():
            x0 = x.detach()
            t_x = tangent_frame(self.projection, x0, self.dim, self.chunk_size)
            t_y = tangent_frame(self.out_projection, self.fn(x0), self.dim, self.chunk_size)
        jac = jacobian(self._projected_fn, x, self.chunk_size)
        return torch.linalg.slogdet(t_y.mT @ jac @ t_x).logabsdet

    def _projected_fn(self, x):
        return self.fn(self.projection(x))

    def extra_repr(self) -> str:
        return f"features={self.in_features}, dim={self.dim}, out_features={self.out_features}"
