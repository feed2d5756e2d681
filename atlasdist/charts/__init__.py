"""Charts: chart specs (kinds of charts as rows of per-chart tables), chart regions and
membership, and the VQ autoencoder that learns them."""

from .kmeans import kmeans
from .membership import ChartMembership
from .specs import (
    ChartSpec,
    ChartStack,
    ConditionedCharts,
    LearnedCharts,
    PlaneCharts,
    SharedChart,
    SphereCharts,
    TorusCharts,
    as_charts,
)
from .vq import VQAutoencoder, mlp

__all__ = [
    "ChartMembership",
    "VQAutoencoder",
    "kmeans",
    "mlp",
    "ChartSpec",
    "ChartStack",
    "ConditionedCharts",
    "SphereCharts",
    "PlaneCharts",
    "LearnedCharts",
    "SharedChart",
    "TorusCharts",
    "as_charts",
]
