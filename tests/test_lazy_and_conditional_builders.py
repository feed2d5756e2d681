"""The lazy-module contract of every builder (atlasdist.lazy.LazyDistribution): ``module(c)``
returns the distribution, ``module.flow(c)`` is the same, ``.to`` moves the base with the
parameters, a builder made without a context refuses one. And conditioning: SphereFlow and
SimplexFlow with ``context_features`` model p(x | c), one exact, normalized density per row of
c (checked by the quadrature rules of tests/_manifold_checks.py); the atlas with
``context_features`` likewise, its mixture weights and latent flows depending on c."""

from __future__ import annotations

import pyro
import pytest
import torch
from _atlases import circle_points, randomize_flows
from _manifold_checks import (
    MANIFOLDS,
    SIMPLEX,
    SPHERE,
    randomize,
    single_thread,  # noqa: F401 (autouse fixture)
)
from torch import nn

from atlasdist import AtlasFlow
from atlasdist.distributions import (
    FreeFormInjectiveFlow,
    ManifoldPrior,
    ManifoldPriorFlow,
    SimplexFlow,
    SphereFlow,
)
from atlasdist.lazy import LazyDistribution
from atlasdist.transforms import Conditional
from atlasdist.transforms.simplex import Calibration, GeneralizedCalibration
from atlasdist.transforms.sphere import NormalizedAffine, NormalizedTranslation

manifolds = pytest.mark.parametrize("m", MANIFOLDS, ids=str)


def free_form_flow():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    decoder = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2))
    return FreeFormInjectiveFlow(encoder, decoder, noise_scale=0.1)


# One line per builder: (name, constructor, event size).
BUILDERS = {
    "SphereFlow": (lambda: SphereFlow(3, [NormalizedAffine(3)], "projected_normal"), 3),
    "SphereFlow(uniform)": (lambda: SphereFlow(3, [NormalizedTranslation(3)]), 3),
    "SimplexFlow": (lambda: SimplexFlow(3, [GeneralizedCalibration(3)]), 3),
    "FreeFormInjectiveFlow": (free_form_flow, 2),
    "ManifoldPriorFlow": (lambda: ManifoldPriorFlow(2, noise=0.1), 2),
    "ManifoldPrior": (lambda: ManifoldPrior(3, rotation=True, noise=0.1), 3),
}
builders = pytest.mark.parametrize("name", sorted(BUILDERS))


def build(name):
    make, n = BUILDERS[name]
    return randomize(make(), 0, 0.3), n


# --- the contract -------------------------------------------------------------------------


@builders
def test_module_returns_its_distribution_and_flow_is_an_alias(name):
    module, n = build(name)
    assert isinstance(module, LazyDistribution)
    d = module()
    assert isinstance(d, torch.distributions.Distribution) and d.event_shape == (n,)
    x = d.sample((7,))
    torch.testing.assert_close(module.flow().log_prob(x), d.log_prob(x))
    torch.testing.assert_close(module.flow(None).log_prob(x), module(None).log_prob(x))


@builders
def test_to_float64_moves_the_base_with_the_parameters(name):
    module, n = build(name)
    module = module.to(torch.float64)
    d = module()
    x = d.sample((5,))
    assert x.dtype == torch.float64 and d.log_prob(x).dtype == torch.float64
    assert module.flow().sample().dtype == torch.float64


@builders
def test_a_context_is_refused_without_context_features(name):
    module, _ = build(name)
    with pytest.raises(ValueError, match=rf"{type(module).__name__}: got a conditioning input c"):
        module(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="context_features"):
        module.flow(torch.zeros(2))


def test_options_are_keywords_of_forward():
    flow = free_form_flow()
    assert flow(noise_scale=0.2).noise_scale == flow.flow(noise_scale=0.2).noise_scale == 0.2
    sphere = SphereFlow(3, [NormalizedTranslation(3)])
    assert sphere(validate_args=False)._validate_args is False
    assert SimplexFlow(3, [])(validate_args=True)._validate_args is True


# --- conditioning: p(x | c) on the sphere and the simplex ----------------------------------


def conditional(m, context_features=2, seed=0, scale=0.15):
    """A conditional builder with all flows of the manifold and a random hypernetwork."""
    torch.manual_seed(seed)
    transforms = [m.flows[name](3) for name in m.names]
    module = m.module(3, transforms, context_features=context_features, hidden=(8,))
    return randomize(module.double(), seed, scale)


CONTEXTS = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-1.0, 2.0]], dtype=torch.float64)


@manifolds
def test_conditional_shapes_and_rows(m):
    module = conditional(m)
    d = module(CONTEXTS)
    assert tuple(d.batch_shape) == (3,) and d.event_shape == (3,)
    x = d.sample((5,))
    assert x.shape == (5, 3, 3) and bool(m.constraint.check(x).all())
    assert d.rsample((2,)).shape == (2, 3, 3)
    assert d.log_prob(x).shape == (5, 3) and d.log_prob(x[0]).shape == (3,)
    # Row b of the batch is the density given c_b alone, at x of shape (S, B, n) and (B, n).
    for b, c in enumerate(CONTEXTS):
        torch.testing.assert_close(d.log_prob(x)[:, b], module(c).log_prob(x[:, b]))
        torch.testing.assert_close(d.log_prob(x[0])[b], module(c).log_prob(x[0, b]))
    torch.testing.assert_close(module.flow(CONTEXTS).log_prob(x), d.log_prob(x))
    # A batch of contexts of any shape (*B, k) gives batch shape (*B).
    assert tuple(module(CONTEXTS.expand(2, 3, 2)).batch_shape) == (2, 3)


@manifolds
def test_conditional_densities_differ_and_each_integrates_to_one(m):
    module = conditional(m)
    point = m.points(3, (), 0)
    values = [float(module(c).log_prob(point).detach()) for c in CONTEXTS]
    assert max(values) - min(values) > 0.1
    for c in CONTEXTS:
        assert abs(m.integral(module(c).log_prob, 3) - 1) <= 1e-3


@manifolds
def test_gradients_reach_the_hypernetwork(m):
    module = conditional(m)
    x = module(CONTEXTS).sample((16,))
    loss = -module(CONTEXTS).log_prob(x).mean()
    loss.backward()
    hypernet = [p for name, p in module.named_parameters() if ".source." in name]
    assert hypernet and all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in hypernet
    )
    assert any(float(p.grad.abs().max()) > 0 for p in hypernet)


def test_a_conditional_flow_starts_at_the_given_flows():
    # The hypernetwork's output layer starts at weight 0 and bias = the flows' raw parameters.
    x = SIMPLEX.points(3, (6,), 0).float()
    flows = [Calibration(3, temperature=2.0), GeneralizedCalibration(3)]
    randomize(flows[1], 1, 0.3)
    plain = SimplexFlow(3, flows)
    cond = SimplexFlow(3, flows, context_features=4)
    c = torch.randn(6, 4)
    torch.testing.assert_close(cond(c).log_prob(x), plain().log_prob(x))
    sphere = [NormalizedAffine(3), NormalizedTranslation(3, shift=torch.tensor([0.0, 0.0, 0.5]))]
    y = SPHERE.points(3, (6,), 0).float()
    torch.testing.assert_close(
        SphereFlow(3, sphere, context_features=1)(c[:, :1]).log_prob(y),
        SphereFlow(3, sphere)().log_prob(y),
    )


def test_conditional_transforms_given_by_the_user():
    part = Conditional(NormalizedAffine, 3, context_features=2, hidden=(4,))
    module = SphereFlow(3, [part, NormalizedTranslation(3)], context_features=2)
    assert module.transforms[0] is part
    assert tuple(module(torch.zeros(5, 2)).batch_shape) == (5,)
    with pytest.raises(ValueError, match="transform 0 .* is conditional; build the flow with"):
        SphereFlow(3, [part])
    with pytest.raises(ValueError, match="takes a context of size 2, the flow has context_feat"):
        SphereFlow(3, [NormalizedTranslation(3), part], context_features=3)


@manifolds
def test_conditional_builder_needs_a_context_of_its_size(m):
    module = conditional(m)
    with pytest.raises(ValueError, match=r"context_features=2, so it models p\(x \| c\)"):
        module()
    with pytest.raises(ValueError, match=r"expected c of shape \(\*, 2\), got \(4, 3\)"):
        module(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="context_features must be an int >= 0"):
        m.module(3, [], context_features=-1)


@manifolds
def test_conditional_flow_in_a_pyro_model(m):
    module = conditional(m)
    x = module(CONTEXTS).sample()

    def model():
        pyro.module("conditional", module)
        with pyro.plate("data", 3):
            pyro.sample("obs", module(CONTEXTS), obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["obs"]["log_prob"], module(CONTEXTS).log_prob(x))
    assert module.to(torch.float32)(CONTEXTS.float()).sample().dtype == torch.float32


# --- conditioning: p(x | c) for the atlas -----------------------------------------------------


def conditional_circle(seed=0, context_features=2):
    """S^1 with two stereographic charts, its mixture weights and latent flows conditioned on c
    (random networks, so that the densities differ with c)."""
    torch.manual_seed(seed)
    poles = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    atlas = AtlasFlow.spheres(
        1,
        torch.zeros(2, 2),
        torch.ones(2),
        poles,
        hidden=(8,),
        layers=2,
        context_features=context_features,
    )
    randomize_flows(atlas.double(), seed, 0.3)
    randomize(atlas.weights_net, seed, 0.5)
    return atlas


def test_conditional_atlas_shapes_and_rows():
    atlas = conditional_circle()
    d = atlas(CONTEXTS)
    assert tuple(d.batch_shape) == (3,) and d.event_shape == (2,)
    x, charts = d.rsample_with_charts((5,))
    assert x.shape == (5, 3, 2) and charts.shape == (5, 3)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(5, 3, dtype=torch.float64))
    assert d.log_prob(x).shape == (5, 3) and d.log_prob(x[0]).shape == (3,)
    for b, c in enumerate(CONTEXTS):
        torch.testing.assert_close(d.log_prob(x)[:, b], atlas(c).log_prob(x[:, b]))
        torch.testing.assert_close(d.mixture_log_weights[b], atlas(c).mixture_log_weights)
    torch.testing.assert_close(atlas.flow(CONTEXTS).log_prob(x), d.log_prob(x))
    assert tuple(atlas(CONTEXTS.expand(2, 3, 2)).batch_shape) == (2, 3)
    assert tuple(d.expand((4, 3)).log_prob(x[:4]).shape) == (4, 3)
    # A draw's chart decodes its latent point given its own c.
    z, k = d.encode(x[0], stochastic=True)
    torch.testing.assert_close(d.decode(z, k), x[0])


def test_conditional_atlas_densities_differ_and_each_integrates_to_one():
    atlas = conditional_circle()
    points, weights = circle_points(32768)
    values = []
    for c in CONTEXTS:
        with torch.no_grad():
            density = atlas(c, validate_args=True).log_prob(points).exp()
        values.append(density)
        assert abs(float((density * weights).sum()) - 1) <= 1e-6
    assert float((values[0] - values[1]).abs().max()) > 0.05
    # Weights that depend on c: the chart probabilities of two contexts differ.
    log_w = atlas(CONTEXTS).mixture_log_weights
    assert float((log_w[0] - log_w[2]).abs().max()) > 0.05


def test_conditional_atlas_gradients_reach_the_conditioning_networks():
    atlas = conditional_circle()
    d = atlas(CONTEXTS)
    x = d.sample((8,))
    (-atlas(CONTEXTS).log_prob(x).mean() - d.rsample((4,)).sum()).backward()
    for name in ["weights_net", "flow_modules"]:
        grads = [p.grad for p in getattr(atlas, name).parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name
        assert any(float(g.abs().max()) > 0 for g in grads), name


def test_conditional_atlas_needs_a_context_of_its_size_and_dtype():
    atlas = conditional_circle()
    with pytest.raises(ValueError, match=r"context_features=2, so it models p\(x \| c\)"):
        atlas()
    with pytest.raises(ValueError, match=r"expected c of shape \(\*, 2\), got \(4, 3\)"):
        atlas(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="c has dtype torch.float32 .* convert c with"):
        atlas(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="context_features must be an int >= 0"):
        AtlasFlow(3, 2, 2, context_features=-1)


def test_a_wide_conditioning_input_is_projected_to_the_code_width():
    atlas = AtlasFlow(3, 2, 2, context_features=40, code_features=8, hidden=(8,))
    assert atlas.input_code.out_features == 8
    x = atlas(torch.randn(5, 40)).sample((3,))
    assert x.shape == (3, 5, 3)


def test_conditional_atlas_in_a_pyro_model():
    atlas = conditional_circle()
    x = atlas(CONTEXTS).sample()

    def model():
        pyro.module("conditional_atlas", atlas)
        with pyro.plate("data", 3):
            pyro.sample("obs", atlas(CONTEXTS), obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["obs"]["log_prob"], atlas(CONTEXTS).log_prob(x))
