"""Learned manifold priors: the base distribution, the flow built on it, the threshold rule
and the intrinsic-dimension estimate."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal

from atlasdist import datasets
from atlasdist.distributions.manifold_prior import (
    ManifoldPrior,
    ManifoldPriorFlow,
    largest_gap_dimension,
    spread_negative_log_likelihood,
)
from atlasdist.intrinsic_dimension import IntrinsicDimension, estimate_intrinsic_dimension

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _randomise(module, seed, size=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


# The base distribution -----------------------------------------------------------------------


@given(
    D=st.integers(1, 5),
    batch=st.sampled_from([(), (3,), (2, 2)]),
    rotation=st.booleans(),
    noise=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_prior_log_prob_is_the_gaussian_of_its_covariance(D, batch, rotation, noise, seed):
    prior = _randomise(ManifoldPrior(D, batch_shape=batch, rotation=rotation, noise=noise), seed)
    prior = prior.double()
    q = prior()
    x = torch.randn((7,) + batch + (D,), generator=torch.Generator().manual_seed(seed)).double()
    reference = MultivariateNormal(torch.zeros(D, dtype=torch.float64), prior.covariance())
    assert q.batch_shape == batch and q.event_shape == (D,)
    lp = q.log_prob(x)
    assert lp.shape == (7,) + batch and lp.dtype == torch.float64
    torch.testing.assert_close(lp, reference.log_prob(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rotation", [False, True])
def test_prior_samples_have_its_covariance(rotation):
    torch.manual_seed(0)
    prior = _randomise(ManifoldPrior(3, batch_shape=(2,), rotation=rotation, noise=0.1), 1)
    prior = prior.double()
    x = prior().sample((40000,))
    assert x.shape == (40000, 2, 3) and x.dtype == torch.float64
    empirical = torch.einsum("nbi,nbj->bij", x, x) / len(x)
    cov = prior.covariance()
    # the standard error of a covariance entry is at most sqrt(2 / n) * max variance (~0.7%)
    scale = cov.diagonal(dim1=-2, dim2=-1).amax()
    torch.testing.assert_close(empirical, cov, rtol=0, atol=float(0.03 * scale))


def test_prior_gradients_reach_scales_and_rotation():
    torch.manual_seed(0)  # sampling and module initialization draw from it
    prior = _randomise(ManifoldPrior(3, rotation=True, noise=0.1), 2).double()
    x = torch.randn(50, 3, dtype=torch.float64) * torch.tensor([2.0, 0.3, 0.01]).double()
    (-prior().log_prob(x).mean()).backward()
    for p in (prior.log_scale, prior.skew):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(p.grad.abs().max()) > 0
    args = (prior.log_scale.detach().clone(), prior.skew.detach().clone())
    assert torch.autograd.gradcheck(
        lambda a, b: _nll_of(x, a, b, 0.1), tuple(a.requires_grad_() for a in args)
    )


def _nll_of(x, log_scale, skew, noise):
    prior = ManifoldPrior(3, rotation=True, noise=noise).double()
    del prior.log_scale, prior.skew
    prior.log_scale, prior.skew = log_scale, skew
    return -prior().log_prob(x).mean()


# The threshold rule --------------------------------------------------------------------------


@given(
    D=st.integers(2, 12),
    data=st.data(),
    spread=st.floats(1.0, 2.0),
    min_ratio=st.floats(1.5, 4.0),
    margin=st.floats(1.05, 100.0),
    unit=st.floats(-6, 6),
)
def test_gap_rule_finds_d_in_two_group_spectra(D, data, spread, min_ratio, margin, unit):
    """d scales in [a, a*spread), D-d in [b/spread, b]: the gap a/b beats every ratio inside
    a group and min_ratio, so the rule returns d, in any order and at any unit."""
    d = data.draw(st.integers(1, D - 1))
    big = torch.tensor(data.draw(st.lists(st.floats(1.0, spread), min_size=d, max_size=d)))
    small = torch.tensor(
        data.draw(st.lists(st.floats(1 / spread, 1.0), min_size=D - d, max_size=D - d))
    )
    gap = max(min_ratio, spread) * margin  # a / b
    scales = torch.cat([big * gap, small]).double() * 10.0**unit
    order = torch.randperm(D, generator=torch.Generator().manual_seed(D + d))
    assert int(largest_gap_dimension(scales[order], min_ratio)) == d


@given(
    scales=st.lists(st.floats(1.0, 2.0), min_size=1, max_size=10),
    min_ratio=st.floats(2.1, 5.0),
)
def test_gap_rule_without_collapse_is_full_dimensional(scales, min_ratio):
    scales = torch.tensor(scales)
    assert int(largest_gap_dimension(scales, min_ratio)) == len(scales)


@given(
    scales=st.lists(st.floats(1e-6, 1e3), min_size=2, max_size=10),
    factor=st.floats(1e-3, 1e3),
    seed=st.integers(0, 100),
)
def test_gap_rule_is_scale_and_order_free(scales, factor, seed):
    scales = torch.tensor(scales, dtype=torch.float64)
    perm = torch.randperm(len(scales), generator=torch.Generator().manual_seed(seed))
    d = largest_gap_dimension(scales)
    assert 1 <= int(d) <= len(scales)
    assert largest_gap_dimension(scales[perm] * factor) == d


def test_gap_rule_batches_ties_and_zeros():
    spectra = torch.tensor([[1.0, 0.01, 0.01], [1.0, 1.0, 0.0], [1.0, 0.1, 0.01], [1.0, 0.9, 0.8]])
    # ties between equal gaps go to the smaller k; a zero scale is a collapse
    assert largest_gap_dimension(spectra).tolist() == [1, 2, 1, 3]
    assert largest_gap_dimension(torch.tensor([0.3])).tolist() == 1


# The flow ------------------------------------------------------------------------------------


@pytest.mark.parametrize("charts", [1, 3])
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_flow_density_and_samples_agree_with_chart_log_prob(charts, coupling):
    torch.manual_seed(0)
    x = torch.randn(300, 3).double() * torch.tensor([1.0, 0.5, 0.1]).double()
    model = ManifoldPriorFlow.from_data(x, charts, seed=0, coupling=coupling, hidden=(16,))
    _randomise(model, 3, size=0.1)
    p = model.flow()
    batch = (charts,) if charts > 1 else ()
    assert p.batch_shape == batch and p.event_shape == (3,)
    samples = p.sample((5,))
    assert samples.shape == (5,) + batch + (3,) and samples.dtype == torch.float64
    chart = torch.randint(charts, (40,))
    points = x[:40]
    lp = p.log_prob(points.unsqueeze(-2) if charts > 1 else points)
    if charts > 1:
        lp = lp[torch.arange(40), chart]
    torch.testing.assert_close(lp, model.chart_log_prob(points, chart), rtol=1e-9, atol=1e-7)
    # sampling runs the chart maps backwards: the latent of a sample is its prior draw
    z = model.prior().sample((6,))
    xs = z
    for part in p.transforms:
        xs = part(xs)
    chart = torch.arange(charts).repeat(6) if charts > 1 else torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(model.latent(xs.reshape(-1, 3), chart), z.reshape(-1, 3))


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_flow_density_integrates_to_one(coupling):
    """Quadrature of p(x) on a grid (D = 2, one chart, random couplings).

    Seeded: the couplings start from torch's random initialization (perturbed by
    ``_randomise``), and some draws give heavy tails (0.2 % of the mass beyond |x| = 16) or
    sharp ridges (a grid step of 0.02 then over-counts by 1e-3); on the draws checked the
    grid mass equalled the sampled fraction inside the box. The premise is checked: no sample
    of 10^5 beyond the box."""
    torch.manual_seed(0)
    model = ManifoldPriorFlow(
        2, noise=0.2, coupling=coupling, hidden=(16,), init_scales=torch.tensor([[1.0, 0.3]])
    ).double()
    _randomise(model.couplings, 4, size=0.3)
    p = model.flow()
    h, box = 0.01, 16.0
    grid = torch.arange(-box, box + h / 2, h, dtype=torch.float64)
    with torch.no_grad():
        assert not bool((p.sample((100_000,)).abs() > box).any())
        mass = sum(
            float(p.log_prob(torch.cartesian_prod(rows, grid)).exp().sum())
            for rows in grid.split(800)
        )
    assert abs(mass * h * h - 1) < 1e-3


def test_additive_flow_is_volume_preserving():
    """log|det J_f| = -D log(rho) everywhere: the flow cannot rescale the prior's axes."""
    model = ManifoldPriorFlow(3, charts=2, scale=2.5, hidden=(16,)).double()
    _randomise(model, 5, size=0.5)
    for k, point in enumerate(torch.randn(4, 3, dtype=torch.float64)):
        chart = torch.tensor([k % 2])
        jac = torch.autograd.functional.jacobian(
            lambda v, chart=chart: model.latent(v[None], chart)[0], point
        )
        assert abs(float(torch.linalg.slogdet(jac).logabsdet) + 3 * math.log(2.5)) < 1e-10


def test_spread_loss_has_gradients_for_every_part():
    x = datasets.sinusoid(200, noise=0.01, seed=0)
    model = ManifoldPriorFlow.from_data(x, 2, seed=0, hidden=(16,))
    _randomise(model.couplings, 0, size=0.1)
    spread_negative_log_likelihood(model, x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.prior.log_scale.grad.abs().max()) > 0
    assert float(model.skew.grad.abs().max()) > 0


# Collapse and the estimate -------------------------------------------------------------------


def test_training_collapses_the_normal_scale_of_a_curve():
    """A parabola x2 = x1^2 with one chart: the principal axes leave a normal scale of the
    order of the curvature; training the couplings straightens the curve and that scale
    collapses to the noise level."""
    g = torch.Generator().manual_seed(0)
    t = 2 * torch.rand(1000, generator=g) - 1
    x = torch.stack([t, t**2], -1) + 0.005 * torch.randn(1000, 2, generator=g)
    before = ManifoldPriorFlow.from_data(x, 1).spectrum()[0]
    result = estimate_intrinsic_dimension(x, charts=1, steps=1000, seed=0)
    after = result.spectrum
    assert isinstance(result, IntrinsicDimension) and result.dimension == 1
    assert float(after[1]) < float(before[1]) / 5
    assert float(after[0] / after[1]) > 10


@pytest.mark.parametrize(
    "name, make, d",
    [
        ("two circles in R^2", lambda: datasets.two_circles(800, 0.01, 0, radii=(1.0, 1.0)), 1),
        (
            "tilted plane in R^3",
            lambda: (
                torch.randn(800, 2, generator=torch.Generator().manual_seed(1))
                @ torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.6]])
            ),
            2,
        ),
        ("Gaussian in R^2 (full)", lambda: torch.randn(800, 2), 2),
    ],
)
def test_intrinsic_dimension_on_small_cases(name, make, d):
    torch.manual_seed(0)
    x = make()
    result = estimate_intrinsic_dimension(x, charts=4, steps=150, seed=0)
    assert result.dimension == d, (name, result.spectrum)
    assert result.chart_spectra.shape == (4, x.shape[1])
    assert result.chart_dimensions.shape == (4,)
    assert result.model.intrinsic_dimension() == d


@pytest.mark.slow
@pytest.mark.parametrize("case", range(6))
def test_intrinsic_dimension_on_the_table_cases(case):
    """The cases of examples/intrinsic_dimension_table.py with the default settings."""
    name, d, make = _example("intrinsic_dimension_table").CASES[case]
    result = estimate_intrinsic_dimension(make(2000, 0.01, 0).float(), seed=0)
    assert result.dimension == d, (name, result.spectrum)


def test_model_is_a_module_and_a_pyro_distribution():
    import pyro
    import pyro.poutine as poutine

    x = datasets.sinusoid(64, noise=0.01, seed=0)
    model = ManifoldPriorFlow.from_data(x, 2, seed=0, hidden=(8,))
    _randomise(model, 6, size=0.1)
    copy = ManifoldPriorFlow.from_data(x, 2, seed=1, hidden=(8,))
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.chart_log_prob(x), model.chart_log_prob(x))

    def observe():
        pyro.module("prior_flow", model)
        pyro.sample("x", model.flow().to_event(1), obs=x.unsqueeze(-2))

    trace = poutine.trace(observe).get_trace()
    expected = model.flow().log_prob(x.unsqueeze(-2)).sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected)


# Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ManifoldPrior(0), "dim must be an int >= 1"),
        (lambda: ManifoldPrior(2, noise=-1.0), "noise must be finite and >= 0"),
        (lambda: ManifoldPrior(2, init_scale=0.0), "init_scale must be finite and > 0"),
        (lambda: ManifoldPriorFlow(2, charts=0), "charts must be an int >= 1"),
        (lambda: ManifoldPriorFlow(2, coupling="spline"), "coupling must be"),
        (lambda: ManifoldPriorFlow(2, noise=0.0), "noise must be finite and > 0"),
        (lambda: ManifoldPriorFlow(3, splits=[0, 1]), r"splits must lie in 1..2"),
        (lambda: ManifoldPriorFlow(2, frames=torch.ones(1, 2, 2)), "frames must be orthogonal"),
        (
            lambda: ManifoldPriorFlow(2, chart_centres=torch.zeros(3, 2)),
            r"expected shape \(1, 2\)",
        ),
        (lambda: ManifoldPriorFlow(2).chart_log_prob(torch.zeros(4, 3)), r"shape \(N, 2\)"),
        (lambda: largest_gap_dimension(torch.tensor([1.0, -1.0])), "finite and >= 0"),
        (lambda: largest_gap_dimension(torch.tensor([1.0, math.nan])), "finite and >= 0"),
        (lambda: largest_gap_dimension(torch.tensor(1.0)), r"shape \(\*, D\)"),
        (lambda: largest_gap_dimension(torch.ones(3), min_ratio=1.0), "min_ratio"),
        (lambda: estimate_intrinsic_dimension(torch.zeros(10)), r"shape \(N, D\)"),
        (lambda: estimate_intrinsic_dimension(torch.randn(3, 5)), "need N >="),
        (
            lambda: estimate_intrinsic_dimension(torch.full((50, 2), math.nan)),
            "non-finite entries",
        ),
        (lambda: estimate_intrinsic_dimension(torch.randn(50, 2), steps=0), "steps"),
        (lambda: estimate_intrinsic_dimension(torch.ones(50, 2)), "zero spread"),
        (lambda: ManifoldPriorFlow.from_data(torch.randn(5, 2), charts=4), "2 points per chart"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# The examples ---------------------------------------------------------------------------------


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sinusoid_example_quick(tmp_path):
    out = tmp_path / "latent.png"
    result = _example("manifold_prior_sinusoid").main(["--quick", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert result.spectrum.shape == (2,)


def test_table_example_quick(capsys):
    rows = _example("intrinsic_dimension_table").main(["--quick"])
    table = capsys.readouterr().out
    assert len(rows) == 6 and "| true d | ours | TwoNN | MLE |" in table
