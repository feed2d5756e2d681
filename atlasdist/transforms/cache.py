r"""Per-chart quantities kept between calls while a model's parameters do not change.

What an atlas computes once per chart depends on its parameters only: the compact WY form of
every chart's frame, the spline knots of every chart, the chart part of each coupling
network's first layer, the hypernetworks' outputs. Training needs them recomputed on every
call (the parameters move, and autograd must see the computation); evaluation with fixed
parameters (``torch.no_grad``: a density evaluator, sampling, a Pyro model's likelihood at
inference time) does not. Inside :func:`chart_cache_scope` of a module, the functions that
compute such quantities (wrapped in :func:`cached`) keep their results, keyed by the
identity of their inputs, until any parameter or buffer of the module changes.

When a result is kept and reused:

- no ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``) is running, and either gradients
  are off (``torch.no_grad`` or ``torch.inference_mode``) or no parameter or buffer of the
  module requires a gradient (nor does any input of the computation);
- every parameter and buffer of the module is the same tensor, with the same version counter
  (bumped by in-place changes: ``copy_``, ``load_state_dict``, most optimizer steps), storage,
  dtype, device and shape as when the result was computed; any difference empties the cache,
  and so does every step of a ``torch.optim`` optimizer (Pyro's included: some, such as fused
  Adam or Pyro's ``ClippedAdam``, change parameters without bumping their version counters);
- its inputs are the module's parameters or buffers or results kept earlier (a result of
  per-row inputs, which change with every call, is not kept), and neither they nor the result
  were changed in place since;
- the module's tensors are not inference tensors (made inside ``torch.inference_mode``).

Other changes made through ``.data`` bypass version counters, as they bypass autograd's own
checks: call :func:`clear_chart_cache` after them. Nothing is stored on the module itself (the
cache lives in a weak table keyed by the module), so ``state_dict``, ``deepcopy`` and pickling
are unaffected.

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
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["cached", "chart_cache_scope", "clear_chart_cache", "keeps"]


class _Table:
    """The results kept for one module in one mode, and the tensors that may key them: the
    module's parameters and buffers and the kept results (by id, held, so ids stay unique)."""

    __slots__ = ("entries", "stable")

    def __init__(self, tensors) -> None:
        self.entries: dict = {}
        self.stable: dict[int, torch.Tensor] = {id(t): t for t in tensors}

    def is_stable(self, t: torch.Tensor) -> bool:
        return self.stable.get(id(t)) is t


class _State:
    """The cache of one module: the signature of its tensors when the tables were made, and
    one table per inference mode (inference tensors stay in inference mode)."""

    __slots__ = ("signature", "tables")

    def __init__(self) -> None:
        self.signature: list | None = None
        self.tables: dict[bool, _Table] = {}


_STATES: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()
# The table of the innermost scope, with its module (nested scopes of one module share it) and
# whether gradients were on when it was chosen.
_ACTIVE: contextvars.ContextVar[tuple[nn.Module, _Table | None, bool] | None] = (
    contextvars.ContextVar("atlasdist_chart_cache", default=None)
)


def _clear_all(*_args) -> None:
    _STATES.clear()


# Some optimizers change parameters without bumping their version counters (fused Adam,
# Pyro's ClippedAdam through .data): every optimizer step empties every cache.
register_optimizer_step_post_hook(_clear_all)


def _functorch_active() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def _signature(tensors: list[torch.Tensor]) -> list:
    # The storage is held so that a replaced tensor's memory cannot come back at the same
    # address with the same version.
    return [
        (t, t._version, t.untyped_storage(), t.data_ptr(), t.dtype, t.device, t.shape)
        for t in tensors
    ]


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x[0] is not y[0] or x[1] != y[1] or x[3:] != y[3:]:
            return False
    return True


def _table(module: nn.Module) -> _Table | None:
    """The table to use now for ``module``, or None when results may not be kept."""
    if _functorch_active():
        return None
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_inference() for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = _State()
    signature = _signature(tensors)
    if state.signature is None or not _same(state.signature, signature):
        state.signature, state.tables = signature, {}
    mode = torch.is_inference_mode_enabled()
    table = state.tables.get(mode)
    if table is None:
        table = state.tables[mode] = _Table(tensors)
    return table


@contextlib.contextmanager
def chart_cache_scope(module: nn.Module | None) -> Iterator[None]:
    """Within the scope, :func:`cached` keeps and reuses results for ``module`` (whose
    parameters and buffers are all the results depend on) when the rules of this module's
    docstring allow; ``None`` turns caching off for the scope."""
    active = _ACTIVE.get()
    if module is not None and active is not None and active[0] is module:
        yield  # nested in a scope of the same module: its table, checked once
        return
    grad = torch.is_grad_enabled()
    token = _ACTIVE.set(None if module is None else (module, _table(module), grad))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def clear_chart_cache(module: nn.Module | None = None) -> None:
    """Drops what is cached for ``module`` (every module when None): needed only after
    changes through ``.data`` outside an optimizer step."""
    if module is None:
        _STATES.clear()
    else:
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


def _keeping_table(inputs: tuple[torch.Tensor, ...]) -> _Table | None:
    # The table a result of these inputs may be kept in now, or None.
    active = _ACTIVE.get()
    table = None if active is None else active[1]
    if table is None or _functorch_active():
        return None
    if torch.is_grad_enabled() and not active[2]:
        return None  # gradients turned on inside a gradient-free scope: none kept
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return None  # the result needs a graph: computed per call
    if not all(table.is_stable(t) for t in inputs):
        return None  # per-call inputs: a kept result would never be asked for again
    return table


def keeps(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether a result computed from ``inputs`` now may be kept for later calls (see
    :func:`cached`). When it may not and gradients are on (training), per-chart work is paid
    on every call, and a :class:`~atlasdist.transforms.Conditional` layer does it for the
    charts a call uses only."""
    return _keeping_table(inputs) is not None


def cached(owner, tag, inputs: tuple[torch.Tensor, ...], compute: Callable[[], object]):
    """``compute()``, or its result from an earlier call with the same ``owner`` (an object
    whose state the result depends on, e.g. the layer; a submodule of the scope's module),
    ``tag`` and input tensors (the same objects, unchanged), inside a
    :func:`chart_cache_scope` that allows it. The result is a tensor or a tuple, list or
    dict of them; callers must not change it in place."""
    table = _keeping_table(inputs)
    if table is None:
        return compute()
    key = (id(owner), tag, *map(id, inputs))
    entry = table.entries.get(key)
    if entry is not None:
        refs, input_versions, value, value_versions = entry
        if (
            refs[0] is owner
            and all(a is b for a, b in zip(refs[1:], inputs, strict=True))
            and input_versions == _versions(inputs)
            and value_versions == _versions(_leaves(value))
        ):
            return value
    value = compute()
    leaves = _leaves(value)
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return value
    # Strong references to the owner and inputs keep their ids from being reused while the
    # entry lives (the table is emptied when the module's tensors change).
    table.entries[key] = ((owner, *inputs), _versions(inputs), value, _versions(leaves))
    table.stable.update((id(t), t) for t in leaves)
    return value
