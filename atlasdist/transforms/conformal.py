r"""Conformal layers: :math:`J^\top J = \lambda(x)^2 I` with a closed-form :math:`\lambda`.

Each layer holds its parameters either as learnable ``nn.Parameter`` (the default) or as
given tensors with leading batch dimensions, one parameter set per row: a parameter of shape
:math:`(B, \dots)` meets inputs of shape :math:`(*, B, n)`.

**Conditioning.** A layer that can be conditioned declares the shapes of its raw parameters
(``parameter_shapes``) and builds itself from a batch of them (``from_parameters``), where
the raw value 0 gives a fixed map (the identity, :math:`[I_d; 0]`, the north pole). One
wrapper, :class:`~atlasdist.transforms.Conditional`, produces the raw parameters from a
context. Inside an atlas the parameters are computed once per chart (:math:`K` rows) and
``index`` (shape :math:`(B,)`) says which chart each input row uses; cheap parameters are
gathered by it; frames are applied to the rows grouped by chart, in compact WY form
(:func:`compact_wy`, :func:`~atlasdist.transforms.tiled`), never copied per row.

**Conformality** is a property a layer provides: ``conformal = True`` and
``log_conformal_factor`` (:class:`~atlasdist.transforms.ConformalTransform`).

References:
    Ross & Cresswell, *Tractable density estimation on learned manifolds with conformal
    embedding flows*, NeurIPS 2021.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrizations

from .._checks import (
    check_features,
    check_parameter,
    parameters_trusted,
    trusted_parameters,
    validation_enabled,
)
from .cache import _functorch_active, cached
from .indexed import _check_rows, per_tile, tile_plan, tiled
from .injective import InjectiveCompose, InjectiveTransform, is_conformal

__all__ = [
    "ZeroPad",
    "StiefelEmbedding",
    "Orthogonal",
    "Similarity",
    "Scale",
    "Shift",
    "Mobius",
    "InverseStereographic",
    "ConformalEmbedding",
    "householder_stiefel",
    "householder_stiefel_raw",
    "householder_reflectors",
    "compact_wy",
    "reflect_to",
    "householder_to",
]


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`W x` for :math:`W` of shape :math:`(\dots, m, n)` and :math:`x` of shape
    :math:`(\dots, n)`, broadcasting batch dimensions."""
    if w.dim() == 2:
        return x @ w.mT
    return (w @ x.unsqueeze(-1)).squeeze(-1)


def rmatvec(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`W^\top y`, broadcasting like :func:`matvec`."""
    if w.dim() == 2:
        return y @ w
    return (w.mT @ y.unsqueeze(-1)).squeeze(-1)


def store(
    module: nn.Module,
    name: str,
    value: torch.Tensor | None,
    initial: torch.Tensor | None = None,
    features: int | None = None,
) -> None:
    """Keeps a given parameter tensor: as a buffer (moved by ``.to``, saved in ``state_dict``)
    when it is a constant, as a plain attribute when it carries a graph (a conditioned layer's
    parameters, produced by a hypernetwork). Without a value, a learnable parameter starting at
    ``initial``; a given value is checked to have shape ``(*, features)`` when asked and, unless
    the caller is inside :func:`~atlasdist._checks.trusted_parameters` (the per-call
    ``from_parameters`` path, where the check would cost a device sync), to be a finite float
    tensor."""
    if value is None:
        setattr(module, name, nn.Parameter(initial))
        return
    owner = type(module).__name__
    if features is not None:
        check_features(value, features, owner, name)
    if not parameters_trusted():
        check_parameter(value, name.lstrip("_"), owner, tensor=True)
    if value.requires_grad:
        setattr(module, name, value)
    else:
        module.register_buffer(name, value)


def _batch_log_factor(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcasts a per-parameter-set log factor of shape (*B,) to the event batch of x."""
    return value.expand(torch.broadcast_shapes(value.shape, x.shape[:-1]))


def _rows(value: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Per-chart parameters (K, ...) gathered for the rows (B, ...) that use them."""
    return value if index is None else value.index_select(0, index)


def _reflector_matrix(raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # V of householder_reflectors without its factors.
    top_count = cols * (cols - 1) // 2
    batch = raw.shape[:-1]
    rows_idx, cols_idx = torch.tril_indices(cols, cols, offset=-1, device=raw.device)
    diagonal = torch.arange(cols, device=raw.device) * (cols + 1)
    flat_top = raw[..., :top_count].reshape(math.prod(batch), top_count)
    entries = torch.cat([flat_top, flat_top.new_ones(flat_top.shape[0], cols)], -1)
    where = torch.cat([rows_idx * cols + cols_idx, diagonal])
    top = flat_top.new_zeros(flat_top.shape[0], cols * cols).index_copy(1, where, entries)
    bottom = raw[..., top_count:].reshape(batch + (rows - cols, cols))
    return torch.cat([top.reshape(batch + (cols, cols)), bottom], -2)


def _check_orthonormal(weight: torch.Tensor, name: str) -> None:
    w = torch.as_tensor(weight).detach()
    if not w.is_floating_point():
        raise TypeError(f"{name}: weight must be a float tensor, got {w.dtype}")
    gram = w.mT @ w
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    tol = max(1e-6, 1000 * torch.finfo(w.dtype).eps)
    error = (gram - eye).abs().amax() if w.numel() else w.new_zeros(())
    if not bool(error <= tol):  # NaN fails too
        raise ValueError(
            f"{name}: weight must have orthonormal columns (W^T W = I), but |W^T W - I| = "
            f"{float(error):.3g} > {tol:.3g}; orthonormalize it (torch.linalg.qr(weight).Q) or "
            "give a Householder parameter (householder_stiefel)"
        )


def householder_reflectors(raw: torch.Tensor, rows: int, cols: int):
    r"""The reflector matrix :math:`V` (unit lower trapezoidal, strictly lower part ``raw``)
    and the factors :math:`\tau_j = 2/|v_j|^2` of :func:`householder_stiefel`: shapes
    :math:`(*, n, k)` and :math:`(*, k)`. Below row :math:`k` the rows of :math:`V` are the
    last :math:`(n-k)k` raw entries in row-major order, so only the top :math:`k \times k`
    block is scattered."""
    v = _reflector_matrix(raw, rows, cols)
    return v, 2 / v.pow(2).sum(-2)


def householder_stiefel(raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r"""A matrix with orthonormal columns from unconstrained parameters, as a product of
    Householder reflections.

    ``raw`` of shape :math:`(*, p)` with :math:`p = \sum_{j<k} (n - 1 - j)` fills the strictly
    lower-triangular part of the :math:`n\times k` reflector matrix :math:`V` (unit diagonal
    implied); reflector :math:`j` gets :math:`\tau_j = 2/|v_j|^2`, which makes it an exact
    reflection. Returns :math:`-H_1\cdots H_k [I_k; 0]`, shape :math:`(*, n, k)`, which is
    :math:`[I_k; 0]` at ``raw = 0``. Cost :math:`O(n k^2)`.
    """
    v, tau = householder_reflectors(raw, rows, cols)
    return -torch.linalg.householder_product(v, tau)


def compact_wy(raw: torch.Tensor, rows: int, cols: int):
    r"""The Householder product of :func:`householder_stiefel` in compact WY form,
    :math:`H_1 \cdots H_k = I - V T V^\top`, without forming it: returns the reflector matrix
    :math:`V` (:func:`householder_reflectors`, :math:`(*, n, k)`) and :math:`T^{-1}`, the upper
    triangle of :math:`V^\top V` with its diagonal halved (:math:`\tau_j = 2/|v_j|^2`; Puglisi
    1992), :math:`(*, k, k)`. Cost: one Gram matrix, :math:`O(n k^2)`, as a batched product.
    """
    return cached(compact_wy, (rows, cols), (raw,), lambda: _compact_wy(raw, rows, cols))


def _compact_wy(raw: torch.Tensor, rows: int, cols: int):
    v = _reflector_matrix(raw, rows, cols)  # the factors are the Gram matrix's diagonal
    gram = v.mT @ v
    tinv = torch.triu(gram, 1) + torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1) / 2)
    return v, tinv


def householder_stiefel_raw(w: torch.Tensor) -> torch.Tensor:
    r"""Raw parameters whose :func:`householder_stiefel` spans the same column space as ``w``
    (shape :math:`(*, n, k)`, full column rank): the Householder vectors of the QR
    factorisation of ``w`` (LAPACK ``geqrf``). The columns may come out with other signs or
    rotated within the span; use it to initialise a chart's orientation."""
    a, _ = torch.geqrf(w)
    rows, cols = torch.tril_indices(w.shape[-2], w.shape[-1], offset=-1, device=w.device)
    return a[..., rows, cols]


def _num_reflector_params(rows: int, cols: int) -> int:
    return sum(rows - 1 - j for j in range(cols))


def _orthogonal_linear(in_features: int, out_features: int) -> nn.Linear:
    # Householder parametrization without trivialization: the weight is a function of the raw
    # parameter alone, so its columns are orthonormal to working precision in any dtype (a
    # float32 model cast to float64 stays exactly orthonormal), and any raw value is valid.
    return parametrizations.orthogonal(
        nn.Linear(in_features, out_features, bias=False),
        orthogonal_map="householder",
        use_trivialization=False,
    )


class ZeroPad(InjectiveTransform):
    r"""Zero padding :math:`u \mapsto (u, 0) \in \mathbb{R}^D`, :math:`\lambda = 1`.

    Left inverse: :math:`y \mapsto y_{1:d}`, the orthogonal projection onto the image
    :math:`\mathbb{R}^d \times \{0\}` read in coordinates. Cost :math:`O(D)`.

    Example:
        >>> ZeroPad(2, 3)(torch.tensor([1.0, 2.0]))
        tensor([1., 2., 0.])
    """

    conformal = True
    affine_similarity = True

    def _call(self, x):
        return nn.functional.pad(x, (0, self.out_features - self.in_features))

    def _inverse(self, y):
        return y[..., : self.in_features]

    def log_conformal_factor(self, x, y):
        return x.new_zeros(x.shape[:-1])


class StiefelEmbedding(InjectiveTransform):
    r"""Linear isometric embedding :math:`u \mapsto W u`, :math:`W \in \mathbb{R}^{D\times d}`,
    :math:`W^\top W = I_d`, :math:`\lambda = 1`.

    The learnable :math:`W` is kept on the Stiefel manifold by torch's
    ``parametrizations.orthogonal`` (Householder products). Left inverse:
    :math:`y \mapsto W^\top y`, the orthogonal projection onto the column space read in
    coordinates. Cost :math:`O(Dd)` per point.

    Conditioned (:class:`~atlasdist.transforms.Conditional`): the raw parameters are the
    :math:`p = \sum_{j<d}(D-1-j)` Householder entries of :func:`householder_stiefel`. Under a
    chart index :math:`W_k = -[I_d; 0] + V_k T_k V_{k,1:d}^\top` is never formed: per chart
    only :math:`T_k^{-1}` (:func:`compact_wy`, one Gram matrix), and the rows, grouped by chart
    (:func:`~atlasdist.transforms.tiled`), are multiplied by :math:`V_k` with a triangular
    solve.

    Arguments:
        in_features: :math:`d`.
        out_features: :math:`D`.
        weight: optional fixed :math:`W` of shape :math:`(*B, D, d)` with orthonormal columns
            (checked: :math:`|W^\top W - I| \le \max(10^{-6}, 1000\varepsilon)`, else a
            ``ValueError``); learnable when omitted.
        index: optional chart of each input row, shape :math:`(B,)`, with ``reflectors``.
        reflectors: with ``index``, the per-chart compact WY form :func:`compact_wy`
            (:math:`V`, :math:`T^{-1}`), shapes :math:`(K, D, d)` and :math:`(K, d, d)`.
        orthonormal: the caller vouches that ``weight`` has orthonormal columns (e.g. it comes
            from :func:`householder_stiefel`), so the check is skipped.

    Example:
        >>> f = StiefelEmbedding(2, 5)
        >>> torch.allclose(f.inv(f(torch.ones(2))), torch.ones(2), atol=1e-6)
        True
    """

    conformal = True
    affine_similarity = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        reflectors: tuple[torch.Tensor, torch.Tensor] | None = None,
        orthonormal: bool = False,
    ):
        super().__init__(in_features, out_features)
        self.index, self._tiles, self.reflectors = index, None, None
        if (index is None) != (reflectors is None):
            raise ValueError(f"{self.name}: give index and reflectors together")
        if reflectors is not None:
            v, tinv = reflectors
            if v.shape[-2:] != (self.out_features, self.in_features) or v.dim() != 3:
                raise ValueError(
                    f"{self.name}: reflectors must have shape (K, {self.out_features}, "
                    f"{self.in_features}), got {tuple(v.shape)}"
                )
            self.reflectors = (v, tinv)
            self._weight = None
            return
        if weight is None:
            self.linear = _orthogonal_linear(self.in_features, self.out_features)
            self._weight = None
            return
        if weight.shape[-2:] != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.name}: weight must have shape (*, {self.out_features}, "
                f"{self.in_features}), got {tuple(weight.shape)}"
            )
        if not orthonormal:
            _check_orthonormal(weight, self.name)
        store(self, "_weight", weight)

    @staticmethod
    def parameter_shapes(in_features: int, out_features: int) -> dict:
        if not 1 <= in_features <= out_features:
            raise ValueError(
                f"StiefelEmbedding: an injective map needs 1 <= in_features <= out_features, "
                f"got d={in_features}, D={out_features}"
            )
        return {"raw": (_num_reflector_params(out_features, in_features),)}

    @classmethod
    def from_parameters(cls, in_features, out_features, params, index=None):
        with trusted_parameters():
            if index is None:
                weight = householder_stiefel(params["raw"], out_features, in_features)
                return cls(in_features, out_features, weight=weight, orthonormal=True)
            reflectors = compact_wy(params["raw"], out_features, in_features)
            return cls(in_features, out_features, index=index, reflectors=reflectors)

    @property
    def weight(self) -> torch.Tensor:
        """:math:`W` (per chart, formed from the reflectors, when the layer is indexed)."""
        if self.reflectors is not None:
            v, tinv = self.reflectors
            t_vt = torch.linalg.solve_triangular(
                tinv, v[..., : self.in_features, :].mT, upper=True
            )
            eye = torch.eye(self.out_features, self.in_features, dtype=v.dtype, device=v.device)
            return v @ t_vt - eye
        return self.linear.weight if self._weight is None else self._weight

    def _similarity(self):
        # (log scale, shift) of the map o + e^s W u: none for a plain frame.
        return None, None

    def inverse_and_error(self, y, repeats: int = 1):
        if self.reflectors is None:
            return super().inverse_and_error(y, repeats)
        self._check_inverse_input(y)
        log_scale, shift = self._similarity()
        out = self._indexed(y, True, log_scale, shift, residual=True, repeats=repeats)
        x, error = out[..., :-1], out[..., -1]
        return x, error, self.log_abs_det_jacobian(x, None)

    def _indexed(
        self, x, transpose: bool, log_scale=None, shift=None, residual=False, repeats: int = 1
    ):
        # Rows grouped by chart (tiles); W = -[I; 0] + V T V_{1:d}^T applied in compact WY
        # form. With a per-chart similarity (log_scale s, shift o): o + e^s W u, and the
        # inverse e^{-s} W^T (y - o). The shift is added to (or taken from) the rows in the
        # tile, one elementwise pass; folding it into the products instead (W^T o per chart, a
        # column o next to V) costs a copy of every chart's V and rank-one products per chart
        # in the backward pass. With ``residual`` (inverse only) each row also gets its
        # distance to the image, |y - o - W W^T (y - o)|, computed in the tile: an extra
        # column after the coordinates.
        v, tinv = (t.to(x.dtype) for t in self.reflectors)
        d, D, charts = self.in_features, self.out_features, v.shape[0]
        if shift is not None:
            shift = shift.to(x.dtype).unsqueeze(-2)
        if log_scale is not None:
            scale = log_scale.to(x.dtype).exp()[:, None, None]
        # Fresh tiles may be overwritten when no graph and no vmap needs them.
        in_place = not torch.is_grad_enabled() and not _functorch_active()

        def frame_coefficients(u, vk, tk):
            # W u = V z - [u; 0] with z = T V_{1:d}^T u.
            return torch.linalg.solve_triangular(tk.mT, u @ vk[:, :d], upper=False, left=False)

        def frames(tiles, chart):
            vk, tk = per_tile(v, chart), per_tile(tinv, chart)
            if transpose:
                if shift is not None:
                    o = per_tile(shift, chart)
                    tiles = tiles.sub_(o) if in_place else tiles - o
                out = self._wt(tiles, vk, tk)
                if residual:
                    # (y - o) - W c = (y - o) - V z + [c; 0], c = W^T (y - o), in one product
                    # that accumulates onto y - o.
                    z = frame_coefficients(out, vk, tk)
                    if in_place:
                        diff = tiles.baddbmm_(z, vk.mT, alpha=-1)
                    else:
                        diff = torch.baddbmm(tiles, z, vk.mT, alpha=-1)
                    diff[..., :d] += out
                    error = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
                out = out if log_scale is None else out / per_tile(scale, chart)
                return torch.cat([out, error], -1) if residual else out
            if log_scale is not None:
                tiles = tiles * per_tile(scale, chart)
            out = frame_coefficients(tiles, vk, tk) @ vk.mT
            out[..., :d] -= tiles
            if shift is not None:
                out += per_tile(shift, chart)
            return out

        _check_rows(self.index, x, repeats)
        rows = x.numel() // x.shape[-1] * repeats
        if self._tiles is None or self._tiles.total != rows:
            # The same tiling serves the embedding and its left inverse: computed once.
            self._tiles = tile_plan(self.index, charts, rows, D * d, D)
        out_features = d + residual if transpose else D
        return tiled(frames, self.index, x, charts, out_features, self._tiles, repeats)

    @staticmethod
    def _wt(y, v, tinv):
        # rows of W^T y = -y_{1:d} + V_{1:d} T^T V^T y
        d = v.shape[-1]
        s = torch.linalg.solve_triangular(tinv, y @ v, upper=True, left=False)
        return s @ v[..., :d, :].mT - y[..., :d]

    def _call(self, x):
        if self.reflectors is not None:
            return self._indexed(x, transpose=False)
        return matvec(self.weight, x)

    def _inverse(self, y):
        if self.reflectors is not None:
            return self._indexed(y, transpose=True)
        return rmatvec(self.weight, y)

    def log_conformal_factor(self, x, y):
        return x.new_zeros(x.shape[:-1])


class Orthogonal(StiefelEmbedding):
    r"""Orthogonal map :math:`x \mapsto Q x` of :math:`\mathbb{R}^D`, :math:`Q^\top Q = I`,
    :math:`\lambda = 1`; inverse :math:`Q^\top y` (the square case of
    :class:`StiefelEmbedding`, conditioned the same way).

    Learnable through torch's ``parametrizations.orthogonal``, or fixed ``weight`` of shape
    :math:`(*B, D, D)`. Cost :math:`O(D^2)` per point.
    """

    def __init__(
        self,
        features: int,
        weight: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        reflectors: tuple[torch.Tensor, torch.Tensor] | None = None,
        orthonormal: bool = False,
    ):
        super().__init__(
            features,
            features,
            weight=weight,
            index=index,
            reflectors=reflectors,
            orthonormal=orthonormal,
        )

    @staticmethod
    def parameter_shapes(features: int) -> dict:
        return {"raw": (_num_reflector_params(features, features),)}

    @classmethod
    def from_parameters(cls, features, params, index=None):
        with trusted_parameters():
            if index is None:
                weight = householder_stiefel(params["raw"], features, features)
                return cls(features, weight=weight, orthonormal=True)
            reflectors = compact_wy(params["raw"], features, features)
            return cls(features, index=index, reflectors=reflectors)

    def extra_repr(self) -> str:
        return f"features={self.in_features}"


class Similarity(StiefelEmbedding):
    r"""Similarity embedding :math:`u \mapsto o + e^{s} W u`, :math:`W^\top W = I_d`,
    :math:`\lambda = e^{s}`: a :class:`StiefelEmbedding` followed by a :class:`Scale` and a
    :class:`Shift`, as one layer.

    Left inverse :math:`y \mapsto e^{-s}(W^\top y - W^\top o)`, the orthogonal projection onto
    the image read in coordinates. Under a chart index :math:`W_k^\top o_k` is computed once
    per chart, so the left inverse of a row costs one product with :math:`V_k` (see
    :class:`StiefelEmbedding`) and no :math:`D`-dimensional elementwise work.

    Arguments:
        in_features: :math:`d`.
        out_features: :math:`D`.
        weight, index, reflectors: the frame, as in :class:`StiefelEmbedding` (positional
            after ``out_features``, or keywords).
        log_scale: :math:`s`, shape :math:`(*B,)` (per chart with ``index``); learnable
            (init 0) when omitted.
        shift: :math:`o`, shape :math:`(*B, D)` (per chart with ``index``); learnable (init 0)
            when omitted.

    Example:
        >>> f = Similarity(2, 4)
        >>> y, ladj = f.call_and_ladj(torch.ones(3, 2))
        >>> y.shape, ladj.shape
        (torch.Size([3, 4]), torch.Size([3]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *frame,
        log_scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        **frame_options,
    ):
        # The frame's arguments (weight, index, reflectors) are StiefelEmbedding's.
        super().__init__(in_features, out_features, *frame, **frame_options)
        store(self, "log_scale", log_scale, torch.tensor(0.0))
        store(self, "shift", shift, torch.zeros(self.out_features), self.out_features)

    @staticmethod
    def parameter_shapes(in_features: int, out_features: int) -> dict:
        frame = StiefelEmbedding.parameter_shapes(in_features, out_features)
        return {**frame, "log_scale": (1,), "shift": (out_features,)}

    @classmethod
    def from_parameters(cls, in_features, out_features, params, index=None):
        log_scale, shift = params["log_scale"][..., 0], params["shift"]
        with trusted_parameters():
            if index is None:
                weight = householder_stiefel(params["raw"], out_features, in_features)
                return cls(
                    in_features,
                    out_features,
                    weight,
                    log_scale=log_scale,
                    shift=shift,
                    orthonormal=True,
                )
            return cls(
                in_features,
                out_features,
                index=index,
                reflectors=compact_wy(params["raw"], out_features, in_features),
                log_scale=log_scale,
                shift=shift,
            )

    def _similarity(self):
        return self.log_scale, self.shift

    def _call(self, x):
        if self.reflectors is not None:
            return self._indexed(x, False, self.log_scale, self.shift)
        scaled = matvec(self.weight, x) * self.log_scale.exp().unsqueeze(-1)
        return scaled + self.shift

    def _inverse(self, y):
        if self.reflectors is not None:
            return self._indexed(y, True, self.log_scale, self.shift)
        return rmatvec(self.weight, y - self.shift) * (-self.log_scale).exp().unsqueeze(-1)

    def log_conformal_factor(self, x, y):
        return _batch_log_factor(_rows(self.log_scale, self.index).to(x.dtype), x)


class Scale(InjectiveTransform):
    r"""Scaling :math:`x \mapsto e^{s} x`, :math:`\lambda = e^{s}`.

    Arguments:
        features: :math:`D`.
        init: initial scale :math:`e^s` (> 0) of the learnable parameter.
        log_scale: optional fixed :math:`s` of shape :math:`(*B,)`; learnable when omitted.
    """

    conformal = True
    affine_similarity = True

    def __init__(self, features: int, init: float = 1.0, log_scale: torch.Tensor | None = None):
        super().__init__(features, features)
        initial = None
        if log_scale is None:
            check_parameter(init, "init", "Scale", positive=True)
            initial = torch.tensor(math.log(init))
        store(self, "log_scale", log_scale, initial)

    @staticmethod
    def parameter_shapes(features: int) -> dict:
        return {"log_scale": (1,)}

    @classmethod
    def from_parameters(cls, features, params, index=None):
        with trusted_parameters():
            return cls(features, log_scale=_rows(params["log_scale"][..., 0], index))

    def _call(self, x):
        return x * self.log_scale.exp().unsqueeze(-1)

    def _inverse(self, y):
        return y * (-self.log_scale).exp().unsqueeze(-1)

    def log_conformal_factor(self, x, y):
        return _batch_log_factor(self.log_scale.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"features={self.in_features}"


class Shift(InjectiveTransform):
    r"""Translation :math:`x \mapsto x + b`, :math:`\lambda = 1`.

    Arguments:
        features: :math:`D`.
        shift: optional fixed :math:`b` of shape :math:`(*B, D)`; learnable (init 0) when
            omitted.
    """

    conformal = True
    affine_similarity = True

    def __init__(self, features: int, shift: torch.Tensor | None = None):
        super().__init__(features, features)
        store(self, "shift", shift, torch.zeros(features), features)

    @staticmethod
    def parameter_shapes(features: int) -> dict:
        return {"shift": (features,)}

    @classmethod
    def from_parameters(cls, features, params, index=None):
        with trusted_parameters():
            return cls(features, shift=_rows(params["shift"], index))

    def _call(self, x):
        return x + self.shift

    def _inverse(self, y):
        return y - self.shift

    def log_conformal_factor(self, x, y):
        return x.new_zeros(torch.broadcast_shapes(x.shape, self.shift.shape)[:-1])

    def extra_repr(self) -> str:
        return f"features={self.in_features}"


class Mobius(InjectiveTransform):
    r"""Special conformal transformation (Möbius map without rotation, scale or shift)

    .. math::
        x \mapsto \frac{x - b\,|x|^2}{\sigma_b(x)}, \qquad
        \sigma_b(x) = 1 - 2\, b\cdot x + |b|^2 |x|^2, \qquad \lambda(x) = 1/\sigma_b(x).

    Since :math:`\sigma_b(x) = \big|\,|b|\,x - b/|b|\,\big|^2`, the map is a conformal
    diffeomorphism of :math:`\mathbb{R}^D \setminus \{b/|b|^2\}` onto
    :math:`\mathbb{R}^D \setminus \{-b/|b|^2\}` with inverse :math:`x \mapsto` the same map
    with :math:`-b`.

    **Domain of validity.** With ``radius=R`` the domain is the open ball :math:`|x| < R` and
    :math:`b` is parametrized so that :math:`|b| < 1/R` for any raw value
    (:math:`b = R^{-1} r / \sqrt{1 + |r|^2}`); then :math:`\sigma_b(x) \ge (1 - |b||x|)^2 > 0` on
    the ball. Without a radius the domain is everything but the pole :math:`b/|b|^2`. Under
    validation, inputs outside the domain (or closer to the pole than the dtype resolves) raise
    ``ValueError``.

    Arguments:
        features: :math:`D`.
        radius: optional radius :math:`R` of the domain ball.
        raw: optional fixed raw parameter of shape :math:`(*B, D)` (mapped to :math:`b` as
            above when ``radius`` is given, used as :math:`b` otherwise); learnable (init 0,
            the identity) when omitted.
    """

    conformal = True

    def __init__(
        self, features: int, radius: float | None = None, raw: torch.Tensor | None = None
    ):
        super().__init__(features, features)
        if radius is not None:
            check_parameter(float(radius), "radius", "Mobius", positive=True)
        self.radius = None if radius is None else float(radius)
        store(self, "raw", raw, torch.zeros(features), features)

    @staticmethod
    def parameter_shapes(features: int, radius: float | None = None) -> dict:
        return {"raw": (features,)}

    @classmethod
    def from_parameters(cls, features, params, index=None, radius=None):
        with trusted_parameters():
            return cls(features, radius=radius, raw=_rows(params["raw"], index))

    @property
    def b(self) -> torch.Tensor:
        if self.radius is None:
            return self.raw
        r2 = self.raw.pow(2).sum(-1, keepdim=True)
        return self.raw / ((1 + r2).sqrt() * self.radius)

    @staticmethod
    def _sigma(b, x):
        # The expanded form 1 - 2 b.x + |b|^2 |x|^2 cancels catastrophically near the pole
        # (three terms of size 1, a result of size |x - pole|^2): in float32 a point 1e-4 from
        # the pole gets sigma = 0. There (|b||x| >= 1/2) use the equal sum of squares
        # (1 - b.x)^2 + |b|^2 |x_perp|^2, x_perp the part of x orthogonal to b, accurate to
        # relative round-off; elsewhere sigma >= 1/4 and the expanded form is accurate. The
        # masked denominator keeps gradients finite at b = 0.
        bx = (b * x).sum(-1)
        b2 = b.pow(2).sum(-1)
        b2x2 = b2 * x.pow(2).sum(-1)
        near = b2x2 >= 0.25
        safe_b2 = torch.where(near, b2, torch.ones_like(b2))
        perp = x - (bx / safe_b2).unsqueeze(-1) * b
        stable = (1 - bx).pow(2) + b2 * perp.pow(2).sum(-1)
        return torch.where(near, stable, 1 - 2 * bx + b2x2)

    @staticmethod
    def _sct(b, x):
        return (x - b * x.pow(2).sum(-1, keepdim=True)) / Mobius._sigma(b, x).unsqueeze(-1)

    def _check(self, b, x, what):
        if not validation_enabled():
            return
        if self.radius is not None and what == "input":
            norm = x.norm(dim=-1)
            if bool((norm >= self.radius).any()):
                raise ValueError(
                    f"Mobius: {int((norm >= self.radius).sum())} input points lie outside the "
                    f"domain |x| < {self.radius} (largest |x| = {float(norm.max()):.4g})"
                )
        sigma = self._sigma(b, x)
        scale = 1 + b.pow(2).sum(-1) * x.pow(2).sum(-1)
        # sigma is accurate to relative round-off ~ eps / sqrt(sigma): below (64 eps)^2 the
        # point is at the pole to working precision.
        bad = sigma <= (64 * torch.finfo(x.dtype).eps) ** 2 * scale
        if bool(bad.any()):
            raise ValueError(
                f"Mobius: {int(bad.sum())} {what} points lie at the pole of the map "
                f"(sigma = {float(sigma.min()):.3g}), outside its domain"
            )

    def _call(self, x):
        b = self.b
        self._check(b, x, "input")
        return self._sct(b, x)

    def _inverse(self, y):
        b = self.b
        self._check(-b, y, "output")
        return self._sct(-b, y)

    def log_conformal_factor(self, x, y):
        return -self._sigma(self.b, x).log()

    def extra_repr(self) -> str:
        return f"features={self.in_features}, radius={self.radius}"


def _reflection_vector(pole: torch.Tensor):
    # w = e_n - p and 2/|w|^2 (0 for p = e_n, where the reflection is the identity; the
    # where keeps gradients finite there).
    w = -pole.clone()
    w[..., -1] += 1
    w2 = w.pow(2).sum(-1, keepdim=True)
    safe = w2 > 0
    coef = torch.where(safe, 2 / torch.where(safe, w2, torch.ones_like(w2)), torch.zeros_like(w2))
    return w, coef


def householder_to(pole: torch.Tensor) -> torch.Tensor:
    r"""The reflection :math:`H = I - 2ww^\top/|w|^2`, :math:`w = e_n - p`, with
    :math:`H e_n = p` (the identity when :math:`p = e_n`); :math:`H` is symmetric and its own
    inverse. ``pole`` has shape :math:`(*B, n)` and unit norm; returns :math:`(*B, n, n)`."""
    n = pole.shape[-1]
    w, coef = _reflection_vector(pole)
    eye = torch.eye(n, dtype=pole.dtype, device=pole.device)
    return eye - coef.unsqueeze(-1) * w.unsqueeze(-1) * w.unsqueeze(-2)


def reflect_to(pole: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`H y` for :math:`H` = :func:`householder_to` ``(pole)``, as a rank-one update
    (cost :math:`O(n)` per row, no :math:`n \times n` matrix); ``pole`` :math:`(*B, n)`,
    ``y`` :math:`(*, *B, n)`."""
    w, coef = _reflection_vector(pole.to(y.dtype))
    return y - (coef * (w * y).sum(-1, keepdim=True)) * w


class InverseStereographic(InjectiveTransform):
    r"""Inverse stereographic projection :math:`\mathbb{R}^d \to S^d \subset \mathbb{R}^{d+1}`
    from the pole :math:`p`:

    .. math::
        u \mapsto H \Big(\frac{2u}{1 + |u|^2}, \frac{|u|^2 - 1}{|u|^2 + 1}\Big), \qquad
        \lambda(u) = \frac{2}{1 + |u|^2},

    with :math:`H` the reflection taking the north pole :math:`e_{d+1}` to :math:`p`
    (:func:`householder_to`). The image is the unit sphere minus :math:`p`.

    Left inverse: stereographic projection from :math:`p` after the radial projection
    :math:`y \mapsto y/|y|` onto the sphere (so points off the sphere are first pulled
    radially onto it); the pole itself has no preimage and raises under validation.

    Conditioned (:class:`~atlasdist.transforms.Conditional`): the raw parameter :math:`r`
    gives the pole :math:`p = (e_{d+1} + r)/|e_{d+1} + r|`.

    Arguments:
        in_features: :math:`d`.
        pole: unit vector of shape :math:`(*B, d+1)`; default the north pole
            :math:`e_{d+1}`.

    Example:
        >>> f = InverseStereographic(1)
        >>> f(torch.tensor([1.0]))  # (2u, u^2 - 1) / (u^2 + 1)
        tensor([1., 0.])
    """

    conformal = True

    def __init__(self, in_features: int, pole: torch.Tensor | None = None):
        super().__init__(in_features, in_features + 1)
        if pole is None:
            pole = torch.zeros(in_features + 1)
            pole[-1] = 1
            self.register_buffer("pole", pole)
            self._default_buffers = ("pole",)  # a constant: the layer follows its input's dtype
        else:
            check_features(pole, in_features + 1, "InverseStereographic", "pole")
            if not parameters_trusted():
                check_parameter(pole, "pole", "InverseStereographic", tensor=True)
                norm = pole.norm(dim=-1)
                if not bool(torch.allclose(norm, torch.ones_like(norm), atol=1e-6)):
                    raise ValueError(
                        f"InverseStereographic: pole must have unit norm, got norms in "
                        f"[{float(norm.min()):.6g}, {float(norm.max()):.6g}]; normalize it: "
                        "pole / pole.norm(dim=-1, keepdim=True)"
                    )
            store(self, "pole", pole)

    @staticmethod
    def parameter_shapes(in_features: int) -> dict:
        return {"pole": (in_features + 1,)}

    @classmethod
    def from_parameters(cls, in_features, params, index=None):
        raw = params["pole"]
        north = torch.zeros_like(raw)
        north[..., -1] = 1
        pole = nn.functional.normalize(north + raw, dim=-1)
        with trusted_parameters():
            return cls(in_features, pole=_rows(pole, index))

    def _call(self, x):
        r2 = x.pow(2).sum(-1, keepdim=True)
        z = torch.cat([2 * x, r2 - 1], -1) / (r2 + 1)
        return reflect_to(self.pole, z)

    def _inverse(self, y):
        z = reflect_to(self.pole, y)
        z = z / z.norm(dim=-1, keepdim=True)
        denom = 1 - z[..., -1:]
        if validation_enabled() and bool((denom <= 0).any()):
            raise ValueError(
                f"InverseStereographic.inv: {int((denom <= 0).sum())} points lie at the pole, "
                "which has no stereographic coordinates"
            )
        # Without validation the pole maps to large finite coordinates (|u| ~ 2/eps), whose
        # image is the pole again: an atlas then sees a point of vanishing chart density.
        return z[..., :-1] / denom.clamp_min(torch.finfo(y.dtype).eps)

    def log_conformal_factor(self, x, y):
        return math.log(2) - torch.log1p(x.pow(2).sum(-1))


def _call_and_log_factor(parts, x):
    # Conformal parts applied in order, their log factors summed.
    log_factor = 0.0
    for part in parts:
        y = part(x)
        log_factor = log_factor + part.log_conformal_factor(x, y)
        x = y
    return x, log_factor


class ConformalEmbedding(InjectiveCompose):
    r"""A composition of conformal layers, :math:`c = c_n \circ \dots \circ c_1`, with the
    running conformal factor :math:`\lambda = \prod_i \lambda_i` and volume term
    :math:`d\log\lambda`.

    Typical use: ``[ZeroPad(d, D) or StiefelEmbedding(d, D) or InverseStereographic(d),
    Orthogonal(D), Scale(D), Mobius(D), Shift(D)]``. Every part must be a
    :class:`~atlasdist.transforms.ConformalTransform`.

    Example:
        >>> c = ConformalEmbedding([InverseStereographic(2), Scale(3, init=2.0), Shift(3)])
        >>> y, ladj = c.call_and_ladj(torch.zeros(4, 2))
        >>> y.shape, ladj.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    conformal = True

    def __init__(self, parts, in_features: int | None = None):
        parts = list(parts)
        for i, part in enumerate(parts):
            if not is_conformal(part):
                raise TypeError(
                    f"ConformalEmbedding: part {i} ({type(part).__name__}) is not "
                    "a ConformalTransform"
                )
        super().__init__(parts, in_features=in_features)

    def call_and_ladj(self, x):
        y, log_factor = self.call_and_log_factor(x)
        return y, x.shape[-1] * log_factor

    def call_and_log_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Returns :math:`(c(x), \log\lambda(x))` in one pass."""
        return _call_and_log_factor(self.parts, x)

    def log_conformal_factor(self, x, y):
        return self.call_and_log_factor(x)[1]

    def inverse_and_error(self, y, repeats: int = 1):
        r"""See :meth:`~atlasdist.transforms.InjectiveTransform.inverse_and_error`. The last
        parts that are affine similarities :math:`A(z) = o + \lambda W z` are inverted one
        by one without reconstructing: the residual :math:`y - A(A^\dagger y)` is orthogonal
        to :math:`A`'s image, so with :math:`g` the parts before,

        .. math::
            |y - A(g(g^\dagger(A^\dagger y)))|^2 = |y - A(A^\dagger y)|^2
            + \lambda^2 |A^\dagger y - g(g^\dagger(A^\dagger y))|^2,

        and only :math:`g` (e.g. an inverse stereographic projection in
        :math:`\mathbb{R}^{d+1}`) is evaluated forward."""
        self._check_inverse_input(y)
        outer = len(self.parts)
        while outer and getattr(self.parts[outer - 1], "affine_similarity", False):
            outer -= 1
        if outer == len(self.parts) and repeats != 1:
            y, repeats = y.repeat_interleave(repeats, -2), 1
        shape = y.shape[:-1] if repeats == 1 else y.shape[:-2] + (y.shape[-2] * repeats,)
        distances, log_scale = [], y.new_zeros(())  # the terms of the distance, scaled
        for part in reversed(self.parts[outer:]):
            x, error, _ = part.inverse_and_error(y, repeats)  # the first part reads the rows
            repeats = 1
            distances.append(error * torch.exp(log_scale))
            log_scale = log_scale + part.log_conformal_factor(x, y)
            y = x
        x = y
        for part in reversed(self.parts[:outer]):
            x = part.inv(x)
        log_factor = log_scale
        if outer:
            recon, inner = _call_and_log_factor(self.parts[:outer], x)
            distances.append((recon - y).norm(dim=-1) * torch.exp(log_scale))
            log_factor = log_factor + inner
        # Parameters with batch dimensions broadcast with the rows, as in inv / call_and_ladj.
        shape = torch.broadcast_shapes(shape, x.shape[:-1], *(t.shape for t in distances))
        log_factor = (x.shape[-1] * log_factor).expand(shape)
        # One norm of the terms (its gradient at 0 is 0, where a square root's is not finite).
        terms = torch.stack([t.expand(shape) for t in distances], -1)
        return x, torch.linalg.vector_norm(terms, dim=-1), log_factor
