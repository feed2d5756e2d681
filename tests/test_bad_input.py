"""Bad input raises a clear exception naming the problem."""

import pytest
import torch
from _cases import CASES, build

from atlasdist.transforms import (
    Conditional,
    ConformalEmbedding,
    InjectiveCompose,
    InverseStereographic,
    Mobius,
    Orthogonal,
    ProductEmbedding,
    Scale,
    StiefelEmbedding,
    ZeroPad,
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrong_last_dimension(name):
    f = build(name, 2, 1, seed=0)
    with pytest.raises(ValueError, match=rf"\(\*, {f.in_features}\)"):
        f(torch.zeros(4, f.in_features + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"\(\*, {f.out_features}\)"):
        f.inv(torch.zeros(4, f.out_features + 1, dtype=torch.float64))
    with pytest.raises(ValueError):
        f.forward_shape((4, f.in_features + 1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_nan_input(name):
    f = build(name, 2, 1, seed=0)
    x = torch.zeros(3, f.in_features, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        f(x)
    y = torch.ones(3, f.out_features, dtype=torch.float64)
    y[2, -1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        f.inv(y)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ZeroPad(3, 2),
        lambda: StiefelEmbedding(4, 3),
        lambda: Conditional(StiefelEmbedding, 4, 3, context_features=2),
        lambda: ZeroPad(0, 2),
    ],
)
def test_d_greater_than_D(make):
    with pytest.raises(ValueError, match="in_features"):
        make()


def test_mobius_outside_its_domain():
    f = Mobius(3, radius=2.0)
    with pytest.raises(ValueError, match=r"outside the domain \|x\| < 2.0"):
        f(torch.tensor([[0.0, 0.0, 2.5]]))
    g = Mobius(3, raw=torch.tensor([0.0, 0.0, 0.5]))
    pole = torch.tensor([[0.0, 0.0, 2.0]])  # b / |b|^2
    with pytest.raises(ValueError, match="pole"):
        g(pole)
    with pytest.raises(ValueError, match="pole"):
        g.inv(-pole)
    with pytest.raises(ValueError, match="radius"):
        Mobius(3, radius=-1.0)


def test_stereographic_pole_has_no_coordinates():
    f = InverseStereographic(2)
    with pytest.raises(ValueError, match="pole"):
        f.inv(torch.tensor([[0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="unit norm"):
        InverseStereographic(2, pole=torch.tensor([0.0, 0.0, 2.0]))


def test_validation_can_be_turned_off():
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        y = Mobius(3, radius=2.0)(torch.tensor([[0.0, 0.0, 2.5]]))
        assert y.shape == (1, 3)
    finally:
        torch.distributions.Distribution.set_default_validate_args(True)


def test_bad_parameters():
    with pytest.raises(ValueError, match="init"):
        Scale(3, init=0.0)
    with pytest.raises(ValueError, match="weight"):
        StiefelEmbedding(2, 3, weight=torch.eye(3))
    with pytest.raises(ValueError, match="weight"):
        Orthogonal(3, weight=torch.eye(2))
    with pytest.raises(TypeError, match="not a ConformalTransform"):
        ConformalEmbedding([ZeroPad(1, 2), torch.distributions.ExpTransform()])
    with pytest.raises(TypeError, match="not an InjectiveTransform"):
        ProductEmbedding([torch.distributions.ExpTransform()])
    with pytest.raises(ValueError, match="takes 2 features"):
        InjectiveCompose([ZeroPad(1, 3), ZeroPad(2, 3)])
    with pytest.raises(TypeError, match="not a torch Transform"):
        InjectiveCompose([ZeroPad(1, 3), "scale"])
