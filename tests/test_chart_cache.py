"""The per-chart cache (atlasdist.transforms.cache): evaluation without gradients reuses
per-chart quantities while the parameters are unchanged, and gives exactly what a fresh
computation gives after any change; with gradients everything is computed per call."""

import copy
import doctest

import _atlases as A
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atlasdist import AtlasFlow, ChartMembership
from atlasdist.transforms import ChartSpline, cached, chart_cache_scope, clear_chart_cache
from atlasdist.transforms import cache as cache_module


def learned(seed: int) -> AtlasFlow:
    # Learned charts (Householder frames from a hypernetwork, compact WY form), spline and
    # coupling layers with chart-aware networks, and a chart code: every cached kind.
    torch.manual_seed(seed)
    atlas = AtlasFlow(
        6, 2, 4, hidden=(8,), layers=2, code_features=3, membership=ChartMembership(m=4)
    ).double()
    with torch.no_grad():
        for p in atlas.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return atlas


ATLASES = {
    "learned": learned,
    "sphere": A.sphere,
    "tori": A.tori,
    "conformal": lambda s: A.conformal_chart(s)[0],
}
names = st.sampled_from(sorted(ATLASES))
seeds = st.integers(0, 2**16)


def evaluate(atlas: AtlasFlow, x: torch.Tensor, seed: int) -> dict:
    p = atlas()
    torch.manual_seed(seed)
    return {
        "log_prob": p.log_prob(x),
        "sample": p.sample((7,)),
        "posterior": p.chart_log_posterior(x),
        "encode": p.encode(x)[0],
    }


def uncached(atlas: AtlasFlow, x: torch.Tensor, seed: int) -> dict:
    atlas.cache_charts = False
    try:
        return evaluate(atlas, x, seed)
    finally:
        atlas.cache_charts = True


def fresh_sample(atlas: AtlasFlow, seed: int) -> torch.Tensor:
    atlas.cache_charts = False
    try:
        torch.manual_seed(seed)
        return atlas().sample((16,))
    finally:
        atlas.cache_charts = True


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def knot_calls(atlas: AtlasFlow) -> list:
    # Counts the knot-network passes of the atlas's chart-aware splines.
    calls = []
    for module in atlas.modules():
        if isinstance(module, ChartSpline):
            module.nn.register_forward_hook(lambda *_: calls.append(1))
    return calls


@given(name=names, seed=seeds)
def test_cached_evaluation_is_exactly_the_fresh_one(name, seed):
    atlas = ATLASES[name](seed)
    with torch.no_grad():
        x = atlas().sample((16,))
        fresh = uncached(atlas, x, seed)
        first = evaluate(atlas, x, seed)  # fills the cache
        again = evaluate(atlas, x.clone(), seed)  # reuses it
    assert_same(first, fresh)
    assert_same(again, fresh)


def test_gradient_free_calls_reuse_the_per_chart_work_and_gradient_calls_do_not():
    atlas = learned(0)
    calls = knot_calls(atlas)
    x = atlas().sample((8,))
    assert calls, "the default latent flow has chart-aware splines"
    with torch.no_grad():
        atlas().log_prob(x)
        after_first = len(calls)
        for _ in range(3):
            atlas().log_prob(x.clone())
            atlas().sample((4,))
    assert len(calls) == after_first  # no knot network ran again
    atlas().log_prob(x).sum().backward()  # with gradients: computed per call
    assert len(calls) > after_first


def test_inference_mode_reuses_and_agrees():
    atlas = learned(1)
    calls = knot_calls(atlas)
    with torch.no_grad():
        x = atlas().sample((8,))
        fresh = uncached(atlas, x, 1)
    with torch.inference_mode():
        first = evaluate(atlas, x, 1)
        n = len(calls)
        again = evaluate(atlas, x, 1)
    assert len(calls) == n
    assert_same(first, fresh)
    assert_same(again, fresh)
    with torch.no_grad():  # inference tensors stay in inference mode
        assert_same(evaluate(atlas, x, 1), fresh)


def change_by_optimizer(atlas):
    optimizer = torch.optim.SGD(atlas.parameters(), lr=0.05)
    x = atlas().sample((8,))
    optimizer.zero_grad()
    (-atlas().log_prob(x).mean()).backward()
    optimizer.step()
    return atlas


def change_by_fused_adam(atlas):
    # Fused Adam changes parameters without bumping their version counters.
    optimizer = torch.optim.Adam(atlas.parameters(), lr=0.05, fused=True)
    x = atlas().sample((8,))
    (-atlas().log_prob(x).mean()).backward()
    optimizer.step()
    return atlas


def change_by_pyro_clipped_adam(atlas):
    # Pyro's ClippedAdam writes through .data.
    from pyro.optim.clipped_adam import ClippedAdam

    optimizer = ClippedAdam(atlas.parameters(), lr=0.05)
    x = atlas().sample((8,))
    (-atlas().log_prob(x).mean()).backward()
    optimizer.step()
    return atlas


def change_by_state_dict(atlas):
    other = learned(7)
    atlas.load_state_dict(other.state_dict())
    return atlas


def change_in_place(atlas):
    with torch.no_grad():
        for p in atlas.parameters():
            p.mul_(1.1)
    return atlas


def change_one_weight_in_place(atlas):
    # Only a network weight: no input of any cached computation changes, only the module.
    spline = next(m for m in atlas.modules() if isinstance(m, ChartSpline))
    with torch.no_grad():
        spline.nn.layers[-1].bias.add_(0.3)
    return atlas


def change_dtype(atlas):
    return atlas.float().double()  # same values, new storage


def change_by_replacing_a_parameter(atlas):
    spline = next(m for m in atlas.modules() if isinstance(m, ChartSpline))
    last = spline.nn.layers[-1]
    last.bias = torch.nn.Parameter(last.bias.detach() + 0.3)
    return atlas


@pytest.mark.parametrize(
    "change",
    [
        change_by_optimizer,
        change_by_fused_adam,
        change_by_pyro_clipped_adam,
        change_by_state_dict,
        change_in_place,
        change_one_weight_in_place,
        change_dtype,
        change_by_replacing_a_parameter,
    ],
)
def test_the_cache_follows_every_change_of_the_parameters(change):
    atlas = learned(2)
    with torch.no_grad():
        x = atlas().sample((16,))
        evaluate(atlas, x, 2)  # fills the cache
    old = copy.deepcopy(atlas)
    change(atlas)
    with torch.no_grad():
        x = fresh_sample(atlas, 2)  # points on the changed model's support
        fresh = uncached(atlas, x, 2)
        after = evaluate(atlas, x, 2)
        if change is not change_dtype:  # a stale cache would be detected
            assert not torch.equal(fresh["log_prob"], old(validate_args=False).log_prob(x))
    assert_same(after, fresh)


def test_changes_through_data_need_clear_chart_cache():
    atlas = learned(3)
    with torch.no_grad():
        x = atlas().sample((16,))
        atlas().log_prob(x)
    for p in atlas.parameters():
        p.data.mul_(1.1)  # bypasses version counters
    clear_chart_cache(atlas)
    with torch.no_grad():
        x = fresh_sample(atlas, 3)
        fresh = uncached(atlas, x, 3)
        assert_same(evaluate(atlas, x, 3), fresh)


def test_gradients_are_those_of_the_uncached_model_after_cached_calls():
    atlas = learned(4)
    with torch.no_grad():
        x = atlas().sample((16,))
        atlas().log_prob(x)  # fills the cache with gradient-free tensors

    def grads():
        atlas.zero_grad()
        atlas().log_prob(x).sum().backward()
        return [None if p.grad is None else p.grad.clone() for p in atlas.parameters()]

    cached_grads = grads()
    atlas.cache_charts = False
    fresh_grads = grads()
    assert any(g is not None and bool(g.abs().sum() > 0) for g in cached_grads)
    for a, b in zip(cached_grads, fresh_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_parameters_are_cached_with_gradients_on():
    # No parameter requires a gradient: per-chart quantities carry no graph, so they are kept
    # even with gradients on (e.g. a fixed likelihood in a model whose inputs need gradients).
    atlas = learned(5).requires_grad_(False)
    calls = knot_calls(atlas)
    x = atlas().sample((8,)).requires_grad_(True)
    atlas().log_prob(x).sum().backward()
    n = len(calls)
    atlas().log_prob(x).sum().backward()
    assert len(calls) == n
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_a_deep_copy_has_its_own_cache():
    atlas = learned(6)
    with torch.no_grad():
        x = atlas().sample((16,))
        original = atlas().log_prob(x)
    twin = copy.deepcopy(atlas)
    change_in_place(twin)
    with torch.no_grad():
        y = fresh_sample(twin, 6)
        fresh = uncached(twin, y, 6)
        assert_same(evaluate(twin, y, 6), fresh)
        assert torch.equal(atlas().log_prob(x), original)


def test_cached_recomputes_when_a_kept_result_or_input_is_changed_in_place():
    owner = torch.nn.Linear(1, 1)
    owner.register_buffer("source", torch.ones(3))
    source = owner.source
    runs = []

    def compute():
        runs.append(1)
        return source * 2

    with torch.no_grad(), chart_cache_scope(owner):
        first = cached(owner, "double", (source,), compute)
        assert cached(owner, "double", (source,), compute) is first
        first.add_(1)  # a caller broke the contract: the result is recomputed
        assert torch.equal(cached(owner, "double", (source,), compute), source * 2)
        source.add_(1)  # the input changed
        assert torch.equal(cached(owner, "double", (source,), compute), torch.full((3,), 4.0))
        other = torch.ones(3)  # not the module's, nor a kept result: computed per call
        cached(owner, "double", (other,), lambda: compute() + other)
        cached(owner, "double", (other,), lambda: compute() + other)
    assert len(runs) == 5


def test_cached_computes_per_call_outside_a_scope_under_vmap_and_with_graphs():
    owner = torch.nn.Linear(1, 1)
    runs = []

    def compute(value):
        runs.append(1)
        return value * 2

    x = torch.ones(2)
    cached(owner, "t", (x,), lambda: compute(x))
    cached(owner, "t", (x,), lambda: compute(x))
    assert len(runs) == 2  # no scope: nothing kept
    with torch.no_grad(), chart_cache_scope(owner):
        out = torch.func.vmap(lambda row: cached(owner, "v", (), lambda: compute(row)))(
            torch.arange(3.0)
        )
        again = torch.func.vmap(lambda row: cached(owner, "v", (), lambda: compute(row)))(
            torch.arange(3.0) + 1
        )
    assert torch.equal(out, 2 * torch.arange(3.0))
    assert torch.equal(again, 2 * torch.arange(3.0) + 2)  # batched values were not kept
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    w = torch.ones(2, requires_grad=True)
    with chart_cache_scope(frozen):
        first = cached(frozen, "g", (), lambda: compute(w))
        second = cached(frozen, "g", (), lambda: compute(w))
    assert first.requires_grad and second is not first  # a result with a graph is not kept


def test_docstring_examples():
    result = doctest.testmod(cache_module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_a_conditional_atlas_keeps_only_per_chart_results():
    # Its latent flows take per-row inputs: what depends on them changes with every call and
    # is not kept (it would never be asked for again), so the cache does not grow.
    torch.manual_seed(0)
    atlas = AtlasFlow(5, 2, 3, hidden=(8,), layers=2, context_features=2).double()
    sizes = []
    with torch.no_grad():
        for i in range(6):
            c = torch.randn(4, 2, dtype=torch.float64)
            x = atlas(c).sample()
            torch.manual_seed(i)
            lp = atlas(c).log_prob(x)
            atlas.cache_charts = False
            torch.manual_seed(i)
            fresh = atlas(c).log_prob(x)
            atlas.cache_charts = True
            torch.testing.assert_close(lp, fresh, rtol=0, atol=0)
            sizes.append(sum(len(t.entries) for t in cache_module._STATES[atlas].tables.values()))
    assert sizes[0] > 0 and sizes[-1] == sizes[0]


def test_an_atlas_made_in_inference_mode_evaluates_without_the_cache():
    with torch.inference_mode():
        atlas = learned(8)
        x = atlas().sample((8,))
        lp = atlas().log_prob(x)
        atlas.cache_charts = False
        fresh = atlas().log_prob(x)
    torch.testing.assert_close(lp, fresh, rtol=0, atol=0)


def test_an_input_that_starts_to_need_a_gradient_is_not_served_from_the_cache():
    atlas = A.sphere(9).requires_grad_(False)
    with torch.no_grad():
        x = atlas().sample((8,))
        atlas().log_prob(x)  # fills the cache
    atlas.context.requires_grad_(True)
    atlas().log_prob(x).sum().backward()
    cached_grad = atlas.context.grad.clone()
    atlas.context.grad = None
    atlas.cache_charts = False
    atlas().log_prob(x).sum().backward()
    assert bool(cached_grad.abs().sum() > 0)
    torch.testing.assert_close(cached_grad, atlas.context.grad, rtol=0, atol=0)


def test_gradients_turned_on_inside_a_gradient_free_scope_get_fresh_results():
    # A learnable per-chart table (no inputs) kept in a no_grad scope must not be served to a
    # computation that turns gradients on inside that scope.
    atlas = A.sphere(10)
    table = torch.nn.Parameter(torch.ones(3, 2))
    with torch.no_grad(), chart_cache_scope(atlas):
        kept = cached(atlas, "t", (), lambda: table * 2)
        assert cached(atlas, "t", (), lambda: table * 2) is kept
        with torch.enable_grad():
            fresh = cached(atlas, "t", (), lambda: table * 2)
    assert not kept.requires_grad and fresh.requires_grad
