"""zuko flows as the latent flows of an atlas (ZukoTransform): densities integrate to one, the
log-det agrees with autodiff, Hutchinson's estimate is unbiased and used only for training,
gradients reach zuko's parameters, and bad arguments raise."""

import math

import _atlases as A
import pytest
import torch
from _manifold_checks import randomize

from atlasdist import AtlasFlow

# Importing zuko turns off torch.distributions' default argument validation for the whole
# process (zuko sets Distribution._validate_args = False); the other test modules rely on it.
_validation = torch.distributions.Distribution._validate_args
zuko = pytest.importorskip("zuko")
torch.distributions.Distribution.set_default_validate_args(_validation)

from atlasdist.transforms import ZukoTransform  # noqa: E402

NORTH_SOUTH_2 = torch.tensor([[0.0, 1.0], [0.0, -1.0]])


def cnf_circle(seed: int, **kwargs) -> AtlasFlow:
    """S^1 from two stereographic charts, the latent flow a (1-D) continuous flow."""
    torch.manual_seed(seed)
    cnf = ZukoTransform(zuko.flows.CNF(1, context=2, hidden_features=(16,)), **kwargs)
    atlas = AtlasFlow.spheres(1, torch.zeros(2, 2), torch.ones(2), NORTH_SOUTH_2, flows=[cnf])
    atlas = atlas.double()
    randomize(atlas.flow_modules, seed, 0.5)
    with torch.no_grad():
        atlas.logits.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    return atlas


@pytest.mark.parametrize("seed", [0, 1])
def test_continuous_latent_flow_on_the_circle_integrates_to_one(seed):
    atlas = cnf_circle(seed)
    x, w = A.circle_points(4000)
    p = atlas.flow(validate_args=True)
    with torch.no_grad():
        density = p.log_prob(x).exp()
    # Premise: the random flow moves mass (the density is far from the uniform 1 / 2 pi).
    assert float(density.max() / density.min()) > 1.5
    # The trapezoid rule is spectrally accurate for this smooth density; the adaptive solver
    # (atol 1e-6, rtol 1e-5) bounds the rest.
    assert abs(float((density * w).sum()) - 1) <= 1e-4


def test_continuous_latent_flow_on_the_sphere_integrates_to_one():
    torch.manual_seed(0)
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    cnf = ZukoTransform(zuko.flows.CNF(2, context=2, hidden_features=(16,)))
    atlas = AtlasFlow.spheres(2, torch.zeros(2, 3), torch.ones(2), poles, flows=[cnf]).double()
    randomize(atlas.flow_modules, 3, 0.4)
    x, w = A.sphere_points(60, 120)
    with torch.no_grad():
        density = atlas.flow(validate_args=True).log_prob(x).exp()
    assert float(density.max() / density.min()) > 1.5
    assert abs(float((density * w).sum()) - 1) <= 1e-3


def _nsf_map(seed: int):
    torch.manual_seed(seed)
    flow = ZukoTransform(zuko.flows.NSF(2, context=3, transforms=2, hidden_features=(16,)))
    flow = randomize(flow.double(), seed, 0.5)
    context = torch.randn(5, 3, dtype=torch.float64)
    return flow.condition(context), context


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discrete_zuko_flow_log_det_matches_autodiff(seed):
    t, context = _nsf_map(seed)
    z = torch.randn(5, 2, dtype=torch.float64)
    u, ladj = t.call_and_ladj(z)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda v, i=i: t.zuko.inv(v.expand(5, 2))[i], z[i].clone()
        )
        assert torch.allclose(ladj[i], torch.linalg.slogdet(jac)[1], atol=1e-10, rtol=0)
    # Inverse, and the inverse's log-det (the density direction), to rounding.
    back = t.inv(u)
    assert torch.allclose(back, z, atol=1e-10, rtol=0)
    assert torch.allclose(t.log_abs_det_jacobian(back, u), ladj, atol=1e-10, rtol=0)
    assert t.log_abs_det_jacobian(z, u).shape == (5,)


def test_trace_is_estimated_only_for_training():
    atlas = cnf_circle(0)
    x = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        exact = atlas.flow().log_prob(x)
    atlas.train()
    # Training mode with gradients: Hutchinson's estimate, random.
    draws = [atlas.flow().log_prob(x).detach() for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])
    # Evaluation mode or no gradients: the exact trace, the same value each time.
    for mode in ("eval", "no_grad"):
        if mode == "eval":
            atlas.eval()
            values = [atlas.flow().log_prob(x).detach() for _ in range(2)]
            atlas.train()
        else:
            with torch.no_grad():
                values = [atlas.flow().log_prob(x) for _ in range(2)]
        assert torch.allclose(values[0], exact, atol=1e-12, rtol=0)
        assert torch.equal(values[0], values[1])
    forced = cnf_circle(0, trace="exact")
    assert torch.allclose(forced.flow().log_prob(x).detach(), exact, atol=1e-12, rtol=0)
    hutchinson = cnf_circle(0, trace="hutchinson")
    with torch.no_grad():
        values = [hutchinson.flow().log_prob(x) for _ in range(2)]
    assert not torch.equal(values[0], values[1])


def _cnf_map(trace: str, seed: int = 0):
    torch.manual_seed(seed)
    t = ZukoTransform(zuko.flows.CNF(2, context=2, hidden_features=(16,)), trace=trace)
    return randomize(t.double(), seed, 1.0).condition(torch.eye(2, dtype=torch.float64)[[0]])


def test_hutchinson_log_det_averages_to_the_exact_one():
    """Each row draws its own probe, so one pass over many copies of a point averages many
    independent estimates: their mean is the exact log-det (0.88 here) within 4.5 standard
    errors (0.05 each: one Gaussian probe has a large variance). This checks that the
    estimate comes through with its sign, direction and scale; a bias of a few percent, which
    would be zuko's, is below what 20000 probes resolve."""
    rows = 20000
    z = torch.tensor([[0.3, -0.7]], dtype=torch.float64).expand(rows, 2)
    with torch.no_grad():
        _, exact = _cnf_map("exact").call_and_ladj(z[:1])
        _, draws = _cnf_map("hutchinson").call_and_ladj(z)
    se = float(draws.std() / math.sqrt(rows))
    assert abs(float(exact)) > 10 * se  # premise: a wrong sign or direction fails below
    assert abs(float(draws.mean() - exact)) <= 4.5 * se


def test_trace_mode_reaches_every_continuous_part_of_a_composed_flow():
    from zuko.flows.continuous import FFJTransform

    torch.manual_seed(0)
    parts = [FFJTransform(2, context=2, hidden_features=(8,)) for _ in range(2)]
    lazy = zuko.lazy.LazyComposedTransform(*parts)
    context, z = torch.eye(2)[[0, 1, 0]], torch.randn(3, 2)
    for trace, random in (("hutchinson", True), ("exact", False)):
        t = ZukoTransform(lazy, features=2, trace=trace)
        with torch.no_grad():
            a, b = (t.condition(context).call_and_ladj(z)[1] for _ in range(2))
        assert torch.equal(a, b) is not random
    assert all(part.exact for part in parts)  # the flows' own setting is restored


def test_a_flow_built_for_another_context_width_names_the_right_one():
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    cnf = ZukoTransform(zuko.flows.CNF(2, context=3))
    atlas = AtlasFlow.spheres(2, torch.zeros(2, 3), torch.ones(2), poles, flows=[cnf])
    with pytest.raises(ValueError, match=r"build it with features=2 and context=2"):
        atlas.flow().sample((4,))


def test_gradients_reach_the_zuko_parameters_and_a_step_lowers_the_loss():
    atlas = cnf_circle(1)
    theta = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64)
    x = torch.stack([theta.cos(), theta.sin()], -1)
    with torch.no_grad():
        before = float(-atlas.flow().log_prob(x).mean())
    opt = torch.optim.Adam(atlas.parameters(), lr=1e-2)
    for _ in range(20):
        loss = -atlas.flow().log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in atlas.flow_modules.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert any(float(g.abs().max()) > 0 for g in grads)
        opt.step()
    # The exact loss (0.42 here) falls; the training losses are Hutchinson's estimates.
    with torch.no_grad():
        assert float(-atlas.flow().log_prob(x).mean()) < before - 0.2


def test_samples_lie_on_the_manifold_and_have_finite_density():
    atlas = cnf_circle(2)
    with torch.no_grad():
        x = atlas.flow().sample((50,))
        lp = atlas.flow(validate_args=True).log_prob(x)
    assert torch.allclose(x.norm(dim=-1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert bool(torch.isfinite(lp).all())


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="zuko.flows.Flow or a zuko.lazy.LazyTransform"):
        ZukoTransform(torch.nn.Linear(2, 2), features=2)
    with pytest.raises(ValueError, match="trace must be one of"):
        ZukoTransform(zuko.flows.CNF(2), trace="approximate")
    with pytest.raises(ValueError, match="give features"):
        ZukoTransform(zuko.flows.CNF(2).transform)

    class ConditionalBase(zuko.lazy.LazyDistribution):  # its shape needs a context
        def forward(self, c):
            return torch.distributions.Normal(c, 1.0).to_event(1)

    with pytest.raises(ValueError, match="give features"):
        ZukoTransform(zuko.lazy.Flow(zuko.flows.CNF(2).transform, ConditionalBase()))
    with pytest.raises(ValueError, match="features"):
        ZukoTransform(zuko.flows.CNF(2).transform, features=0)
    t = ZukoTransform(zuko.flows.CNF(2, context=1).transform, features=2)
    with pytest.raises(TypeError, match="context must be a tensor"):
        t.condition(None)
    with pytest.raises(ValueError, match=r"ZukoTransform: expected input of shape \(\*, 2\)"):
        t.condition(torch.zeros(4, 1))(torch.zeros(4, 3))
