r"""Reference volume terms by automatic differentiation.

These are the exact (and slow: :math:`O(D d^2)` per point after :math:`d` forward-mode passes)
references that every closed-form volume term of the library is tested against, and the
fallback for maps with no closed form.

- :func:`log_volume_ratio`: :math:`\frac{1}{2}\log\det(J^\top J)` of a map
  :math:`\mathbb{R}^d \to \mathbb{R}^D`;
- :func:`manifold_log_volume_ratio`: :math:`\log|\det(T_y^\top F_x T_x)|` of a map between
  manifolds given a projection :math:`\pi` onto them (the differential volume ratio of
  reference/003, "Differential volume ratio for curved manifolds");
- :func:`tangent_frame`: the orthonormal :math:`T_x` spanning the tangent space.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jacfwd, jvp, vmap

from ._checks import check_count, check_floating, no_validation

__all__ = [
    "jacobian",
    "batched_jacobian",
    "log_volume_ratio",
    "tangent_frame",
    "manifold_log_volume_ratio",
]


def jacobian(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    r"""Batched Jacobian :math:`J_f(x)` of a pointwise map, by forward-mode autodiff.

    The map is vmapped over points (``torch.func.vmap(jacfwd(fn))``). Maps that vmap cannot
    batch (boolean-mask indexing, as in Pyro's splines) fall back to :math:`d` forward-mode
    passes over the whole batch, which relies on ``fn`` acting on each point independently.

    Arguments:
        fn: a map taking points of shape :math:`(*, d)` to :math:`(*, D)`, point by point
            (any torch, Pyro or atlasdist transform qualifies).
        x: points of shape :math:`(*, d)`.
        chunk_size: points per vectorized chunk (bounds memory); all at once when ``None``.

    Returns:
        :math:`J` of shape :math:`(*, D, d)`.
    """
    check_floating(x, "jacobian", "x")
    batch = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    with no_validation():
        try:
            jac = vmap(jacfwd(fn), chunk_size=chunk_size)(flat)
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
            chunks = flat.split(chunk_size or max(len(flat), 1))
            jac = torch.cat([batched_jacobian(fn, c) for c in chunks])
    return jac.reshape(batch + jac.shape[1:])


def batched_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    r"""Jacobians of a row-wise map by :math:`d` forward-mode passes over the whole batch.

    Unlike :func:`jacobian` it needs no ``vmap``: ``fn`` takes the whole batch :math:`(N, d)`
    and must act on each row independently (it may hold per-row parameters, as a
    chart-conditioned transform does).

    Returns:
        :math:`J` of shape :math:`(N, D, d)`.
    """
    cols = []
    with no_validation():
        for j in range(x.shape[-1]):
            tangent = torch.zeros_like(x)
            tangent[..., j] = 1
            cols.append(jvp(fn, (x,), (tangent,))[1])
    return torch.stack(cols, -1)


def _half_log_gram(jac: torch.Tensor) -> torch.Tensor:
    # QR avoids forming J^T J, which squares the condition number: sum log|R_ii| is
    # 1/2 log det(J^T J) to working precision.
    r = torch.linalg.qr(jac, mode="r").R
    return r.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)


def log_volume_ratio(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    r""":math:`\frac{1}{2}\log\det\big(J_f(x)^\top J_f(x)\big)` for :math:`f: \mathbb{R}^d \to
    \mathbb{R}^D`, :math:`d \le D`, by automatic differentiation.

    The log of the factor by which :math:`f` scales :math:`d`-dimensional volume at :math:`x`
    (for :math:`d = D` it is :math:`\log|\det J_f(x)|`).

    Arguments:
        fn: pointwise map :math:`(d,) \to (D,)`, see :func:`jacobian`.
        x: points of shape :math:`(*, d)`.
        chunk_size: points per vectorized chunk.

    Returns:
        Tensor of shape :math:`(*)`.

    Example:
        >>> from atlasdist.transforms import InverseStereographic
        >>> f = InverseStereographic(2)
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> torch.allclose(log_volume_ratio(f, x), f.log_abs_det_jacobian(x, f(x)))
        True
    """
    jac = jacobian(fn, x, chunk_size)
    if jac.shape[-2] < jac.shape[-1]:
        raise ValueError(
            f"log_volume_ratio: the map must raise or keep the dimension, got "
            f"R^{jac.shape[-1]} -> R^{jac.shape[-2]}"
        )
    return _half_log_gram(jac)


def tangent_frame(
    projection: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dim: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""An orthonormal frame :math:`T_x \in \mathbb{R}^{n\times m}` of the tangent space at a
    point :math:`x` of an :math:`m`-dimensional manifold in :math:`\mathbb{R}^n`.

    The manifold is given by a smooth idempotent projection :math:`\pi` onto it; the Jacobian
    :math:`\Pi_x` of :math:`\pi` at :math:`x` is a (possibly oblique) projection onto the
    tangent space, whose column space is spanned by the first :math:`m` left singular
    vectors.

    Arguments:
        projection: :math:`\pi`, pointwise :math:`(n,) \to (n,)`.
        x: points on the manifold, shape :math:`(*, n)`.
        dim: :math:`m`.

    Returns:
        :math:`T_x` of shape :math:`(*, n, m)` with :math:`T_x^\top T_x = I_m`.
    """
    check_floating(x, "tangent_frame", "x")
    dim = check_count(dim, "dim", "tangent_frame")
    if dim > x.shape[-1]:
        raise ValueError(
            f"tangent_frame: dim must be at most the ambient dimension {x.shape[-1]}, got {dim}"
        )
    proj = jacobian(projection, x, chunk_size)
    u, _, _ = torch.linalg.svd(proj)
    return u[..., :dim]


def manifold_log_volume_ratio(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    projection: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    out_projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Differential volume ratio :math:`\log|\det(T_y^\top F_x T_x)|`, :math:`y = f(x)`, of a
    map :math:`f` taking an :math:`m`-dimensional manifold :math:`\mathcal{M}\subset
    \mathbb{R}^n` to a manifold :math:`\mathcal{N}` of the same dimension.

    :math:`F_x` is the :math:`n\times n` Jacobian of :math:`f` (defined on a neighbourhood of
    :math:`\mathcal{M}` in :math:`\mathbb{R}^n`), :math:`T_x, T_y` orthonormal tangent frames
    (:func:`tangent_frame`). The density of the pushforward w.r.t. the surface (Hausdorff)
    measure is :math:`p_Y(y) = p_X(x) / R_f(x)`.

    Arguments:
        fn: :math:`f`, pointwise :math:`(n,) \to (n',)`.
        x: points on :math:`\mathcal{M}`, shape :math:`(*, n)`.
        projection: :math:`\pi` onto :math:`\mathcal{M}`.
        dim: :math:`m`.
        out_projection: projection onto :math:`\mathcal{N}` (default: ``projection``).

    Returns:
        Tensor of shape :math:`(*)`.
    """
    out_projection = projection if out_projection is None else out_projection
    # The frames are held constant in backward: torch's SVD backward is NaN for the repeated
    # singular values of a projection's Jacobian, and with F replaced by the Jacobian of
    # pi_N o f (whose columns lie in the tangent space at y) the frames' first-order change
    # does not move the determinant, so the gradient is exact.
    with torch.no_grad(), no_validation():
        y = fn(x)
        t_x = tangent_frame(projection, x, dim, chunk_size)
        t_y = tangent_frame(out_projection, y, dim, chunk_size)
    jac = jacobian(lambda v: out_projection(fn(v)), x, chunk_size)
    return torch.linalg.slogdet(t_y.mT @ jac @ t_x).logabsdet
