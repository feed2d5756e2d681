"""One input-checking policy for every class, tested by kind of mistake over registries of
distributions and transforms: a new class is covered by adding one line to ``DISTRIBUTIONS``
(or to ``tests/_cases.py`` for a transform).

Policy (``atlasdist._checks``): construction parameters are checked for shape, finiteness and
range when the object is built; values are checked for type, dtype, device, shape, batch shape,
finiteness and support under ``validate_args``, and every error names the class, the argument
and the fix. Empty batches give empty results; float64 tolerances accept data normalized in
float32 and cast to float64."""

from __future__ import annotations

import math

import pytest
import torch
from _atlases import circle, sphere
from _cases import CASES, build
from _manifold_checks import SIMPLEX, SPHERE
from torch import nn

from atlasdist import AtlasFlow, PlaneCharts, SphereCharts
from atlasdist.distributions import (
    FreeFormInjectiveFlow,
    ManifoldPrior,
    ManifoldPriorFlow,
    SimplexFlow,
    SphereFlow,
    UniformSphere,
)
from atlasdist.transforms import Orthogonal, Similarity, StiefelEmbedding
from atlasdist.transforms.simplex import GeneralizedCalibration
from atlasdist.transforms.sphere import NormalizedAffine

F64 = torch.float64


def _unit(n, size, seed):
    x = torch.randn(size, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=-1, keepdim=True)


def _free_form():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    decoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    d = FreeFormInjectiveFlow(encoder, decoder, noise_scale=0.1).double()()
    return d, d.sample((6,))


def _manifold_prior(cls, *args, **options):
    def make():
        torch.manual_seed(0)
        d = cls(*args, **options).double()()
        return d, d.sample((6,))

    return make


# name -> (distribution in float64, points on its support (N, n)) and the kind of support:
# "sphere", "simplex" (checked under validation, float32-normalized points accepted) or
# "ambient" (a thickened density on R^n: no support check).
DISTRIBUTIONS = {
    "AtlasFlow(circle)": (lambda: (circle(0)(), _unit(2, 6, 0)), "sphere"),
    "AtlasFlow(sphere)": (lambda: (sphere(0)(), _unit(3, 6, 1)), "sphere"),
    "SphereFlow": (
        lambda: (
            SphereFlow(3, [NormalizedAffine(3)], "projected_normal").double()(),
            _unit(3, 6, 2),
        ),
        "sphere",
    ),
    "UniformSphere": (lambda: (UniformSphere(3, dtype=F64), _unit(3, 6, 3)), "sphere"),
    "SimplexFlow": (
        lambda: (
            SimplexFlow(3, [GeneralizedCalibration(3)]).double()(),
            SIMPLEX.points(3, (6,), 0),
        ),
        "simplex",
    ),
    "FreeFormInjectiveFlow(noise)": (_free_form, "ambient"),
    "ManifoldPriorFlow": (_manifold_prior(ManifoldPriorFlow, 3, noise=0.1), "ambient"),
    "ManifoldPrior": (_manifold_prior(ManifoldPrior, 3, rotation=True, noise=0.1), "ambient"),
}
distributions = pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
on_manifolds = pytest.mark.parametrize(
    "name", sorted(k for k, v in DISTRIBUTIONS.items() if v[1] != "ambient")
)


def make(name):
    d, x = DISTRIBUTIONS[name][0]()
    assert x.dtype == F64 and bool(torch.isfinite(d.log_prob(x)).all())
    return d, x


# --- values: type, dtype, device, shape -------------------------------------------------------


@distributions
def test_a_value_that_is_not_a_float_tensor_is_refused_with_the_conversion(name):
    d, x = make(name)
    cls = type(d).__name__
    with pytest.raises(TypeError, match=rf"{cls}: value must be a torch.Tensor"):
        d.log_prob(x.tolist())
    for dtype in (torch.int64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"{cls}: value has dtype {dtype}.*\.to\("):
            d.log_prob(x.to(dtype))


@distributions
def test_a_value_of_another_precision_is_refused_not_coerced(name):
    d, x = make(name)
    with pytest.raises(ValueError, match=r"has dtype torch.float32, the model's parameters "):
        d.log_prob(x.float())


@distributions
def test_a_value_on_another_device_is_refused(name):
    d, x = make(name)
    with pytest.raises(ValueError, match=r"value is on meta, the model's parameters on cpu"):
        d.log_prob(x.to("meta"))


@distributions
def test_a_value_of_the_wrong_event_size_is_refused(name):
    d, x = make(name)
    n = x.shape[-1]
    with pytest.raises(
        ValueError, match=rf"{type(d).__name__}: expected value of shape \(\*, {n}"
    ):
        d.log_prob(torch.zeros(4, n + 1, dtype=F64))


@distributions
def test_a_batch_shape_that_does_not_broadcast_is_named(name):
    d, x = make(name)
    expanded = d.expand((3,))
    assert expanded.log_prob(x[:3]).shape == (3,)
    with pytest.raises(
        ValueError, match=r"batch dimensions \(2,\) does not broadcast with .*\(3,\)"
    ):
        expanded.log_prob(x[:2])


# --- values: NaN and points off the support ---------------------------------------------------


@distributions
def test_nan_values_are_refused(name):
    d, x = make(name)
    x = x.clone()
    x[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"non-finite|NaN"):
        d.log_prob(x)


@on_manifolds
def test_points_off_the_support_are_refused_with_their_distance(name):
    d, x = make(name)
    with pytest.raises(ValueError, match=r"off|not on|support|sphere|simplex"):
        d.log_prob(1.5 * x + 0.1)


@on_manifolds
def test_float32_normalized_points_cast_to_float64_are_on_the_support(name):
    d, x = make(name)
    x32 = x.float()
    if DISTRIBUTIONS[name][1] == "simplex":
        x32 = x32 / x32.sum(-1, keepdim=True)
    else:
        x32 = x32 / x32.norm(dim=-1, keepdim=True)
    x64 = x32.double()
    assert bool(torch.isfinite(d.log_prob(x64)).all())


# --- empty batches ----------------------------------------------------------------------------


@distributions
def test_empty_batches_give_empty_results(name):
    d, x = make(name)
    n = x.shape[-1]
    assert d.log_prob(x[:0]).shape == (0,)
    assert d.log_prob(torch.zeros(2, 0, n, dtype=F64)).shape == (2, 0)
    assert d.sample((0,)).shape == (0, n)
    assert d.sample((3, 0)).shape == (3, 0, n)


# --- construction parameters ------------------------------------------------------------------

POLES = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])

BAD_PARAMETERS = [
    (
        lambda: AtlasFlow.spheres(2, torch.zeros(2, 3), torch.tensor([1.0, math.inf]), POLES),
        ValueError,
        r"SphereCharts: radii must be finite",
    ),
    (
        lambda: AtlasFlow.spheres(2, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), POLES),
        ValueError,
        r"SphereCharts: radii must be > 0",
    ),
    (
        lambda: AtlasFlow.spheres(2, torch.full((2, 3), math.nan), torch.ones(2), POLES),
        ValueError,
        r"SphereCharts: centres must be finite",
    ),
    (
        lambda: SphereCharts(torch.zeros(2, 3), torch.ones(2), torch.full((2, 3), math.nan)),
        ValueError,
        r"SphereCharts: poles must be finite",
    ),
    (lambda: AtlasFlow(3, 2, 2, atol=-1.0), ValueError, r"AtlasFlow: atol must be >= 0"),
    (lambda: AtlasFlow(3, 2, 2, atol=math.nan), ValueError, r"AtlasFlow: atol must be finite"),
    (lambda: AtlasFlow(3, 2, 2, noise_scale=0.0), ValueError, r"noise_scale must be > 0"),
    (lambda: AtlasFlow(3, 2, 0), ValueError, r"AtlasFlow needs at least one chart"),
    (lambda: AtlasFlow(3, 1.5, 2), TypeError, r"AtlasFlow: d must be an int, got 1.5"),
    (
        lambda: AtlasFlow(3, 2, 2, context=torch.full((2, 2), math.nan)),
        ValueError,
        r"AtlasFlow: context must be finite",
    ),
    (
        lambda: PlaneCharts(
            torch.full((2, 3), math.nan), torch.linalg.qr(torch.randn(2, 3, 2)).Q, torch.ones(2)
        ),
        ValueError,
        r"PlaneCharts: means must be finite",
    ),
    (
        lambda: AtlasFlow(3, 2, 2)().sample((-1,)),
        ValueError,
        r"AtlasFlowDistribution: sample_shape must not be negative",
    ),
    (lambda: AtlasFlow(3, 3, 2), ValueError, r"AtlasFlow needs 1 <= d < D"),
    (
        lambda: AtlasFlow(3, 2, 2, centres=torch.full((2, 3), math.inf)),
        ValueError,
        r"AtlasFlow: centres must be finite",
    ),
    (
        lambda: AtlasFlow(3, 2, 2)(noise_scale=-1.0),
        ValueError,
        r"AtlasFlowDistribution: noise_scale must be > 0",
    ),
    (
        lambda: StiefelEmbedding(2, 3, weight=2 * torch.eye(3, 2)),
        ValueError,
        r"StiefelEmbedding: weight must have orthonormal columns .* = 3 ",
    ),
    (
        lambda: StiefelEmbedding(2, 3, weight=torch.full((3, 2), math.nan)),
        ValueError,
        r"StiefelEmbedding: weight must have orthonormal columns .* = nan",
    ),
    (
        lambda: Orthogonal(2, weight=torch.tensor([[1.0, 1.0], [0.0, 1.0]])),
        ValueError,
        r"Orthogonal: weight must have orthonormal columns",
    ),
    (
        lambda: Similarity(2, 3, 2 * torch.eye(3, 2)),
        ValueError,
        r"Similarity: weight must have orthonormal columns",
    ),
]


@pytest.mark.parametrize("make_it, error, match", BAD_PARAMETERS)
def test_invalid_construction_parameters_are_named(make_it, error, match):
    with pytest.raises(error, match=match):
        make_it()


def test_an_orthonormal_weight_is_accepted_in_either_precision():
    q = torch.linalg.qr(torch.randn(5, 2, dtype=F64)).Q
    for w in (q, q.float()):
        f = StiefelEmbedding(2, 5, weight=w)
        assert float(f.log_abs_det_jacobian(torch.zeros(2, dtype=w.dtype), None).abs()) == 0


def test_an_atlas_with_non_finite_parameters_raises_instead_of_returning_nan():
    atlas = circle(0)
    with torch.no_grad():
        atlas.logits.fill_(math.nan)
    with pytest.raises(ValueError, match=r"log_prob is NaN; the model's parameters"):
        atlas(validate_args=True).log_prob(_unit(2, 4, 0))


def test_a_float64_atlas_keeps_its_precision():
    # A float64 sphere of radius 3 keeps float64 tolerances: exact points are on its support.
    poles = POLES.double()
    for radius in (3.0, 10.0, 1e3):
        atlas = AtlasFlow.spheres(
            2, torch.zeros(2, 3, dtype=F64), torch.full((2,), radius, dtype=F64), poles
        )
        x = atlas().sample((5,))
        assert x.dtype == F64
        lp = atlas(validate_args=True).log_prob(radius * _unit(3, 5, 0))
        assert lp.dtype == F64 and bool(torch.isfinite(lp).all())


# --- transforms -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_transforms_refuse_integer_and_half_inputs(name):
    f = build(name, 2, 1, seed=0)
    for dtype in (torch.int64, torch.float16):
        with pytest.raises(TypeError, match=rf"value|input.*dtype {dtype}"):
            f(torch.zeros(3, f.in_features, dtype=dtype))
        with pytest.raises(TypeError, match=rf"input has dtype {dtype}"):
            f.inv(torch.zeros(3, f.out_features, dtype=dtype))


def test_sphere_registry_points_are_float64():
    # The registries above draw float64 points; SPHERE's own are used by the flow tests.
    assert SPHERE.points(3, (2,), 0).dtype == F64
