r"""What the sphere and simplex flows share: the pushforward of a distribution on a manifold by
a chain of flows on it (:class:`ChainDistribution`), and the lazy module that builds one from
its parameters, optionally conditioned on an input :math:`c` (:class:`ChainFlow`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.distributions import TransformedDistribution, constraints
from pyro.distributions.conditional import ConditionalTransform
from torch import nn
from torch.distributions import Distribution, Transform

from .._checks import (
    check_batch,
    check_count,
    check_features,
    check_finite,
    check_floating,
    check_sample_shape,
    check_sizes,
    model_tensor,
    module_tensor,
)
from ..lazy import LazyDistribution
from ..transforms.conditional import Conditional, condition

__all__ = ["check_chain", "check_value", "ChainDistribution", "ChainFlow"]


def _transform_list(name: str, transforms) -> list:
    # One transform or a sequence of them, as a list.
    if isinstance(transforms, Transform | ConditionalTransform):
        return [transforms]
    if isinstance(transforms, str | torch.Tensor) or not hasattr(transforms, "__iter__"):
        raise TypeError(
            f"{name}: transforms must be a list of transforms, got {type(transforms).__name__}"
        )
    return list(transforms)


def check_chain(
    name: str, base, transforms, min_features: int, manifold: ManifoldKind | None = None
) -> list:
    """The transforms as a list, each a transform mapping the base's n features to n and, when
    ``manifold`` is given, not a flow on another manifold; the base a distribution on it
    (TypeError or ValueError otherwise)."""
    transforms = _transform_list(name, transforms)
    if not isinstance(base, Distribution):
        raise TypeError(f"{name}: the base must be a Distribution, got {type(base).__name__}")
    if len(base.event_shape) != 1 or base.event_shape[0] < min_features:
        raise ValueError(
            f"{name}: the base must have event shape (n,), n >= {min_features}, got "
            f"{tuple(base.event_shape)}"
        )
    if manifold is not None and not isinstance(base.support, manifold.constraint):
        raise ValueError(
            f"{name}: the base must be a distribution on {manifold.name} (e.g. "
            f"{manifold.example}), got {type(base).__name__} with support {base.support}"
        )
    n = base.event_shape[0]
    for i, t in enumerate(transforms):
        _check_transform(name, i, t, n, manifold)
    return transforms


class ManifoldKind:
    """What a chain of flows lives on: the constraint type of its support, for the checks."""

    def __init__(self, constraint: type, name: str, example: str):
        self.constraint, self.name, self.example = constraint, name, example


def _check_transform(name: str, i: int, t, n: int, manifold: ManifoldKind | None = None) -> None:
    label = f"{name}: transform {i} ({type(t).__name__})"
    if not isinstance(t, Transform | ConditionalTransform):
        raise TypeError(f"{label} is not a torch Transform or a Pyro conditional transform")
    features = (getattr(t, "in_features", n), getattr(t, "out_features", n))
    if features != (n, n):
        raise ValueError(f"{label} maps {features[0]} to {features[1]} features, the base has {n}")
    domain = getattr(getattr(t, "layer", t), "domain", None)
    if manifold is not None and isinstance(domain, _MANIFOLDS):
        if not isinstance(domain, manifold.constraint):
            raise ValueError(
                f"{label} is a flow on {domain}, not on {manifold.name}: use the flows of "
                "atlasdist.transforms.sphere on a sphere, atlasdist.transforms.simplex on a "
                "simplex"
            )


def check_value(name: str, value: torch.Tensor, n: int, dist=None) -> None:
    """Raises unless ``value`` is a finite float tensor of shape ``(*, n)`` with the dtype and
    device of the distribution ``dist``'s parameters and batch dimensions that broadcast with
    its batch shape."""
    check_floating(value, name, "value", None if dist is None else model_tensor(dist))
    check_features(value, n, name, "value")
    if dist is not None:
        check_batch(value.shape[:-1], dist.batch_shape, name)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: value holds non-finite (NaN or inf) entries")


class ChainDistribution(TransformedDistribution):
    r"""The pushforward of ``base`` by ``transforms`` (flows of an :math:`m`-manifold onto
    itself), :math:`y = f_K \circ \dots \circ f_1(x)`; subclasses turn
    :meth:`pull_back` into ``log_prob``."""

    min_features = 1

    manifold: ManifoldKind | None = None

    def __init__(
        self,
        base: Distribution,
        transforms: Transform | Sequence[Transform] = (),
        validate_args: bool | None = None,
    ):
        name = type(self).__name__
        transforms = check_chain(name, base, transforms, self.min_features, self.manifold)
        super().__init__(base, transforms, validate_args=validate_args)

    def rsample(self, sample_shape=()):
        return super().rsample(check_sample_shape(sample_shape, type(self).__name__))

    def sample(self, sample_shape=()):
        return super().sample(check_sample_shape(sample_shape, type(self).__name__))

    def pull_back(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        r""":math:`x = f^{-1}(y)` and :math:`-\sum_k \log R_{f_k}(x_{k-1})`, the log-density
        ratio :math:`\log p(y) - \log p_0(x)`; shapes :math:`(*, n)` and :math:`(*)`."""
        log_prob = 0.0
        for t in reversed(self.transforms):
            x = t.inv(y)
            log_prob = log_prob - t.log_abs_det_jacobian(x, y)
            y = x
        return y, log_prob


_MANIFOLDS = (type(constraints.sphere), type(constraints.simplex))


class ChainFlow(LazyDistribution):
    r"""Base of the lazy modules :class:`~atlasdist.distributions.SphereFlow` and
    :class:`~atlasdist.distributions.SimplexFlow`: holds the flows (``nn.Module`` transforms
    are registered) and, with ``context_features`` :math:`k > 0`, conditions them on an input
    :math:`c`, so that the module models :math:`p(x \mid c)`.

    **Conditioning.** Each flow with raw parameters
    (:class:`~atlasdist.transforms.manifold.ManifoldFlow`) becomes a
    :class:`~atlasdist.transforms.Conditional` whose :class:`~atlasdist.transforms.Hypernet`
    (hidden sizes ``hidden``) produces those parameters from :math:`c`, starting (output
    weights 0) at the flow's current values for every :math:`c`; a Pyro conditional transform
    given in ``transforms`` is conditioned as it is; other transforms are shared by every
    :math:`c`. ``module(c)`` with :math:`c` of shape :math:`(B, k)` returns a distribution with
    batch shape :math:`(B,)`: one exact, normalized density per row, evaluated at :math:`x` of
    shape :math:`(B, n)` or :math:`(S, B, n)`; ``sample((S,))`` has shape :math:`(S, B, n)`.
    Cost: one hypernetwork pass per flow and call, then that of the flows.

    Arguments:
        features: :math:`n`.
        transforms: flows on the manifold, first applied first.
        context_features: :math:`k` (0: no conditioning input).
        hidden: hidden sizes of each flow's hypernetwork.
    """

    min_features = 1
    manifold: ManifoldKind | None = None

    def __init__(
        self,
        features: int,
        transforms: Sequence[Transform] = (),
        context_features: int = 0,
        hidden: Sequence[int] = (32,),
    ):
        super().__init__()
        name = type(self).__name__
        self.features = check_count(features, "features", name, minimum=0)
        if self.features < self.min_features:
            on = f" ({self.manifold.name} in R^n)" if self.manifold is not None else ""
            raise ValueError(
                f"{name}: features must be >= {self.min_features}{on}, got {self.features}"
            )
        if isinstance(context_features, bool) or not hasattr(context_features, "__index__"):
            raise TypeError(
                f"{name}: context_features must be an int >= 0, got {context_features!r}"
            )
        if context_features < 0:
            raise ValueError(
                f"{name}: context_features must be an int >= 0, got {context_features}"
            )
        self.context_features = int(context_features)
        hidden = check_sizes(hidden, "hidden", name)
        transforms = _transform_list(name, transforms)
        for i, t in enumerate(transforms):
            _check_transform(name, i, t, self.features, self.manifold)
            size = getattr(t, "context_features", None)
            if isinstance(t, ConditionalTransform) and not self.context_features:
                raise ValueError(
                    f"{name}: transform {i} ({type(t).__name__}) is conditional; build the flow "
                    "with context_features=<size of c>"
                )
            if size is not None and self.context_features and size != self.context_features:
                raise ValueError(
                    f"{name}: transform {i} ({type(t).__name__}) takes a context of size "
                    f"{size}, the flow has context_features={self.context_features}"
                )
            if self.context_features:
                transforms[i] = self._conditional(i, t, hidden)
        self.transforms = transforms
        self.transform_modules = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])

    def _conditional(self, i: int, t, hidden: Sequence[int]):
        if isinstance(t, ConditionalTransform) or not hasattr(type(t), "parameter_shapes"):
            return t
        # The conditional flow starts as the given one for every c: the hypernetwork's output
        # starts at the flow's raw parameters.
        initial = torch.cat([p.detach().reshape(-1) for p in t.parameters()])
        part = Conditional(
            type(t),
            self.features,
            context_features=self.context_features,
            hidden=hidden,
            initial=initial,
        )
        return part

    def conditioned(self, c: torch.Tensor | None) -> tuple[list[Transform], torch.Size]:
        r"""The flows conditioned on ``c`` and the batch shape :math:`(*B)` that ``c`` of shape
        :math:`(*B, c)` gives (:math:`()` without a context)."""
        if not self.context_features:
            self._no_context(c)
            return self.transforms, torch.Size()
        name = type(self).__name__
        if c is None:
            raise ValueError(
                f"{name}: built with context_features={self.context_features}, so it models "
                f"p(x | c): call it with c of shape (*, {self.context_features})"
            )
        check_floating(c, name, "c", module_tensor(self))
        check_features(c, self.context_features, name, "c")
        check_finite(c, name, "c")
        return [condition(t, c) for t in self.transforms], c.shape[:-1]

    def extra_repr(self) -> str:
        context = f", context_features={self.context_features}" if self.context_features else ""
        return f"features={self.features}{context}"
