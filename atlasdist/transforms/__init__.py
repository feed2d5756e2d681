"""Injective, conformal and chart-conditioned transforms."""

from .conditional import (
    ChartContext,
    ChartDenseNN,
    ChartSpline,
    ChartTable,
    Conditional,
    ConditionalCompose,
    Hypernet,
    chart_affine_coupling,
    condition,
)
from .conformal import (
    ConformalEmbedding,
    InverseStereographic,
    Mobius,
    Orthogonal,
    Scale,
    Shift,
    StiefelEmbedding,
    ZeroPad,
    householder_stiefel,
    householder_stiefel_raw,
    householder_to,
    reflect_to,
)
from .indexed import indexed_matvec, tile_plan
from .injective import (
    ConformalTransform,
    EventTransform,
    InjectiveCompose,
    InjectiveTransform,
    compose,
    is_conformal,
)
from .manifold import ManifoldTransform, qr_parametrized, simplex_projection, sphere_projection
from .product import ProductEmbedding
from .simplex import Calibration, GeneralizedCalibration, helmert_basis
from .sphere import (
    NormalizedAffine,
    NormalizedLinear,
    NormalizedTranslation,
    sphere_tolerance,
    unit_sphere,
)
from .spline import RationalQuadraticSpline, spline_knots

__all__ = [
    "EventTransform",
    "InjectiveTransform",
    "ConformalTransform",
    "is_conformal",
    "InjectiveCompose",
    "compose",
    "ZeroPad",
    "StiefelEmbedding",
    "Orthogonal",
    "Scale",
    "Shift",
    "Mobius",
    "InverseStereographic",
    "ConformalEmbedding",
    "householder_to",
    "reflect_to",
    "indexed_matvec",
    "tile_plan",
    "ProductEmbedding",
    "NormalizedTranslation",
    "NormalizedLinear",
    "NormalizedAffine",
    "unit_sphere",
    "sphere_tolerance",
    "Calibration",
    "GeneralizedCalibration",
    "helmert_basis",
    "ManifoldTransform",
    "sphere_projection",
    "simplex_projection",
    "qr_parametrized",
    "RationalQuadraticSpline",
    "spline_knots",
    "ChartContext",
    "Hypernet",
    "ChartTable",
    "Conditional",
    "ConditionalCompose",
    "ChartDenseNN",
    "ChartSpline",
    "chart_affine_coupling",
    "condition",
    "householder_stiefel",
    "householder_stiefel_raw",
]
