r"""Data sets: toy manifolds generated in code (:mod:`atlasdist.datasets.toy`) and real data
shipped inside the package, no download (:mod:`atlasdist.datasets.real`: the earth sets on
:math:`S^2`, RNA torsion angles on :math:`T^7`), with the literature's train / validation /
test split (:func:`split`)."""

from .real import (
    EARTH,
    earth,
    earth_lat_lon,
    flat_torus,
    flat_torus_angles,
    lat_lon_to_unit,
    rna,
    rna_angles,
    unit_to_lat_lon,
)
from .splits import split
from .toy import (
    MANIFOLDS,
    _von_mises,  # noqa: F401  (kept importable as datasets._von_mises)
    helix,
    interlocked_rings,
    sinusoid,
    sphere,
    swiss_roll,
    torus,
    trefoil_knot,
    two_circles,
    two_circles_entropy,
    two_circles_log_prob,
)

__all__ = [
    "two_circles",
    "two_circles_log_prob",
    "two_circles_entropy",
    "sphere",
    "torus",
    "swiss_roll",
    "helix",
    "trefoil_knot",
    "interlocked_rings",
    "sinusoid",
    "MANIFOLDS",
    "EARTH",
    "earth",
    "earth_lat_lon",
    "lat_lon_to_unit",
    "unit_to_lat_lon",
    "rna_angles",
    "rna",
    "flat_torus",
    "flat_torus_angles",
    "split",
]
