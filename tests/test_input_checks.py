"""One input-checking policy for every class, tested by kind of mistake over registries of
distributions and transforms: a new class is covered by adding one line to ``DISTRIBUTIONS``
(or to ``tests/_cases.py`` for a transform, ``TRANSFORMS`` below for a flow on a manifold) and
its construction mistakes to ``BAD_PARAMETERS``.

Policy (``atlasdist._checks``): construction parameters are checked for shape, finiteness and
range when the object is built; values are checked for type, dtype, device, shape, batch shape,
finiteness and support under ``validate_args``, and every error names the class, the argument
and the fix. Empty batches give empty results; float64 tolerances accept data normalized in
float32 and cast to float64."""

from __future__ import annotations

import math

import pyro.distributions as pd
import pytest
import torch
from _atlases import circle, sphere
from _cases import CASES, build
from _manifold_checks import SIMPLEX, SPHERE
from torch import nn

from atlasdist import AtlasFlow, PlaneCharts, SphereCharts
from atlasdist._checks import module_tensor
from atlasdist.charts import (
    ChartMembership,
    ChartStack,
    LearnedCharts,
    SharedChart,
    VQAutoencoder,
    kmeans,
)
from atlasdist.distributions import (
    FreeFormEmbedding,
    FreeFormInjectiveDistribution,
    FreeFormInjectiveFlow,
    ManifoldPrior,
    ManifoldPriorFlow,
    SimplexFlow,
    SimplexFlowDistribution,
    SphereFlow,
    SphereFlowDistribution,
    UniformSphere,
)
from atlasdist.transforms import (
    ChartContext,
    ChartSpline,
    ChartSplineCoupling,
    ChartTable,
    Conditional,
    ConditionalCompose,
    Hypernet,
    InverseStereographic,
    ManifoldTransform,
    Mobius,
    Orthogonal,
    RationalQuadraticSpline,
    Scale,
    Shift,
    Similarity,
    StiefelEmbedding,
    ZeroPad,
    chart_affine_coupling,
    sphere_projection,
)
from atlasdist.transforms import conformal as conformal_module
from atlasdist.transforms import spline as spline_module
from atlasdist.transforms.simplex import Calibration, GeneralizedCalibration
from atlasdist.transforms.sphere import NormalizedAffine, NormalizedLinear, NormalizedTranslation

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


def _context(seed=0):
    return torch.randn(1, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _conditional_circle():
    # p(x | c) for one c (batch shape (1,)): a conditional atlas of the circle.
    poles = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=F64)
    torch.manual_seed(0)
    atlas = AtlasFlow.spheres(
        1, torch.zeros(2, 2), torch.ones(2), poles, context_features=2, layers=1, hidden=(8,)
    )
    return atlas.double()(_context()), _unit(2, 6, 4)


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
    # conditional builders, p(x | c) for one c: batch shape (1,)
    "AtlasFlow(circle | c)": (_conditional_circle, "sphere"),
    "SphereFlow(NT, NL | c)": (
        lambda: (
            SphereFlow(
                3, [NormalizedTranslation(3), NormalizedLinear(3)], context_features=2
            ).double()(_context()),
            _unit(3, 6, 5),
        ),
        "sphere",
    ),
    "SimplexFlow(Calibration | c)": (
        lambda: (
            SimplexFlow(3, [Calibration(3)], context_features=2).double()(_context()),
            SIMPLEX.points(3, (6,), 1),
        ),
        "simplex",
    ),
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
    n, batch = x.shape[-1], tuple(d.batch_shape)
    assert d.log_prob(x[:0]).shape == (0,)
    assert d.log_prob(torch.zeros(2, 0, n, dtype=F64)).shape == (2, 0)
    assert d.sample((0,)).shape == (0, *batch, n)
    assert d.sample((3, 0)).shape == (3, 0, *batch, n)


@distributions
def test_a_negative_or_fractional_sample_shape_is_named(name):
    d, _ = make(name)
    cls = type(d).__name__
    with pytest.raises(ValueError, match=rf"{cls}: sample_shape must not be negative"):
        d.sample((-1,))
    with pytest.raises(TypeError, match=rf"{cls}: sample_shape must be a tuple of ints"):
        d.sample((1.5,))


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
    (lambda: AtlasFlow(3, 2, 1.5), TypeError, r"AtlasFlow: charts must be the number of charts"),
    (lambda: AtlasFlow(3, 2, 2, layers=-1), ValueError, r"AtlasFlow: layers must be >= 0"),
    (lambda: AtlasFlow(3, 2, 2, layers=1.5), TypeError, r"AtlasFlow: layers must be an int"),
    (lambda: AtlasFlow(3, 2, 2, hidden=[]), ValueError, r"AtlasFlow: hidden needs at least one"),
    (lambda: AtlasFlow(3, 2, 2, count_bins=2.0), TypeError, r"AtlasFlow: count_bins must be an"),
    (lambda: AtlasFlow(3, 2, 2, code_features=0), ValueError, r"AtlasFlow: code_features must"),
    (
        lambda: AtlasFlow(3, 2, 2, context=torch.zeros(3, 2)),
        ValueError,
        r"AtlasFlow: context must have shape \(2, f\)",
    ),
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
    # fixed (constructor-given) parameters of transforms: finite float tensors
    (
        lambda: Scale(3, log_scale=torch.tensor(math.nan)),
        ValueError,
        r"Scale: log_scale must be finite",
    ),
    (
        lambda: Scale(3, log_scale=torch.tensor([math.inf])),
        ValueError,
        r"Scale: log_scale must be finite",
    ),
    (
        lambda: Scale(3, log_scale=torch.tensor(1)),
        TypeError,
        r"Scale: log_scale has dtype torch.int64",
    ),
    (lambda: Scale(3, init=math.inf), ValueError, r"Scale: init must be finite"),
    (
        lambda: Shift(3, shift=torch.tensor([0.0, math.nan, 0.0])),
        ValueError,
        r"Shift: shift must be finite",
    ),
    (
        lambda: Shift(3, shift=torch.zeros(3, dtype=torch.int64)),
        TypeError,
        r"Shift: shift has dtype",
    ),
    (
        lambda: Mobius(3, raw=torch.tensor([math.inf, 0.0, 0.0])),
        ValueError,
        r"Mobius: raw must be finite",
    ),
    (lambda: Mobius(3, radius=math.inf), ValueError, r"Mobius: radius must be finite"),
    (
        lambda: Similarity(2, 3, log_scale=torch.tensor(math.nan)),
        ValueError,
        r"Similarity: log_scale must be finite",
    ),
    (
        lambda: Similarity(2, 3, shift=torch.tensor([math.inf, 0.0, 0.0])),
        ValueError,
        r"Similarity: shift must be finite",
    ),
    (
        lambda: InverseStereographic(2, pole=torch.tensor([math.nan, 0.0, 1.0])),
        ValueError,
        r"InverseStereographic: pole must be finite",
    ),
    (
        lambda: InverseStereographic(2, pole=torch.tensor([0, 0, 1])),
        TypeError,
        r"InverseStereographic: pole has dtype torch.int64",
    ),
    (
        lambda: InverseStereographic(2, pole=torch.tensor([0.0, 0.0, 2.0])),
        ValueError,
        r"pole must have unit norm.*normalize",
    ),
    (
        lambda: NormalizedTranslation(3, shift=torch.tensor([math.nan, 0.0, 0.0])),
        ValueError,
        r"NormalizedTranslation: shift must be finite",
    ),
    (
        lambda: NormalizedTranslation(3, shift=torch.tensor([0, 0, 0])),
        TypeError,
        r"NormalizedTranslation: shift has dtype",
    ),
    (
        lambda: Calibration(3, temperature=math.inf),
        ValueError,
        r"Calibration: temperature must be finite",
    ),
    (
        lambda: Calibration(3, shift=torch.tensor([math.nan, 0.0, 0.0])),
        ValueError,
        r"Calibration: shift must be finite",
    ),
    (
        lambda: GeneralizedCalibration(3, shift=torch.tensor([math.inf, 0.0, 0.0])),
        ValueError,
        r"GeneralizedCalibration: shift must be finite",
    ),
    (
        lambda: RationalQuadraticSpline(
            torch.tensor([[[1.0, -1.0]]]),
            torch.tensor([[[-1.0, 1.0]]]),
            torch.ones(1, 1, 2),
            bound=1.0,
        ),
        ValueError,
        r"RationalQuadraticSpline: the knots xs must increase",
    ),
    (
        lambda: RationalQuadraticSpline(
            torch.tensor([[[-2.0, 1.0]]]),
            torch.tensor([[[-1.0, 1.0]]]),
            torch.ones(1, 1, 2),
            bound=1.0,
        ),
        ValueError,
        r"knots xs must start at -bound",
    ),
    (
        lambda: RationalQuadraticSpline(
            torch.tensor([[[-1.0, 1.0]]]),
            torch.tensor([[[-1.0, 1.0]]]),
            torch.zeros(1, 1, 2),
            bound=1.0,
        ),
        ValueError,
        r"derivatives ds must be > 0",
    ),
    (
        lambda: RationalQuadraticSpline.from_parameters(
            torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), bound=math.inf
        ),
        ValueError,
        r"RationalQuadraticSpline: bound must be finite",
    ),
    (lambda: ChartSpline(2, 3, bound=math.inf), ValueError, r"ChartSpline: bound must be finite"),
    (
        lambda: ChartSpline(2, 3, count_bins=2.5),
        TypeError,
        r"ChartSpline: count_bins must be an int",
    ),
    (lambda: ChartSpline(2, 3, hidden=[]), ValueError, r"ChartSpline: hidden needs at least one"),
    (
        lambda: ChartTable(torch.full((2, 3), math.nan)),
        ValueError,
        r"ChartTable: table must be finite",
    ),
    (
        lambda: ChartTable(torch.zeros(2, 3, dtype=torch.int64)),
        TypeError,
        r"ChartTable: table has dtype",
    ),
    (
        lambda: Conditional(Scale, 3, table=torch.full((2, 1), math.inf)),
        ValueError,
        r"ChartTable: table must be finite",
    ),
    (
        lambda: Conditional(Shift, 3, context_features=1.5),
        TypeError,
        r"Conditional\(Shift\): context_features must be an int",
    ),
    (
        lambda: Conditional("Shift", 3, context_features=2),
        TypeError,
        r"Conditional: layer must be a layer class",
    ),
    (
        lambda: Hypernet(2, 3, initial=torch.full((3,), math.nan)),
        ValueError,
        r"Hypernet: initial must be finite",
    ),
    (lambda: ConditionalCompose([]), ValueError, r"ConditionalCompose needs at least one part"),
    (
        lambda: chart_affine_coupling(1, 2),
        ValueError,
        r"chart_affine_coupling: features must be >= 2",
    ),
    (
        lambda: ChartSplineCoupling(1, 2),
        ValueError,
        r"ChartSplineCoupling: features must be >= 2",
    ),
    (
        lambda: ChartSplineCoupling(2, 3).condition(
            ChartContext(torch.randn(4, 3), torch.tensor([0, 1, 3, 3, 2, 0]))
        )(torch.randn(2)),
        ValueError,
        r"SplineCoupling: the knot network gave 6 knot tables for 1 input rows",
    ),
    (
        lambda: ChartSplineCoupling(2, 3, bound=-1.0),
        ValueError,
        r"ChartSplineCoupling: bound must be > 0",
    ),
    (
        lambda: ChartSplineCoupling(2, 3, hidden=[]),
        ValueError,
        r"ChartSplineCoupling: hidden needs at least one",
    ),
    (
        lambda: ChartContext(torch.eye(2), torch.tensor([0.5])),
        TypeError,
        r"ChartContext: index must be an integer tensor",
    ),
    # integer counts: a float or a string is a mistake, not a size
    (lambda: ZeroPad(2.5, 3), TypeError, r"ZeroPad: in_features must be an int, got 2.5"),
    (
        lambda: StiefelEmbedding(2, "3"),
        TypeError,
        r"StiefelEmbedding: out_features must be an int",
    ),
    (lambda: NormalizedAffine(2.5), TypeError, r"NormalizedAffine: features must be an int"),
    (
        lambda: ManifoldTransform(lambda x: x, sphere_projection, 2, 3, chunk_size=0),
        ValueError,
        r"ManifoldTransform: chunk_size must be >= 1",
    ),
    # builders: degenerate arguments
    (
        lambda: SphereFlow(1, []),
        ValueError,
        r"SphereFlow: features must be >= 2 \(the unit sphere",
    ),
    (lambda: SphereFlow(2.5, []), TypeError, r"SphereFlow: features must be an int"),
    (
        lambda: SphereFlow(3, [NormalizedAffine(4)]),
        ValueError,
        r"SphereFlow: transform 0 \(NormalizedAffine\) maps 4 to 4",
    ),
    (
        lambda: SphereFlow(3, [Calibration(3)]),
        ValueError,
        r"SphereFlow: transform 0 \(Calibration\) is a flow on",
    ),
    (
        lambda: SphereFlow(3, ["scale"]),
        TypeError,
        r"SphereFlow: transform 0 \(str\) is not a torch Transform",
    ),
    (
        lambda: SphereFlow(3, [NormalizedAffine(3)], context_features=1.5),
        TypeError,
        r"SphereFlow: context_features must be an int",
    ),
    (
        lambda: SphereFlow(3, [NormalizedAffine(3)], context_features=2, hidden=[0]),
        ValueError,
        r"SphereFlow: hidden entry must be >= 1",
    ),
    (
        lambda: SphereFlow(3, [NormalizedAffine(3)], context_features=2)(
            torch.zeros(4, 2, dtype=F64)
        ),
        ValueError,
        r"SphereFlow: c has dtype torch.float64, the model's parameters torch.float32",
    ),
    (
        lambda: SphereFlow(3, [NormalizedAffine(3)], context_features=2)(
            torch.full((4, 2), math.nan)
        ),
        ValueError,
        r"SphereFlow: c holds 8 non-finite",
    ),
    (lambda: SimplexFlow(1), ValueError, r"SimplexFlow: features must be >= 2 \(the simplex"),
    (
        lambda: SimplexFlow(3, [NormalizedAffine(3)]),
        ValueError,
        r"SimplexFlow: transform 0 \(NormalizedAffine\) is a flow on",
    ),
    (
        lambda: SimplexFlow(3, concentration=math.inf),
        ValueError,
        r"SimplexFlow: concentration must be finite",
    ),
    (
        lambda: SimplexFlow(3, concentration=torch.ones(4)),
        ValueError,
        r"SimplexFlow: concentration must be a number or of shape \(3,\)",
    ),
    (lambda: UniformSphere(2.5), TypeError, r"UniformSphere: features must be an int"),
    (
        lambda: UniformSphere(3, (-1,)),
        ValueError,
        r"UniformSphere: batch_shape must not be negative",
    ),
    (
        lambda: UniformSphere(3, dtype=torch.float16),
        TypeError,
        r"UniformSphere: dtype must be torch.float32 or torch.float64",
    ),
    (
        lambda: SphereFlowDistribution(pd.Normal(torch.zeros(3), 1.0).to_event(1), []),
        ValueError,
        r"SphereFlowDistribution: the base must be a distribution on the unit sphere",
    ),
    (
        lambda: SphereFlowDistribution("uniform", []),
        TypeError,
        r"SphereFlowDistribution: the base must be a Distribution",
    ),
    (
        lambda: SimplexFlowDistribution(UniformSphere(3), []),
        ValueError,
        r"SimplexFlowDistribution: the base must be a distribution on the simplex",
    ),
    (
        lambda: FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3), atol=-1.0),
        ValueError,
        r"FreeFormInjectiveFlow: atol must be >= 0",
    ),
    (
        lambda: FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3), atol=math.inf),
        ValueError,
        r"FreeFormInjectiveFlow: atol must be finite",
    ),
    (
        lambda: FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3), noise_scale=math.inf),
        ValueError,
        r"FreeFormInjectiveFlow: noise_scale must be finite",
    ),
    (
        lambda: FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3), chunk_size=0),
        ValueError,
        r"FreeFormInjectiveFlow: chunk_size must be >= 1",
    ),
    (
        lambda: FreeFormInjectiveFlow("encoder", nn.Linear(2, 3), 2, 3),
        TypeError,
        r"FreeFormInjectiveFlow: encoder must be a network",
    ),
    (
        lambda: FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3), latent_features=1.5),
        TypeError,
        r"FreeFormInjectiveFlow: latent_features must be an int",
    ),
    (
        lambda: FreeFormInjectiveDistribution(
            pd.Normal(torch.zeros(2), 1.0).to_event(1),
            nn.Linear(3, 2),
            nn.Linear(2, 3),
            3,
            noise_scale=math.inf,
        ),
        ValueError,
        r"FreeFormInjectiveDistribution: noise_scale must be finite",
    ),
    (
        lambda: FreeFormEmbedding(nn.Linear(3, 2), nn.Linear(2, 3), 1.5, 3),
        TypeError,
        r"FreeFormEmbedding: in_features must be an int",
    ),
    (
        lambda: FreeFormInjectiveFlow(nn.Linear(3, 2), nn.Linear(2, 3))().sample((-1,)),
        ValueError,
        r"FreeFormInjectiveDistribution: sample_shape must not be negative",
    ),
    (
        lambda: ManifoldPrior(3, init_scale=torch.ones(4)),
        ValueError,
        r"ManifoldPrior: init_scale must be a number or broadcast",
    ),
    (
        lambda: ManifoldPrior(3, batch_shape=(-1,)),
        ValueError,
        r"ManifoldPrior: batch_shape must not be negative",
    ),
    (
        lambda: ManifoldPriorFlow(3, blocks=1.5),
        TypeError,
        r"ManifoldPriorFlow: blocks must be an int",
    ),
    (
        lambda: ManifoldPriorFlow(3, hidden=[]),
        ValueError,
        r"ManifoldPriorFlow: hidden needs at least one",
    ),
    (
        lambda: ManifoldPriorFlow(3, centre=torch.full((3,), math.nan)),
        ValueError,
        r"ManifoldPriorFlow: centre must be finite",
    ),
    (
        lambda: ManifoldPriorFlow(3, chart_centres=torch.full((1, 3), math.inf)),
        ValueError,
        r"ManifoldPriorFlow: chart_centres must be finite",
    ),
    (
        lambda: ManifoldPriorFlow.from_data(torch.randn(10, 3).half()),
        ValueError,
        r"from_data: x must be float32 or float64, got torch.float16",
    ),
    # charts
    (
        lambda: SphereCharts(torch.zeros(2, 3), torch.ones(2), 2 * torch.eye(3)[:2]),
        ValueError,
        r"SphereCharts: poles must be unit vectors.*normalize",
    ),
    (
        lambda: SphereCharts(torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3)),
        ValueError,
        r"SphereCharts: poles must be unit vectors",
    ),
    (
        lambda: SphereCharts(torch.zeros(2, 1), torch.ones(2), torch.ones(2, 1)),
        ValueError,
        r"SphereCharts: poles must have shape \(K, d\+1\) with d >= 1",
    ),
    (
        lambda: SphereCharts(
            torch.zeros(2, 3).half(), torch.ones(2).half(), torch.eye(3)[:2].half()
        ),
        TypeError,
        r"SphereCharts: .*dtype torch.float16",
    ),
    (
        lambda: PlaneCharts(torch.zeros(2, 3), torch.zeros(2, 3, 2), torch.ones(2)),
        ValueError,
        r"PlaneCharts: frames must have full column rank 2",
    ),
    (lambda: LearnedCharts(2, 0, 3, 3), ValueError, r"LearnedCharts: d must be >= 1"),
    (lambda: LearnedCharts(2, 3, 3, 3), ValueError, r"LearnedCharts: needs d < D"),
    (lambda: LearnedCharts(1.5, 2, 3, 3), TypeError, r"LearnedCharts: num_charts must be an int"),
    (
        lambda: SharedChart(ZeroPad(2, 3), 1.5),
        TypeError,
        r"SharedChart: num_charts must be an int",
    ),
    (lambda: SharedChart("chart", 1), TypeError, r"SharedChart: embedding must be a transform"),
    (lambda: ChartStack(["chart"]), TypeError, r"ChartStack: spec 0 \(str\) is not a ChartSpec"),
    (lambda: ChartMembership(eps=math.inf), ValueError, r"ChartMembership: eps must be finite"),
    (lambda: ChartMembership(m=1, cap=1.5), TypeError, r"ChartMembership: cap must be an int"),
    (lambda: VQAutoencoder(3, 2.5), TypeError, r"VQAutoencoder: charts must be an int"),
    (lambda: kmeans(torch.full((10, 2), math.nan), 2), ValueError, r"kmeans: x must be finite"),
    (lambda: kmeans(torch.randn(10, 2), 2.0), TypeError, r"kmeans: k must be an int"),
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


# Every transform: the library's registry (tests/_cases.py) and the flows on the sphere and the
# simplex, with inputs of the right shape (points on the manifold for the flows).
def _registry_transform(name):
    f = build(name, 2, 1, seed=0)
    return f, 0.3 * torch.randn(4, f.in_features, generator=torch.Generator().manual_seed(1))


def _manifold_flow(m, name):
    return lambda: (m.build(name, 3, 0, 0.5), m.points(3, (4,), 0))


TRANSFORMS = {name: (lambda name=name: _registry_transform(name)) for name in CASES}
for _m in (SPHERE, SIMPLEX):
    TRANSFORMS.update({name: _manifold_flow(_m, name) for name in _m.names})
transforms = pytest.mark.parametrize("name", sorted(TRANSFORMS))
# Layers without parameters follow their input's dtype and device (tested below).
PARAMETER_FREE = {"ZeroPad"}
with_parameters = pytest.mark.parametrize("name", sorted(set(TRANSFORMS) - PARAMETER_FREE))


def make_transform(name):
    f, x = TRANSFORMS[name]()
    return f, x.to(F64)


@with_parameters
def test_a_transform_refuses_a_precision_or_device_other_than_its_parameters(name):
    f, x = make_transform(name)
    like = module_tensor(f)
    assert like is not None and like.dtype == F64  # every registry entry has parameters
    for call, v in ((f, x), (f.inv, f(x).detach())):
        with pytest.raises(ValueError, match=r"input has dtype torch.float32, the model's "):
            call(v.float())
        with pytest.raises(ValueError, match=r"input is on meta, the model's parameters on cpu"):
            call(v.to("meta"))
        with pytest.raises(TypeError, match=r"input has dtype torch.bfloat16"):
            call(v.to(torch.bfloat16))


def test_a_layer_without_parameters_follows_its_input_dtype():
    # ZeroPad has no tensors; InverseStereographic's default north pole is a constant.
    for f in (ZeroPad(2, 3), InverseStereographic(2)):
        for dtype in (torch.float32, F64):
            y, ladj = f.call_and_ladj(torch.full((4, 2), 0.5, dtype=dtype))
            assert y.dtype == ladj.dtype == f.inv(y).dtype == dtype
    assert ZeroPad(2, 3)(torch.zeros(4, 2, device="meta")).shape == (4, 3)
    assert module_tensor(ZeroPad(2, 3)) is None and PARAMETER_FREE <= set(TRANSFORMS)


@transforms
def test_a_transform_gives_empty_results_for_empty_batches(name):
    f, x = make_transform(name)
    y = f(x).detach()
    assert f(x[:0]).shape == (0, f.out_features)
    assert f.inv(y[:0]).shape == (0, f.in_features)
    assert f.log_abs_det_jacobian(x[:0], y[:0]).shape == (0,)
    if hasattr(f, "call_and_ladj"):
        out, ladj = f.call_and_ladj(x.reshape(2, 2, -1)[:, :0])
        assert out.shape == (2, 0, f.out_features) and ladj.shape == (2, 0)
    # an empty call between two calls leaves the cached values of the full batch alone
    y2, ladj2 = f.call_and_ladj(x) if hasattr(f, "call_and_ladj") else (y, None)
    torch.testing.assert_close(y2, y)
    if ladj2 is not None:
        torch.testing.assert_close(ladj2, f.log_abs_det_jacobian(x, f(x)))


# --- the per-call path: layers built from a hypernetwork's output are not value-checked --------


def test_layers_built_from_parameters_skip_the_value_checks(monkeypatch):
    # from_parameters runs on every call of an atlas (a hypernetwork's output builds the layer):
    # a finiteness check there would synchronise the device per call. The user-facing
    # constructors check (BAD_PARAMETERS); this path must not reach the value checks at all.
    def refuse(*args, **kwargs):
        raise AssertionError("a value check ran on the per-call path")

    monkeypatch.setattr(conformal_module, "check_parameter", refuse)
    monkeypatch.setattr(spline_module, "_check_knots", refuse)
    for atlas, x in ((circle(0), _unit(2, 5, 0)), (sphere(0), _unit(3, 5, 1))):
        assert bool(torch.isfinite(atlas().log_prob(x)).all())
    learned = AtlasFlow(3, 2, 3, layers=1, hidden=(8,)).double()
    assert learned(noise_scale=0.1).log_prob(_unit(3, 5, 2)).shape == (5,)
    nan = torch.full((1, 3), math.nan)
    assert Shift.from_parameters(3, {"shift": nan}).shift.isnan().all()  # documented: unchecked
    with pytest.raises(AssertionError, match="a value check ran"):
        Shift(3, shift=nan[0])  # the constructor does check


def test_chart_helpers_name_bad_data():
    vq, x = VQAutoencoder(3, 2), torch.randn(4, 3)
    assert vq.encode(x[:0]).shape == (0, vq.code_dim) and vq.assign(x[:0]).shape == (0,)
    for bad, error, match in [
        (x.double(), ValueError, r"VQAutoencoder: data has dtype torch.float64, the model's"),
        (x.long(), TypeError, r"VQAutoencoder: data has dtype torch.int64"),
        (x.to("meta"), ValueError, r"VQAutoencoder: data is on meta"),
        (torch.full((2, 3), math.nan), ValueError, r"VQAutoencoder: data holds 6 non-finite"),
    ]:
        with pytest.raises(error, match=match):
            vq.encode(bad)
    with pytest.raises(ValueError, match=r"ChartMembership: point has dtype torch.float64"):
        ChartMembership(m=1).candidates(x.double(), torch.zeros(2, 3))


def test_a_float64_manifold_prior_flow_keeps_its_precision():
    # from_data on float64 points: the frames and centres were rounded through float32
    # (orthogonal to 5e-8 only, which the exact log-det of the frame assumes to 1e-16).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=gen, dtype=F64) * torch.tensor([1.0, 1.0, 0.01]) + 1 / 3
    model = ManifoldPriorFlow.from_data(x, charts=2, seed=0, hidden=(8,))
    eye = torch.eye(3, dtype=F64)
    assert {p.dtype for p in model.parameters()} == {F64}
    assert float((model.frames.mT @ model.frames - eye).abs().max()) < 1e-14
    torch.testing.assert_close(model.centre, x.mean(0), atol=0, rtol=0)
    assert ManifoldPrior(3, init_scale=torch.full((3,), 0.1, dtype=F64))().sample().dtype == F64


@distributions
def test_float64_in_float64_out(name):
    d, x = make(name)
    assert d.log_prob(x).dtype == d.sample((2,)).dtype == F64


@transforms
def test_a_float64_transform_gives_float64(name):
    f, x = make_transform(name)
    y = f(x)
    assert y.dtype == f.inv(y).dtype == f.log_abs_det_jacobian(x, y).dtype == F64
