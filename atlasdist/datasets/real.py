r"""Real data on known manifolds, shipped inside the package (no download).

- The four "earth" sets of the Riemannian density-estimation literature on the unit sphere
  :math:`S^2 \subset \mathbb{R}^3`: volcano eruptions, earthquakes, floods and fires
  (:func:`earth`).
- RNA backbone torsion angles on the 7-torus :math:`T^7`, embedded as seven unit circles in
  :math:`\mathbb{R}^{14}` (:func:`rna`).

The files and their sources are listed in ``atlasdist/datasets/data/PROVENANCE.md``. Use
:func:`~atlasdist.datasets.split` for the literature's 80 / 10 / 10 split.
"""

from __future__ import annotations

import functools
import math
from importlib import resources

import numpy as np
import torch

__all__ = [
    "EARTH",
    "earth",
    "earth_lat_lon",
    "lat_lon_to_unit",
    "unit_to_lat_lon",
    "rna_angles",
    "rna",
    "flat_torus",
    "flat_torus_angles",
]

EARTH = {
    "volcano": "volerup.csv",
    "earthquake": "quakes_all.csv",
    "flood": "flood.csv",
    "fire": "fire.csv",
}
"""The earth sets: name -> file in ``atlasdist/datasets/data`` (latitude, longitude in
degrees, one event a row)."""


@functools.cache
def _table(file: str, delimiter: str | None, columns: tuple[int, ...]) -> np.ndarray:
    text = resources.files(__package__).joinpath("data", file).read_text()
    rows = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    try:
        float(rows[0].split(delimiter)[columns[0]])
    except ValueError:  # a header line
        rows = rows[1:]
    table = np.loadtxt(rows, delimiter=delimiter, usecols=columns, dtype=np.float64, ndmin=2)
    table.setflags(write=False)
    return table


def _check_name(name: str) -> str:
    if name not in EARTH:
        raise ValueError(f"earth: name must be one of {sorted(EARTH)}, got {name!r}")
    return EARTH[name]


def earth_lat_lon(name: str) -> torch.Tensor:
    r"""Latitude and longitude in degrees of the events of the earth set ``name``, as stored:
    a float64 tensor of shape :math:`(N, 2)`, latitude in :math:`[-90, 90]`, longitude in
    :math:`[-180, 180]`.

    Example:
        >>> earth_lat_lon("volcano").shape
        torch.Size([827, 2])
    """
    return torch.from_numpy(_table(_check_name(name), ",", (0, 1)).copy())


def lat_lon_to_unit(lat_lon: torch.Tensor) -> torch.Tensor:
    r"""Geographic coordinates (degrees) to unit vectors,
    :math:`(\varphi, \lambda) \mapsto (\cos\varphi\cos\lambda, \cos\varphi\sin\lambda,
    \sin\varphi)`: the z-axis through the North Pole, the x-axis through latitude 0,
    longitude 0.

    Arguments:
        lat_lon: latitude :math:`\varphi` and longitude :math:`\lambda` in degrees, shape
            :math:`(*, 2)`.

    Returns:
        Unit vectors of shape :math:`(*, 3)`, dtype of ``lat_lon``.

    Example:
        >>> lat_lon_to_unit(torch.tensor([[90.0, 0.0], [0.0, 90.0]])).round(decimals=6) + 0.0
        tensor([[0., 0., 1.],
                [0., 1., 0.]])
    """
    lat, lon = torch.deg2rad(lat_lon).unbind(-1)
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], -1)


def unit_to_lat_lon(x: torch.Tensor) -> torch.Tensor:
    r"""The inverse of :func:`lat_lon_to_unit`: :math:`\varphi = \operatorname{atan2}(x_3,
    |(x_1, x_2)|)`, :math:`\lambda = \operatorname{atan2}(x_2, x_1)`, in degrees, shape
    :math:`(*, 3) \to (*, 2)` (a point need not be of unit length; its direction counts).

    Example:
        >>> unit_to_lat_lon(torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
        tensor([[90.,  0.],
                [ 0., 90.]])
    """
    lat = torch.atan2(x[..., 2], x[..., :2].norm(dim=-1))
    lon = torch.atan2(x[..., 1], x[..., 0])
    return torch.rad2deg(torch.stack([lat, lon], -1))


def earth(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""The earth set ``name`` (``"volcano"``, ``"earthquake"``, ``"flood"`` or ``"fire"``) as
    unit vectors on :math:`S^2 \subset \mathbb{R}^3` (:func:`lat_lon_to_unit`), in file order.

    The rows are 827 volcano eruptions (NOAA NGDC), 6,120 significant earthquakes (NOAA
    NGDC), 4,875 floods (Dartmouth Flood Observatory) and 12,809 fires (NASA FIRMS). A density
    on them is taken w.r.t. the area measure of the unit sphere (total :math:`4\pi`, so the
    uniform density has :math:`-\log p = \log 4\pi \approx 2.531` nats), as in the published
    tables. The points are computed in float64, then cast.

    Arguments:
        name: the set.
        dtype: dtype of the result (default: torch's default dtype).

    Returns:
        Tensor of shape :math:`(N, 3)`.

    Example:
        >>> x = earth("volcano", dtype=torch.float64)
        >>> x.shape, bool(torch.allclose(x.norm(dim=-1), torch.ones(len(x), dtype=x.dtype)))
        (torch.Size([827, 3]), True)
    """
    x = lat_lon_to_unit(earth_lat_lon(name))
    return x.to(dtype or torch.get_default_dtype())


def rna_angles(dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""The 9,478 RNA backbone torsion-angle tuples (Protein Data Bank, via the free-form
    flows repository): seven angles per residue in radians, in :math:`[-\pi, \pi)`, in the
    file's column order; shape :math:`(9478, 7)`.

    A density on them w.r.t. :math:`d\theta_1 \cdots d\theta_7` (total volume
    :math:`(2\pi)^7`; the uniform density has :math:`-\log p = 7 \log 2\pi \approx 12.865`
    nats) is also a density w.r.t. the volume of the embedded torus :func:`flat_torus`, whose
    circles have unit radius.

    Example:
        >>> rna_angles().shape
        torch.Size([9478, 7])
    """
    degrees = torch.from_numpy(_table("rna.tsv", None, tuple(range(2, 9))).copy())
    radians = torch.remainder(torch.deg2rad(degrees) + math.pi, 2 * math.pi) - math.pi
    return radians.to(dtype or torch.get_default_dtype())


def flat_torus(angles: torch.Tensor) -> torch.Tensor:
    r"""The flat torus :math:`T^n \subset \mathbb{R}^{2n}`: each angle to its unit circle,
    :math:`(\theta_1, \dots, \theta_n) \mapsto (\cos\theta_1, \sin\theta_1, \dots,
    \cos\theta_n, \sin\theta_n)`, one (cos, sin) pair per angle.

    This is the product of unit circles that
    :class:`~atlasdist.transforms.ProductEmbedding` of :math:`n` circle charts
    (:class:`~atlasdist.transforms.InverseStereographic` of dimension 1, each onto the unit
    circle of its block) parametrizes. The embedding is an isometry of the angles (each block
    has speed 1), so its volume measure is :math:`d\theta_1 \cdots d\theta_n`.

    Arguments:
        angles: shape :math:`(*, n)`, radians.

    Returns:
        Points of shape :math:`(*, 2n)`.

    Example:
        >>> flat_torus(torch.tensor([0.0, math.pi / 2])).round(decimals=6) + 0.0
        tensor([1., 0., 0., 1.])
    """
    return torch.stack([angles.cos(), angles.sin()], -1).flatten(-2)


def flat_torus_angles(x: torch.Tensor) -> torch.Tensor:
    r"""The inverse of :func:`flat_torus`: :math:`\theta_i = \operatorname{atan2}(x_{2i},
    x_{2i-1})` in :math:`(-\pi, \pi]`, shape :math:`(*, 2n) \to (*, n)`.

    Example:
        >>> flat_torus_angles(torch.tensor([1.0, 0.0, 0.0, 1.0]))
        tensor([0.0000, 1.5708])
    """
    if x.shape[-1] % 2:
        raise ValueError(
            f"flat_torus_angles: x must have an even last dimension (cos, sin pairs), got shape "
            f"{tuple(x.shape)}"
        )
    pairs = x.unflatten(-1, (-1, 2))
    return torch.atan2(pairs[..., 1], pairs[..., 0])


def rna(dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""The RNA torsion angles (:func:`rna_angles`) as points of the flat torus
    :math:`T^7 \subset \mathbb{R}^{14}` (:func:`flat_torus`), shape :math:`(9478, 14)`;
    computed in float64, then cast.

    Example:
        >>> rna().shape
        torch.Size([9478, 14])
    """
    return flat_torus(rna_angles(torch.float64)).to(dtype or torch.get_default_dtype())
