r"""Latent flows from other libraries: zuko's (optional extra, ``pip install atlasdist[zuko]``).

A chart's latent flow :math:`h_k` may be any Pyro conditional transform (pass it in
``AtlasFlow(flows=...)``), or any zuko conditional flow or lazy transformation wrapped by
:class:`ZukoTransform`, e.g. zuko's neural spline flows or its continuous normalizing flow
(``zuko.flows.CNF``, FFJORD). The chart context :math:`[v_k, c]` of each (point, chart) pair is
zuko's context.
"""

from __future__ import annotations

import contextlib

import torch
from pyro.distributions.conditional import ConditionalTransformModule

from .._checks import check_count
from .spline import OnePassBijection

__all__ = ["ZukoTransform"]

_TRACES = ("auto", "exact", "hutchinson")


def _zuko():
    try:
        import zuko
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ZukoTransform needs zuko, an optional dependency: pip install 'atlasdist[zuko]'"
        ) from error
    return zuko


@contextlib.contextmanager
def _exact_trace(lazy, exact: bool):
    # zuko's FFJTransform reads its ``exact`` flag when it builds the transformation; every
    # one inside the lazy transformation (a composition may hold several) gets the mode.
    modules = [m for m in lazy.modules() if isinstance(getattr(m, "exact", None), bool)]
    saved = [m.exact for m in modules]
    for m in modules:
        m.exact = exact
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.exact = value


class _ZukoMap(OnePassBijection):
    # A zuko transformation maps data to noise (u -> z); the atlas's latent flow maps z -> u,
    # so this is its inverse. Each pass returns its log-det with its output (call_and_ladj),
    # one ODE solve for a continuous flow.

    name = "ZukoTransform"

    def __init__(self, transform, features: int, context_width: int):
        super().__init__(features, features)
        self.zuko = transform
        self.context_width = context_width
        self._last = None

    def _map(self, x, inverse: bool):
        part = self.zuko if inverse else self.zuko.inv
        try:
            return part.call_and_ladj(x)
        except RuntimeError as error:
            # Most often a zuko flow built for another context width (its network's first
            # layer does not fit): say which widths the atlas gives.
            raise ValueError(
                f"ZukoTransform: the zuko flow failed on inputs of shape {tuple(x.shape)} "
                f"with a context of width {self.context_width} ({error}); build it with "
                f"features={self.in_features} and context={self.context_width}"
            ) from error


class ZukoTransform(ConditionalTransformModule):
    r"""A zuko conditional flow as (part of) the latent flow of an
    :class:`~atlasdist.AtlasFlow`: :math:`u = h(z; [v_k, c])` is the inverse of zuko's
    transformation (zuko maps data to noise), and its log-det comes with each pass.

    The context of each (point, chart) pair, :math:`[v_k, c]`, is zuko's context: build the
    zuko flow with ``context`` of its width, the chart code's width plus that of the
    conditioning input. The chart code is the chart context (the centres by default) projected
    to at most ``code_features`` (default 32) features, so for :meth:`AtlasFlow.spheres
    <atlasdist.AtlasFlow.spheres>` and :meth:`AtlasFlow.tori <atlasdist.AtlasFlow.tori>` (a
    one-hot context) it is :math:`\min(K, 32)`; an atlas with ``context_features`` :math:`e`
    adds :math:`\min(e, 32)`. A flow built for another width raises a ``ValueError`` that
    names the width to use. The zuko flow's own base distribution is not used; the atlas has
    its base :math:`q`.

    **Continuous flows** (``zuko.flows.CNF``): the log-det is :math:`\int_0^1
    \operatorname{tr} \partial_z f\, dt`. With ``trace="auto"`` (default) it is estimated
    with Hutchinson's estimator (one Gaussian probe per row) while this module is in training
    mode and gradients are on, and computed exactly otherwise, so ``log_prob`` under
    ``torch.no_grad()`` or after ``.eval()`` uses the exact trace; ``"exact"`` or
    ``"hutchinson"`` forces one (in every continuous part of a composed zuko flow). The
    estimate of each chart's log-det is unbiased; the atlas's ``log_prob``, a log-sum-exp
    over the charts whose image holds the point, is then biased (Jensen) where charts overlap,
    as any such mixture's is. zuko integrates the ODE with an adaptive solver (``atol`` 1e-6,
    ``rtol`` 1e-5 by default on the state; it scales the trace term by 1e-2, so the log-det is
    integrated about 100 times more loosely): sampling and ``log_prob`` agree with the
    continuous flow to the solver's accuracy, not to rounding. On a sharp random CNF in the
    plane (weights scaled by 3) the default tolerances left the state within 9e-5 and the
    log-det within 1.3e-3 of a solve at 1e-12; set ``atol`` and ``rtol`` of zuko's
    ``FFJTransform`` lower for more. zuko's coupling and autoregressive flows with closed-form
    inverses (NSF, MAF, ...) are exact bijections to rounding and ignore ``trace``; its
    neural autoregressive flows (NAF, UNAF) invert numerically, to their own tolerance.

    Importing zuko turns off the default argument validation of every
    ``torch.distributions.Distribution`` in the process (zuko sets
    ``Distribution._validate_args = False``), and with it the checks of atlasdist's
    distributions that follow that default. Pass ``validate_args=True`` to ``atlas.flow()``, or
    call ``torch.distributions.Distribution.set_default_validate_args(True)`` after importing
    zuko, to keep them.

    Arguments:
        flow: a ``zuko.flows.Flow`` (its ``transform`` is used) or a
            ``zuko.lazy.LazyTransform``, on :math:`\mathbb{R}^d` with the context size above.
        features: :math:`d`; read off a zuko ``Flow``'s (unconditional) base when omitted.
        trace: ``"auto"``, ``"exact"`` or ``"hutchinson"`` (continuous flows only).

    Example:
        >>> import zuko  # doctest: +SKIP
        >>> poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])  # doctest: +SKIP
        >>> cnf = ZukoTransform(zuko.flows.CNF(2, context=2))  # doctest: +SKIP
        >>> atlas = AtlasFlow.spheres(2, torch.zeros(2, 3), torch.ones(2), poles,
        ...                           flows=[cnf])  # doctest: +SKIP
        >>> atlas().log_prob(atlas().sample((4,))).shape  # doctest: +SKIP
        torch.Size([4])
    """

    def __init__(self, flow, features: int | None = None, trace: str = "auto"):
        super().__init__()
        zuko = _zuko()
        if isinstance(flow, zuko.lazy.Flow):
            if features is None:
                try:  # zuko's default bases ignore the context; a conditional one needs it
                    shape = flow.base().event_shape
                except TypeError:
                    shape = None
                features = shape[0] if shape is not None and len(shape) == 1 else None
            flow = flow.transform
        if features is None:
            raise ValueError(
                "ZukoTransform: give features (d), the size of the vectors the flow maps; it "
                "is read off a zuko Flow with an unconditional base only"
            )
        self.features = check_count(features, "features", "ZukoTransform")
        if not isinstance(flow, zuko.lazy.LazyTransform):
            raise TypeError(
                "ZukoTransform: flow must be a zuko.flows.Flow or a zuko.lazy.LazyTransform, "
                f"got {type(flow).__name__}"
            )
        if trace not in _TRACES:
            raise ValueError(f"ZukoTransform: trace must be one of {_TRACES}, got {trace!r}")
        self.lazy = flow
        self.trace = trace

    def _hutchinson(self) -> bool:
        if self.trace == "auto":
            return self.training and torch.is_grad_enabled()
        return self.trace == "hutchinson"

    def condition(self, context):
        if not isinstance(context, torch.Tensor) or context.dim() < 1:
            raise TypeError(
                "ZukoTransform: the context must be a tensor of shape (*, context features), "
                f"got {type(context).__name__}"
            )
        with _exact_trace(self.lazy, not self._hutchinson()):
            transform = self.lazy(context)
        return _ZukoMap(transform, self.features, context.shape[-1])

    def extra_repr(self) -> str:
        return f"features={self.features}, trace={self.trace!r}"
