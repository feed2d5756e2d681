r"""Injective transforms :math:`f: \mathbb{R}^d \to \mathbb{R}^D` and their composition.

The volume term of an injective map is :math:`\frac{1}{2}\log\det(J^\top J)`, the log of the
factor by which :math:`f` scales :math:`d`-dimensional volume. For a conformal map
(:math:`J^\top J = \lambda^2 I_d`) it is :math:`d \log\lambda`.
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform, constraints

from .._checks import check_count, check_features, check_finite, check_floating, module_tensor

__all__ = [
    "EventTransform",
    "InjectiveTransform",
    "ConformalTransform",
    "is_conformal",
    "InjectiveCompose",
    "compose",
]


def _sum_event(term: torch.Tensor, part: Transform) -> torch.Tensor:
    """Sums an elementwise (event_dim 0) log-det over the last dimension."""
    return term.sum(-1) if part.domain.event_dim == 0 else term


class EventTransform(TransformModule):
    """A transform of vectors, ``(*, in_features) -> (*, out_features)``, with the shape checks,
    value checks, ``call_and_ladj`` and repr that every layer of the library shares."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward_shape(self, shape):
        if len(shape) < 1 or shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name}: expected input shape (*, {self.in_features}), got {tuple(shape)}"
            )
        return tuple(shape[:-1]) + (self.out_features,)

    def inverse_shape(self, shape):
        if len(shape) < 1 or shape[-1] != self.out_features:
            raise ValueError(
                f"{self.name}: expected output shape (*, {self.out_features}), got {tuple(shape)}"
            )
        return tuple(shape[:-1]) + (self.in_features,)

    def __call__(self, x):
        check_floating(x, self.name, "input", module_tensor(self))
        check_features(x, self.in_features, self.name)
        check_finite(x, self.name)
        return super().__call__(x)

    def _check_inverse_input(self, y):
        check_floating(y, self.name + ".inv", "input", module_tensor(self))
        check_features(y, self.out_features, self.name + ".inv")
        check_finite(y, self.name + ".inv")

    def _inv_call(self, y):
        self._check_inverse_input(y)
        return super()._inv_call(y)

    def call_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(f(x), log_abs_det_jacobian(x, f(x)))``."""
        y = self(x)
        return y, self.log_abs_det_jacobian(x, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def __repr__(self):
        return nn.Module.__repr__(self)


class InjectiveTransform(EventTransform):
    r"""Base class of injective maps :math:`f: \mathbb{R}^d \to \mathbb{R}^D`, :math:`d \le D`
    (bijections of :math:`\mathbb{R}^d` when :math:`d = D`).

    A :class:`torch.distributions.Transform` with ``event_dim`` 1 on both sides,
    ``bijective`` when :math:`d = D`:

    - ``f(x)`` maps :math:`(*, d) \to (*, D)`;
    - ``f.inv(y)`` is a left inverse :math:`f^\dagger` with :math:`f^\dagger(f(x)) = x`; off the
      image it is a projection, documented by each subclass;
    - ``f.log_abs_det_jacobian(x, y)`` is :math:`\frac{1}{2}\log\det(J_f(x)^\top J_f(x))` with
      shape :math:`(*)`, one value per event.

    Subclasses implement ``_call``, ``_inverse`` and ``log_abs_det_jacobian``; ``call_and_ladj``
    returns both in one pass. Shapes are always checked; values (NaN, domains) are checked while
    ``torch.distributions.Distribution`` validation is on.

    **Conformal layers** (:math:`J^\top J = \lambda(x)^2 I`) set ``conformal = True`` and
    implement ``log_conformal_factor(x, y)`` (:math:`\log\lambda(x)`, shape :math:`(*)`); their
    log-det is then :math:`d \log\lambda`, the full log-det for a bijection of
    :math:`\mathbb{R}^d` and the volume term for an injection. **Affine similarities**
    (:math:`x \mapsto o + \lambda W x`, :math:`W^\top W = I`, :math:`o` and :math:`\lambda`
    independent of :math:`x`) also set ``affine_similarity = True``: a composition ending in
    them finds the distance of a point to its image without reconstructing the point
    (:meth:`inverse_and_error`).

    Arguments:
        in_features: :math:`d`.
        out_features: :math:`D \ge d`.
    """

    conformal = False
    # An affine similarity x -> o + lambda W x (W with orthonormal columns, o and lambda
    # independent of x): its residual y - f(f^dagger(y)) is orthogonal to its image, which
    # lets a composition add the distances of its parts (ConformalEmbedding.inverse_and_error).
    affine_similarity = False

    def __init__(self, in_features: int, out_features: int, cache_size: int = 0):
        name = type(self).__name__
        in_features = check_count(in_features, "in_features", name)
        out_features = check_count(out_features, "out_features", name)
        if out_features < in_features:
            raise ValueError(
                f"{name}: an injective map needs in_features <= out_features, "
                f"got d={in_features} > D={out_features}"
            )
        super().__init__(cache_size=cache_size)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def bijective(self) -> bool:
        return self.in_features == self.out_features

    def log_conformal_factor(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.name} is not conformal: it has no conformal factor")

    def log_abs_det_jacobian(self, x, y):
        if not self.conformal:
            raise NotImplementedError  # abstract
        return x.shape[-1] * self.log_conformal_factor(x, y)

    def inverse_and_error(self, y: torch.Tensor, repeats: int = 1):
        r"""``(x, error, ladj)``: the left inverse :math:`x = f^\dagger(y)`, the distance
        :math:`|y - f(x)|` of :math:`y` to its reconstruction (0 on the image; shape
        :math:`(*)`) and the volume term at :math:`x`, in one pass.

        ``repeats``: each row of ``y`` :math:`(*, B, D)` stands for ``repeats`` consecutive
        rows, as ``y.repeat_interleave(repeats, -2)`` (e.g. a point and its candidate charts,
        for a layer indexed by the chart of each of the :math:`B \cdot` ``repeats`` pairs);
        the outputs have those rows. Indexed frames read the rows in place, without the copy.

        This default reconstructs :math:`f(x)` in :math:`\mathbb{R}^D`; affine similarities
        and compositions ending in them find the distance without the reconstruction.
        """
        if repeats != 1:
            y = y.repeat_interleave(repeats, -2)
        x = self.inv(y)
        recon, ladj = self.call_and_ladj(x)
        return x, (recon - y).norm(dim=-1), ladj


def is_conformal(part) -> bool:
    """Whether a transform is conformal, i.e. provides ``log_conformal_factor``."""
    return bool(getattr(part, "conformal", False))


class _ConformalCheck(type):
    def __instancecheck__(cls, instance) -> bool:
        return is_conformal(instance)


class ConformalTransform(metaclass=_ConformalCheck):
    r"""The conformal maps, :math:`J^\top J = \lambda(x)^2 I`: a property a layer provides
    (``conformal = True`` and ``log_conformal_factor``), not a base class. ``isinstance(f,
    ConformalTransform)`` is :func:`is_conformal` ``(f)``.

    A conformal map applied after an injection scales :math:`d`-dimensional volume by
    :math:`\lambda^d`, whatever the ambient dimension; :class:`InjectiveCompose` relies on this.
    """


def _is_injective(part: Transform) -> bool:
    return isinstance(part, InjectiveTransform) and part.in_features < part.out_features


class InjectiveCompose(InjectiveTransform):
    r"""Composition :math:`f = f_n \circ \dots \circ f_1` of bijective and injective parts.

    Parts before the first dimension-raising part are bijections of :math:`\mathbb{R}^d`
    (any torch or Pyro transform: elementwise or ``event_dim`` 1); they contribute their own
    log-det. From the first dimension-raising part on, every later part must be a
    conformal layer (:func:`is_conformal`, or a conformal composition): its contribution is
    :math:`d \log\lambda`, not its full :math:`D`-dimensional log-det. This is where torch's
    ``ComposeTransform`` goes wrong for shape-changing parts: it would add :math:`D\log\lambda`.
    A non-conformal map after an injection has no product formula and is rejected (use
    :func:`atlasdist.geometry.log_volume_ratio` for such maps).

    The left inverse applies the parts' inverses in reverse order.

    Arguments:
        parts: the transforms, first applied first. Their module parameters are registered.
        in_features: :math:`d` (inferred from the first part that declares it, otherwise
            required).

    Example:
        >>> from atlasdist.transforms import ZeroPad, Scale
        >>> f = InjectiveCompose([ZeroPad(2, 3), Scale(3, init=2.0)])
        >>> f.log_abs_det_jacobian(torch.zeros(2), None)  # 2 log 2, not 3 log 2
        tensor(1.3863, grad_fn=<AddBackward0>)
    """

    def __init__(self, parts, in_features: int | None = None, cache_size: int = 0):
        parts = list(parts)
        if not parts:
            raise ValueError("InjectiveCompose needs at least one part")
        d = in_features
        for part in parts:
            if isinstance(part, InjectiveTransform):
                d = part.in_features if d is None else d
                break
            if hasattr(part, "in_features") and d is None:
                d = part.in_features
        if d is None:
            raise ValueError("InjectiveCompose: pass in_features (no part declares it)")
        features, raised = d, False
        for i, part in enumerate(parts):
            if not isinstance(part, Transform):
                raise TypeError(f"part {i} is not a torch Transform: {type(part).__name__}")
            if part.domain.event_dim > 1 or part.codomain.event_dim > 1:
                raise ValueError(f"part {i} ({type(part).__name__}) has event_dim > 1")
            if isinstance(part, InjectiveTransform):
                if part.in_features != features:
                    raise ValueError(
                        f"part {i} ({part.name}) takes {part.in_features} features, "
                        f"the previous part gives {features}"
                    )
                if raised and not is_conformal(part):
                    raise TypeError(
                        f"part {i} ({part.name}) is injective but not conformal and comes after "
                        "a dimension-raising part: its volume term does not compose in closed form"
                    )
                features = part.out_features
                raised = raised or part.in_features < part.out_features
            elif raised and not is_conformal(part):
                raise TypeError(
                    f"part {i} ({type(part).__name__}) comes after a dimension-raising part but "
                    "is not a ConformalTransform: the d-dimensional volume term of a general "
                    "map of R^D has no closed form (see atlasdist.geometry.log_volume_ratio)"
                )
            elif not part.bijective:
                raise TypeError(
                    f"part {i} ({type(part).__name__}) is neither bijective nor "
                    "an InjectiveTransform"
                )
        super().__init__(d, features, cache_size=cache_size)
        self.parts = parts
        self.part_modules = nn.ModuleList([p for p in parts if isinstance(p, nn.Module)])

    def _call(self, x):
        if x.numel() == 0:  # an empty batch: some Pyro parts cannot reshape zero rows
            return x.new_zeros(x.shape[:-1] + (self.out_features,))
        for part in self.parts:
            x = part(x)
        return x

    def _inverse(self, y):
        if y.numel() == 0:
            return y.new_zeros(y.shape[:-1] + (self.in_features,))
        for part in reversed(self.parts):
            y = part.inv(y)
        return y

    def call_and_ladj(self, x):
        if x.numel() == 0:
            return self(x), x.new_zeros(x.shape[:-1])
        d = x.shape[-1]
        ladj, raised = 0.0, False
        for part in self.parts:
            y = part(x)
            if raised:
                ladj = ladj + d * part.log_conformal_factor(x, y)
            else:
                ladj = ladj + _sum_event(part.log_abs_det_jacobian(x, y), part)
                raised = y.shape[-1] != x.shape[-1]
            x = y
        return x, ladj

    def log_abs_det_jacobian(self, x, y):
        # Intermediates are recomputed (no caching); call_and_ladj avoids the second pass.
        return self.call_and_ladj(x)[1]


def compose(*parts: Transform) -> Transform:
    """Composes transforms, first applied first: an :class:`InjectiveCompose` if any part is
    injective, else torch's ``ComposeTransform``."""
    if any(isinstance(p, InjectiveTransform) for p in parts):
        return InjectiveCompose(parts)
    return torch.distributions.ComposeTransform(list(parts))
