"""Injective, conformal and chart-conditioned transforms."""

from .conditional import (
    ChartTable,
    ConditionalConformalEmbedding,
    ConditionalInjectiveCompose,
    ConditionalInverseStereographic,
    ConditionalMobius,
    ConditionalOrthogonal,
    ConditionalScale,
    ConditionalShift,
    ConditionalStiefelEmbedding,
    Hypernet,
    householder_stiefel,
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
    householder_to,
)
from .injective import (
    ConformalTransform,
    EventTransform,
    InjectiveCompose,
    InjectiveTransform,
    compose,
)
from .product import ProductEmbedding

__all__ = [
    "EventTransform",
    "InjectiveTransform",
    "ConformalTransform",
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
    "ProductEmbedding",
    "Hypernet",
    "ChartTable",
    "householder_stiefel",
    "ConditionalShift",
    "ConditionalScale",
    "ConditionalOrthogonal",
    "ConditionalStiefelEmbedding",
    "ConditionalMobius",
    "ConditionalInverseStereographic",
    "ConditionalInjectiveCompose",
    "ConditionalConformalEmbedding",
]
