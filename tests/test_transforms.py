"""Properties every injective / conformal transform must have (DESIGN.md section 4)."""

import pytest
import torch
from _cases import CASES, CONFORMAL, build, draw_inputs
from hypothesis import given
from hypothesis import strategies as st

from atlasdist.geometry import jacobian, log_volume_ratio
from atlasdist.transforms import ConformalTransform

names = st.sampled_from(sorted(CASES))
dims = st.integers(1, 4)
extras = st.integers(0, 3)
seeds = st.integers(0, 2**20)
batch_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple)


@given(name=names, d=dims, extra=extras, seed=seeds)
def test_left_inverse_and_image_round_trip(name, d, extra, seed):
    f = build(name, d, extra, seed)
    x = draw_inputs(f, (16,), seed)
    y = f(x)
    torch.testing.assert_close(f.inv(y), x, atol=1e-9, rtol=1e-9)
    # g(f(y)) == y for y on the image
    torch.testing.assert_close(f(f.inv(y)), y, atol=1e-9, rtol=1e-9)


@given(name=names, d=dims, extra=extras, seed=seeds)
def test_closed_form_volume_term_matches_autodiff(name, d, extra, seed):
    f = build(name, d, extra, seed)
    x = draw_inputs(f, (16,), seed)
    y, ladj = f.call_and_ladj(x)
    reference = log_volume_ratio(f, x)
    assert ladj.shape == reference.shape == (16,)
    assert (ladj - reference).abs().max() <= 1e-8
    # The two-argument form agrees with the one-pass form.
    torch.testing.assert_close(f.log_abs_det_jacobian(x, y), ladj, atol=1e-12, rtol=0)


@given(name=st.sampled_from(sorted(CONFORMAL)), d=dims, extra=extras, seed=seeds)
def test_conformal_gram_is_lambda_squared_identity(name, d, extra, seed):
    f = build(name, d, extra, seed)
    assert isinstance(f, ConformalTransform)
    x = draw_inputs(f, (8,), seed)
    jac = jacobian(f, x)
    gram = jac.mT @ jac
    lam2 = (2 * f.log_conformal_factor(x, f(x))).exp()
    eye = torch.eye(f.in_features, dtype=x.dtype)
    torch.testing.assert_close(gram, lam2[:, None, None] * eye, atol=1e-9, rtol=1e-9)


@given(name=names, d=dims, extra=extras, seed=seeds, batch_shape=batch_shapes)
def test_shapes(name, d, extra, seed, batch_shape):
    f = build(name, d, extra, seed)
    x = draw_inputs(f, batch_shape, seed)
    y, ladj = f.call_and_ladj(x)
    assert y.shape == batch_shape + (f.out_features,)
    assert ladj.shape == batch_shape
    assert f.inv(y).shape == x.shape
    assert tuple(f.forward_shape(x.shape)) == y.shape
    assert tuple(f.inverse_shape(y.shape)) == x.shape


@given(name=names, d=dims, extra=extras, seed=seeds)
def test_float32_preserved_and_close_to_float64(name, d, extra, seed):
    f64 = build(name, d, extra, seed)
    f32 = build(name, d, extra, seed, dtype=torch.float32)
    x = draw_inputs(f64, (8,), seed)
    y64, l64 = f64.call_and_ladj(x)
    y32, l32 = f32.call_and_ladj(x.float())
    assert y32.dtype == l32.dtype == f32.inv(y32).dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l32.double(), l64, atol=1e-4, rtol=1e-4)


@given(name=names, d=dims, extra=extras, seed=seeds)
def test_gradients_are_finite(name, d, extra, seed):
    f = build(name, d, extra, seed)
    x = draw_inputs(f, (8,), seed).requires_grad_()
    y, ladj = f.call_and_ladj(x)
    (y.sum() + ladj.sum() + f.inv(y).pow(2).sum()).backward()
    assert torch.isfinite(x.grad).all()
    params = [p for p in getattr(f, "parameters", lambda: [])() if p.grad is not None]
    for p in params:
        assert torch.isfinite(p.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_cpu(name):
    f = build(name, 2, 2, seed=0)
    x = draw_inputs(f, (32,), 0)
    y, ladj = f.call_and_ladj(x)
    g = build(name, 2, 2, seed=0, device="cuda")
    yc, lc = g.call_and_ladj(x.cuda())
    assert yc.device.type == lc.device.type == "cuda"
    torch.testing.assert_close(yc.cpu(), y)
    torch.testing.assert_close(lc.cpu(), ladj)
    torch.testing.assert_close(g.inv(yc).cpu(), x)
