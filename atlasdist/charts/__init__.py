"""Chart regions, membership and the VQ autoencoder that learns them."""

from .kmeans import kmeans
from .membership import ChartMembership
from .vq import VQAutoencoder, mlp

__all__ = ["ChartMembership", "VQAutoencoder", "kmeans", "mlp"]
