"""Properties every closed-form flow on a known manifold has, tested once for all of them by
looping over the registry of tests/_manifold_checks.py (the sphere and the simplex): closed
forms against autodiff, inverses, the facts of atlasdist.manifolds, normalization by
quadrature and goodness of fit of samples against log_prob (DESIGN.md section 4), shapes,
dtypes, gradients, modules and bad input. What only one manifold has is tested in
test_sphere_flows.py and test_simplex_flows.py."""

from __future__ import annotations

import doctest
import math

import pyro
import pytest
import torch
from _manifold_checks import (
    MANIFOLDS,
    SIMPLEX,
    SPHERE,
    batch_shapes,
    features,
    randomize,
    scales,
    seeds,
    single_thread,  # noqa: F401 (autouse fixture)
)
from hypothesis import given
from hypothesis import strategies as st

import atlasdist.distributions.simplex as dist_simplex
import atlasdist.distributions.sphere as dist_sphere
import atlasdist.manifolds.simplex as manifolds_simplex
import atlasdist.manifolds.sphere as manifolds_sphere
import atlasdist.transforms.manifold as manifold
import atlasdist.transforms.simplex as simplex
import atlasdist.transforms.sphere as sphere
from atlasdist._checks import no_validation
from atlasdist._linalg import matrix_exp
from atlasdist.geometry import manifold_log_volume_ratio
from atlasdist.transforms.manifold import ManifoldTransform, qr_parametrized

manifolds = pytest.mark.parametrize("m", MANIFOLDS, ids=str)
FLOWS = [(m, name) for m in MANIFOLDS for name in m.names]
flows = pytest.mark.parametrize("m, name", FLOWS, ids=[f"{m}-{name}" for m, name in FLOWS])


# --- the facts of atlasdist.manifolds -----------------------------------------------------


@manifolds
@pytest.mark.parametrize("n", [2, 3])
def test_uniform_density_from_the_log_volume_integrates_to_one(m, n):
    # log_volume is w.r.t. the measure of the library's densities, which the quadrature uses.
    def uniform(x):
        return torch.full(x.shape[:-1], -m.log_volume(n), dtype=x.dtype)

    assert abs(m.integral(uniform, n) - 1) <= 1e-9


@manifolds
@given(n=features, seed=seeds)
def test_projection_is_onto_the_manifold_and_idempotent(m, n, seed):
    x = m.points(n, (16,), seed)
    z = 3 * x  # off the manifold along the ray (sphere) or the scaling (simplex)
    torch.testing.assert_close(m.projection(z), x, atol=1e-15, rtol=0)
    torch.testing.assert_close(m.projection(m.projection(z)), m.projection(z), atol=1e-15, rtol=0)
    assert bool(m.constraint.check(x).all()) and not bool(m.constraint.check(z).any())


@given(n=features, seed=seeds, scale=scales)
def test_qr_parametrization_reaches_its_matrix(n, seed, scale):
    w = scale * torch.randn(
        n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    q, r, logdet = qr_parametrized(w)
    m = q @ r
    sign, logabs = torch.linalg.slogdet(m)
    assert sign == 1 and abs(float(logabs - logdet)) <= 1e-10
    torch.testing.assert_close(manifold.qr_inverse(q, r) @ m, torch.eye(n, dtype=m.dtype))


# --- closed forms, inverses, batched parameters -------------------------------------------


@manifolds
@given(data=st.data(), n=features, seed=seeds)
def test_closed_form_volume_ratio_matches_autodiff(m, data, n, seed):
    name, scale = data.draw(st.sampled_from(m.names)), data.draw(m.autodiff_scales)
    f = m.build(name, n, seed, scale)
    x = m.points(n, (16,), seed)
    y, ladj = f.call_and_ladj(x)
    reference = manifold_log_volume_ratio(f, x, m.projection, n - 1)
    assert ladj.shape == reference.shape == (16,)
    assert (ladj - reference).abs().max() <= 1e-8
    torch.testing.assert_close(f.log_abs_det_jacobian(x, y), ladj, atol=1e-12, rtol=0)


@manifolds
@given(data=st.data(), n=features, seed=seeds, scale=scales)
def test_inverse_round_trip_and_outputs_on_the_manifold(m, data, n, seed, scale):
    f = m.build(data.draw(st.sampled_from(m.names)), n, seed, scale)
    x = m.points(n, (32,), seed)
    y = f(x)
    m.assert_on_manifold(y, 1e-14)
    tol = m.round_trip_tolerance(f)
    torch.testing.assert_close(f.inv(y), x, **tol)
    torch.testing.assert_close(f(f.inv(x)), x, **tol)
    m.assert_on_manifold(f.inv(x), 1e-14)


@flows
@given(seed=seeds, scale=scales)
def test_batched_parameters_give_one_flow_per_row(m, name, seed, scale):
    # from_parameters with raw parameters of shape (B, ...) is the flow of each row: what a
    # conditional builder produces from c of shape (B, k).
    n, rows = 3, 4
    fs = [m.build(name, n, seed + b, scale) for b in range(rows)]
    params = {
        key: torch.stack([dict(f.named_parameters())[key].detach() for f in fs])
        for key in m.flows[name].parameter_shapes(n)
    }
    batched = m.flows[name].from_parameters(n, params)
    x = m.points(n, (5, rows), seed)
    y, ladj = batched.call_and_ladj(x)
    # Not to the last bit (sums and the exponential's scaling differ between a batch and one
    # row: 7e-14 at most over 150 draws of each flow). Alone, a small matrix took torch's
    # faulty degree-8 exponential, off by up to 1e-9 here, until atlasdist._linalg.matrix_exp.
    close = {"atol": 1e-12, "rtol": 0}
    for b, f in enumerate(fs):
        torch.testing.assert_close(y[:, b], f(x[:, b]), **close)
        torch.testing.assert_close(ladj[:, b], f.log_abs_det_jacobian(x[:, b], None), **close)
        torch.testing.assert_close(batched.inv(y)[:, b], f.inv(y[:, b]), **close)
    zero = {key: torch.zeros_like(value) for key, value in params.items()}
    identity = m.flows[name].from_parameters(n, zero)
    torch.testing.assert_close(identity(x), x, atol=1e-15, rtol=0)


# --- normalization and goodness of fit ----------------------------------------------------

# (manifold, n's, largest raw scale): densities whose peaks the grids resolve (quadrature error
# below 1e-10 over 1000 random draws each: run test_sphere_flows.py, test_simplex_flows.py as
# scripts).
NORMALIZATION_CASES = [(SPHERE, [2], 1.0), (SPHERE, [3], 0.4), (SIMPLEX, [2, 3], 0.7)]


@pytest.mark.parametrize(
    "m, ns, max_scale", NORMALIZATION_CASES, ids=["circle", "2-sphere", "simplex"]
)
@given(data=st.data(), seed=seeds)
def test_density_integrates_to_one(m, ns, max_scale, data, seed):
    n, scale = data.draw(st.sampled_from(ns)), data.draw(st.floats(0.05, max_scale))
    for options, total in m.normalizations(n):
        d = m.make_distribution(n, seed, scale, **options)
        assert abs(m.integral(d.log_prob, n) - total) <= 1e-3 * total


@pytest.mark.parametrize(
    "m, n, scale, options",
    [
        (SPHERE, 2, 0.4, {"base": "uniform"}),
        (SPHERE, 3, 0.4, {"base": "uniform"}),
        (SIMPLEX, 3, 0.5, {"validate_args": False}),
    ],
    ids=["circle", "2-sphere", "simplex"],
)
def test_quadrature_detects_a_wrong_volume_ratio(m, n, scale, options):
    d = m.make_distribution(n, 5, scale, **options)
    last = d.transforms[-1]

    def wrong(y):  # the last flow's ratio applied in the wrong direction
        return d.log_prob(y) + 2 * last.log_abs_det_jacobian(last.inv(y), y)

    assert abs(m.integral(d.log_prob, n) - 1) <= 1e-3
    assert abs(m.integral(wrong, n) - 1) > 1e-2


GOF_CASES = [(m, *case) for m in MANIFOLDS for case in m.gof_cases]


@pytest.mark.parametrize(
    "m, n, seed, scale, options",
    GOF_CASES,
    ids=["-".join(map(str, [*case[:4], *case[4].values()])) for case in GOF_CASES],
)
def test_samples_match_log_prob(m, n, seed, scale, options):
    torch.manual_seed(seed)
    d = m.make_distribution(n, seed, scale, **options)
    last = d.transforms[-1]
    candidates = {
        "log_prob": d.log_prob,
        # Controls that must be rejected: the test has power against plausible bugs.
        "ratio sign flipped": lambda y: (
            d.log_prob(y) + 2 * last.log_abs_det_jacobian(last.inv(y), y)
        ),
        **m.gof_controls(d, n, seed, scale),
    }
    with torch.no_grad():
        y = d.sample((4000 if n < 4 else 6000,))
    p_values = {}
    for label, log_prob in candidates.items():
        with torch.no_grad():
            lp = log_prob(y)
        p_values[label] = min(m.gof_tests(y, lp, log_prob, n, seed))
    assert p_values.pop("log_prob") > 1e-3
    assert max(p_values.values()) < 1e-3, p_values


# --- distributions: shapes, dtypes, gradients, modules ------------------------------------


@manifolds
@given(n=st.integers(2, 4), seed=seeds, batch_shape=batch_shapes)
def test_distribution_shapes_and_expand(m, n, seed, batch_shape):
    gen = torch.Generator().manual_seed(seed)
    d = m.distribution(m.batched_base(n, batch_shape, gen), m.chain(n, seed, 0.5))
    assert d.batch_shape == batch_shape and d.event_shape == (n,) and d.has_rsample
    y = d.rsample((5,))
    assert y.shape == (5,) + batch_shape + (n,)
    assert d.log_prob(y).shape == (5,) + batch_shape
    e = d.expand((2,) + batch_shape)
    assert e.batch_shape == (2,) + batch_shape
    assert getattr(e, "measure", None) == getattr(d, "measure", None)
    assert e.sample().shape == (2,) + batch_shape + (n,)
    torch.testing.assert_close(e.log_prob(y[:1]), d.log_prob(y[:1]).expand((2,) + batch_shape))
    f = d.transforms[0]
    assert tuple(f.forward_shape(y.shape)) == y.shape == tuple(f.inverse_shape(y.shape))


@manifolds
@given(data=st.data(), n=features, seed=seeds, scale=scales)
def test_float32_preserved_and_close_to_float64(m, data, n, seed, scale):
    name = data.draw(st.sampled_from(m.names))
    f64, f32 = m.build(name, n, seed, scale), m.build(name, n, seed, scale, torch.float32)
    x = m.points(n, (8,), seed)
    y64, l64 = f64.call_and_ladj(x)
    y32, l32 = f32.call_and_ladj(x.float())
    assert y32.dtype == l32.dtype == f32.inv(y32).dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=m.float32_atol, rtol=1e-4)
    torch.testing.assert_close(l32.double(), l64, atol=1e-4, rtol=1e-4)
    flow = m.module(n, [f32])
    assert flow().sample((3,)).dtype == flow().log_prob(x.float()).dtype == torch.float32


@manifolds
@given(n=features, seed=seeds, scale=scales)
def test_gradients_are_finite(m, n, seed, scale):
    torch.manual_seed(seed)  # sampling and module initialization draw from it
    flow = randomize(m.module(n, m.chain(n, seed, scale)).double(), seed, scale)
    y = flow().rsample((16,))
    # The first coordinate is not constant on either manifold: gradients pass through rsample.
    loss = -flow().log_prob(y.detach()).mean() + y[..., 0].sum()
    loss.backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


MODULE_CASES = [
    (
        SPHERE,
        ["NormalizedAffine", "NormalizedTranslation"],
        {
            "concentration",
            "transform_modules.0.weight",
            "transform_modules.0.raw",
            "transform_modules.1.raw",
        },
    ),
    (
        SIMPLEX,
        ["Calibration", "GeneralizedCalibration"],
        {
            "log_concentration",
            "transform_modules.0.log_temperature",
            "transform_modules.0.shift",
            "transform_modules.1.weight",
            "transform_modules.1.shift",
        },
    ),
]


@pytest.mark.parametrize("m, names, parameters", MODULE_CASES, ids=["sphere", "simplex"])
def test_module_state_dict_dtype_and_optimizer(m, names, parameters):
    torch.manual_seed(0)

    def module():
        return m.module(3, [m.flows[name](3) for name in names])

    flow = randomize(module().double(), 0, 0.5)
    assert {k for k, _ in flow.named_parameters()} == parameters
    data = flow().sample((256,))
    clone = module().double()
    clone.load_state_dict(flow.state_dict())
    torch.testing.assert_close(clone().log_prob(data), flow().log_prob(data))
    opt = torch.optim.Adam(clone.parameters(), lr=1e-2)
    before = float(-clone().log_prob(data).mean())
    for _ in range(5):
        opt.zero_grad()
        (-clone().log_prob(data).mean()).backward()
        opt.step()
    assert float(-clone().log_prob(data).mean()) < before
    pyro.clear_param_store()
    pyro.module(f"{m}_flow", flow)
    assert len(pyro.get_param_store()) == len(parameters)


@pytest.mark.parametrize(
    "m, name, options",
    [
        (SPHERE, "NormalizedLinear", {"base": "uniform"}),
        (SIMPLEX, "GeneralizedCalibration", {"concentration": 2.0}),
    ],
    ids=["sphere", "simplex"],
)
def test_pyro_model_with_observations(m, name, options):
    flow = m.module(3, [m.flows[name](3)], **options)
    data = flow().sample((10,))

    def model():
        pyro.module("flow", flow)
        with pyro.plate("data", 10):
            pyro.sample("obs", flow(), obs=data)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["obs"]["log_prob"], flow().log_prob(data))


# --- the generic route --------------------------------------------------------------------


# Up to the manifold's autodiff scale: on the simplex the inverse flows then keep the entries of
# the intermediate points above ~1e-12; closer to the boundary the autodiff ratio loses
# accuracy (0.07 at an entry 5e-27, where the closed form still agrees with 50-digit arithmetic
# to 1e-14).
@manifolds
@given(data=st.data(), n=st.integers(2, 4), seed=seeds)
def test_manifold_transform_matches_closed_forms(m, data, n, seed):
    closed = m.chain(n, seed, data.draw(m.autodiff_scales))
    generic = [
        ManifoldTransform(f, m.projection, n - 1, n, inverse=f.inv, codomain=f.codomain)
        for f in closed
    ]
    base = m.base(n)
    d_closed = m.distribution(base, closed)
    d_generic = m.distribution(base, generic)
    y = m.points(n, (8,), seed)
    lp_closed, lp_generic = d_closed.log_prob(y), d_generic.log_prob(y)
    assert (lp_closed - lp_generic).abs().max() <= 1e-8
    # Parameter gradients flow through the autodiff log-det and agree with the closed form.
    params = [p for f in closed for p in f.parameters()]
    g_closed = torch.autograd.grad(lp_closed.sum(), params)
    g_generic = torch.autograd.grad(lp_generic.sum(), params)
    for a, b in zip(g_closed, g_generic, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)


# --- bad input ----------------------------------------------------------------------------


@flows
def test_bad_input_raises(m, name):
    f = m.build(name, 3, 0, 0.5)
    for method, x, message in m.bad_inputs():
        with pytest.raises(ValueError, match=message):
            (f if method == "f" else f.inv)(x)
    with pytest.raises(ValueError, match="features must be >= 2"):
        m.flows[name](1)
    # Without validation, inputs off the manifold are projected onto it first.
    off = m.off_points
    with no_validation():
        torch.testing.assert_close(f(3 * off), f(m.projection(off)))
        torch.testing.assert_close(f.inv(3 * off), f.inv(m.projection(off)))


@manifolds
def test_distribution_bad_values_raise(m):
    d = m.distribution(m.base(3), m.chain(3, 0, 0.5))
    for value, message in m.bad_values():
        with pytest.raises(ValueError, match=message):
            d.log_prob(value)
    for name in m.names:
        with pytest.raises(ValueError, match=r"maps 2 to 2 features, the base has 3"):
            m.distribution(m.base(3), [m.flows[name](2)])


@pytest.mark.parametrize(
    "module",
    [manifolds_sphere, manifolds_simplex, sphere, simplex, manifold, dist_sphere, dist_simplex],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@manifolds
@pytest.mark.cuda
def test_cuda_matches_cpu(m):
    flow = randomize(m.module(3, m.chain(3, 0, 0.5)).double(), 0, 0.5)
    y = m.points(3, (16,), 0)
    expected = flow().log_prob(y)
    flow.cuda()
    d = flow()
    assert d.sample((4,)).device.type == "cuda"
    torch.testing.assert_close(d.log_prob(y.cuda()).cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matrix_exp_of_one_rotation_is_accurate(dtype):
    """A single small skew-symmetric matrix (torch 2.13's degree-8 path, pytorch#196592: up to
    2.4e-10 off in float64 and 5e-5 in float32 on random skew-symmetric matrices, measured
    against scipy) against the closed-form rotation; batches too, and the gradient."""
    eps = torch.finfo(dtype).eps
    for theta in (1e-4, 0.01, 0.04, 0.05, 0.3, 0.5, 1.0, 2.0):
        a = torch.tensor([[0.0, -theta], [theta, 0.0]], dtype=dtype, requires_grad=True)
        rotation = torch.tensor(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
            dtype=torch.float64,
        )
        for x in (a, a.unsqueeze(0), a.expand(3, 2, 2)):
            q = matrix_exp(x)
            assert q.shape == x.shape and q.dtype == dtype
            assert float((q.double() - rotation).abs().max()) <= 8 * eps
        # d/dtheta of the (1, 0) entry sin(theta) is cos(theta)
        (grad,) = torch.autograd.grad(matrix_exp(a)[1, 0], a)
        assert abs(float(grad[1, 0] - grad[0, 1]) - math.cos(theta)) <= 16 * eps
