"""Composition of injective and bijective parts: the volume term of the composite."""

import math

import pyro.distributions.transforms as pyro_t
import pytest
import torch

from atlasdist.geometry import log_volume_ratio
from atlasdist.transforms import (
    InjectiveCompose,
    InverseStereographic,
    ProductEmbedding,
    Scale,
    Shift,
    ZeroPad,
    compose,
)


def test_torch_compose_transform_gets_the_volume_term_wrong_and_ours_does_not():
    """torch's ComposeTransform adds the full D-dimensional log-det of a part that comes after
    the dimension change (D log s for a scaling); the d-dimensional volume changes by d log s."""
    x = torch.randn(5, 2, dtype=torch.float64)
    pad, scale = ZeroPad(2, 3), Scale(3, init=2.0).double()
    torch_ladj = torch.distributions.ComposeTransform([pad, scale]).log_abs_det_jacobian(
        x, scale(pad(x))
    )
    ours = InjectiveCompose([pad, scale])
    reference = log_volume_ratio(ours, x)
    torch.testing.assert_close(reference, torch.full((5,), 2 * math.log(2), dtype=x.dtype))
    torch.testing.assert_close(ours.log_abs_det_jacobian(x, None), reference)
    torch.testing.assert_close(torch_ladj, torch.full((5,), 3 * math.log(2), dtype=x.dtype))


def test_bijective_parts_before_the_injection_add_their_log_det():
    torch.manual_seed(0)
    spline = pyro_t.Spline(2, count_bins=6).double()
    f = compose(spline, torch.distributions.AffineTransform(0.5, 3.0), InverseStereographic(2))
    assert isinstance(f, InjectiveCompose)
    x = torch.randn(7, 2, dtype=torch.float64)
    y, ladj = f.call_and_ladj(x)
    torch.testing.assert_close(ladj, log_volume_ratio(f, x), atol=1e-10, rtol=0)
    torch.testing.assert_close(f.inv(y), x)


def test_non_conformal_map_after_injection_is_rejected():
    with pytest.raises(TypeError, match="not a ConformalTransform"):
        InjectiveCompose([ZeroPad(1, 2), pyro_t.Spline(2)])
    torus = ProductEmbedding([InverseStereographic(1), InverseStereographic(1)])
    with pytest.raises(TypeError, match="not conformal"):
        InjectiveCompose([ZeroPad(1, 2), torus])


def test_compose_of_bijections_is_torch_compose():
    f = compose(torch.distributions.ExpTransform(), torch.distributions.AffineTransform(0, 2))
    assert isinstance(f, torch.distributions.ComposeTransform)


def test_compose_registers_parameters():
    f = InjectiveCompose([ZeroPad(1, 2), Scale(2), Shift(2)])
    assert len(list(f.parameters())) == 2
    assert set(f.state_dict()) == {"part_modules.1.log_scale", "part_modules.2.shift"}
