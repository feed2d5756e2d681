r"""Per-chart quantities kept between calls while a model's parameters do not change.

What an atlas computes once per chart depends on its parameters only: the compact WY form of
every chart's frame, the spline knots of every chart, the chart part of each coupling
network's first layer, the hypernetworks' outputs. Training needs them recomputed on every
call (the parameters move, and autograd must see the computation); evaluation with fixed
parameters (``torch.no_grad``: a density evaluator, sampling, a Pyro model's likelihood at
inference time) does not. Inside :func:`chart_cache_scope` of a module, the functions that
compute such quantities (wrapped in :func:`cached`) keep their results, keyed by the
identity of their inputs, until any parameter or buffer of the module changes.

When a result is reused:

- gradients are off (``torch.no_grad`` or ``torch.inference_mode``) and no ``torch.func``
  transform (``vmap``, ``grad``, ``jacrev``) is running, or no parameter of the module
  requires a gradient;
- every parameter and buffer of the module is the same tensor, with the same version counter
  (bumped by every in-place change: optimizer steps, ``load_state_dict``, ``copy_``), storage,
  dtype, device and shape as when the result was computed; any difference empties the cache;
- the cached result and its inputs were not changed in place since.

Changes made through ``.data`` bypass version counters, as they bypass autograd's own checks:
call :func:`clear_chart_cache` after them. Nothing is stored on the module itself (the cache
lives in a weak table keyed by the module), so ``state_dict``, ``deepcopy`` and pickling are
unaffected.

Example:
    >>> from atlasdist import AtlasFlow
    >>> atlas = AtlasFlow(D=5, d=2, charts=3)
    >>> x = atlas().sample((4,))
    >>> with torch.no_grad():
    ...     first = atlas().log_prob(x)  # computes the per-chart quantities and keeps them
    ...     again = atlas().log_prob(x)  # reuses them
    >>> torch.equal(first, again)
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["cached", "chart_cache_scope", "clear_chart_cache"]

_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "atlasdist_chart_cache", default=None
)


class _State:
    """The cache of one module: the signature of its tensors when the entries were made, and
    the entries (one table per inference mode: inference tensors stay in inference mode)."""

    __slots__ = ("signature", "tables")

    def __init__(self) -> None:
        self.signature: list | None = None
        self.tables: dict[bool, dict] = {}


_STATES: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()


def _functorch_active() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def _signature(module: nn.Module) -> list:
    return [
        (t, t._version, t.data_ptr(), t.dtype, t.device, t.shape)
        for t in (*module.parameters(), *module.buffers())
    ]


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x[0] is not y[0] or x[1:] != y[1:]:
            return False
    return True


def _table(module: nn.Module) -> dict | None:
    """The entry table to use now for ``module``, or None when results may not be kept."""
    if _functorch_active():
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return None
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = _State()
    signature = _signature(module)
    if state.signature is None or not _same(state.signature, signature):
        state.signature, state.tables = signature, {}
    return state.tables.setdefault(torch.is_inference_mode_enabled(), {})


@contextlib.contextmanager
def chart_cache_scope(module: nn.Module | None) -> Iterator[None]:
    """Within the scope, :func:`cached` keeps and reuses results for ``module`` (whose
    parameters and buffers are all the results depend on) when the rules of this module's
    docstring allow; ``None`` turns caching off for the scope."""
    table = None if module is None else _table(module)
    token = _ACTIVE.set(table)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def clear_chart_cache(module: nn.Module) -> None:
    """Drops what is cached for ``module`` (needed only after changes through ``.data``)."""
    _STATES.pop(module, None)


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return []


def _versions(tensors) -> tuple:
    return tuple(None if t.is_inference() else t._version for t in tensors)


def cached(owner, tag, inputs: tuple[torch.Tensor, ...], compute: Callable[[], object]):
    """``compute()``, or its result from an earlier call with the same ``owner`` (an object
    whose state the result depends on, e.g. the layer; a submodule of the scope's module),
    ``tag`` and input tensors (the same objects, unchanged), inside a
    :func:`chart_cache_scope` that allows it. The result is a tensor or a tuple, list or
    dict of them; callers must not change it in place."""
    table = _ACTIVE.get()
    if table is None or _functorch_active():
        return compute()
    key = (id(owner), tag, *map(id, inputs))
    entry = table.get(key)
    if entry is not None:
        refs, input_versions, value, value_versions = entry
        if (
            refs[0] is owner
            and all(a is b for a, b in zip(refs[1:], inputs, strict=True))
            and input_versions == _versions(inputs)
            and value_versions == _versions(_leaves(value))
        ):
            return value
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return compute()  # the result carries a graph: computed per call
    value = compute()
    if torch.is_grad_enabled() and any(t.requires_grad for t in _leaves(value)):
        return value
    # Strong references to the owner and inputs keep their ids from being reused while the
    # entry lives (the table is emptied when the module's tensors change).
    table[key] = ((owner, *inputs), _versions(inputs), value, _versions(_leaves(value)))
    return value
