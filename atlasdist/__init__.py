"""atlasdist: probability distributions on manifolds for PyTorch and Pyro."""

from . import (
    charts,
    datasets,
    distributions,
    geometry,
    infer,
    intrinsic_dimension,
    manifolds,
    training,
    transforms,
)
from .atlas import AtlasFlow
from .charts import (
    ChartMembership,
    ChartStack,
    LearnedCharts,
    PlaneCharts,
    SharedChart,
    SphereCharts,
    TorusCharts,
)
from .distributions import (
    AtlasFlowDistribution,
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
from .geometry import log_volume_ratio, manifold_log_volume_ratio, tangent_frame
from .infer import ManifoldGuide, ManifoldReparam
from .intrinsic_dimension import IntrinsicDimension, estimate_intrinsic_dimension
from .lazy import LazyDistribution

__version__ = "0.1.0"

__all__ = [
    # builders (lazy distributions: module(c=None) returns the distribution)
    "LazyDistribution",
    "AtlasFlow",
    "SphereFlow",
    "SimplexFlow",
    "FreeFormInjectiveFlow",
    "ManifoldPriorFlow",
    "ManifoldPrior",
    # distributions
    "AtlasFlowDistribution",
    "SphereFlowDistribution",
    "SimplexFlowDistribution",
    "FreeFormInjectiveDistribution",
    "UniformSphere",
    # charts
    "ChartMembership",
    "ChartStack",
    "SphereCharts",
    "TorusCharts",
    "PlaneCharts",
    "LearnedCharts",
    "SharedChart",
    # Pyro latent variables on manifolds
    "ManifoldReparam",
    "ManifoldGuide",
    # intrinsic dimension and geometry
    "estimate_intrinsic_dimension",
    "IntrinsicDimension",
    "log_volume_ratio",
    "manifold_log_volume_ratio",
    "tangent_frame",
    # modules
    "intrinsic_dimension",
    "charts",
    "datasets",
    "distributions",
    "geometry",
    "infer",
    "manifolds",
    "training",
    "transforms",
]
