r"""The lazy-distribution contract shared by every builder of the library.

A :class:`LazyDistribution` is an ``nn.Module`` whose ``forward(c=None)`` *returns* a
:class:`torch.distributions.Distribution` built from the module's current parameters (the
shape of zuko's ``LazyDistribution``). Parameters live in the module, so ``.to(device)``,
``state_dict``, ``pyro.module`` and optimizers work; the distribution is a cheap object built
per call, with its base on the module's device and dtype.

``c`` is an optional conditioning input, for :math:`p(x \mid c)` (amortized or
simulation-based inference); a builder made without a context raises a ``ValueError`` naming
the fix when it gets one.

``flow(...)`` is an alias of calling the module, kept on every builder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

__all__ = ["LazyDistribution"]


class LazyDistribution(nn.Module):
    r"""Base of the builders: ``module(c=None, **options)`` returns the distribution
    :math:`p(x)` (or :math:`p(x \mid c)`).

    Subclasses implement ``forward(self, c=None, **options)``. ``options`` are the
    distribution's own switches (e.g. ``validate_args``).

    Example:
        >>> from atlasdist import AtlasFlow
        >>> atlas = AtlasFlow(D=3, d=2, charts=2)
        >>> isinstance(atlas, LazyDistribution), atlas().event_shape
        (True, torch.Size([3]))
    """

    def forward(self, c: torch.Tensor | None = None, **options) -> Distribution:
        raise NotImplementedError  # abstract

    def flow(self, c: torch.Tensor | None = None, **options) -> Distribution:
        """The distribution with the current parameters: an alias of ``self(c, **options)``."""
        return self(c, **options)

    def base_distribution(self) -> Distribution:
        r""":math:`q`: the module's ``base`` if it has one, else a standard normal on the
        latent space, on the module's device and dtype (builders with a latent space register
        a buffer ``_base_loc`` of shape :math:`(d,)`)."""
        if getattr(self, "base", None) is not None:
            return self.base
        loc = self._base_loc
        return Independent(Normal(loc, torch.ones_like(loc)), 1)

    def _no_context(self, c) -> None:
        """Raises unless ``c`` is None: for builders made without a conditioning input."""
        if c is not None:
            raise ValueError(
                f"{type(self).__name__}: got a conditioning input c, but this model was built "
                "without one; build it with context_features=<size of c> to model p(x | c)"
            )
