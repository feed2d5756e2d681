"""Properties every injective / conformal transform must have (DESIGN.md section 4)."""

import pytest
import torch
from _cases import CASES, CONFORMAL, build, draw_inputs, randomize
from hypothesis import given
from hypothesis import strategies as st

import atlasdist.transforms.spline as spline_module
from atlasdist import LearnedCharts
from atlasdist._checks import no_validation
from atlasdist.geometry import jacobian, log_volume_ratio
from atlasdist.transforms import (
    ChartContext,
    ConformalEmbedding,
    ConformalTransform,
    InverseStereographic,
    Mobius,
    Scale,
    Shift,
)

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


def _check_inverse_and_error(f, y, params=()):
    """inverse_and_error equals the left inverse, the distance to the reconstruction and the
    volume term at the inverse, in value and in gradient (inputs and parameters)."""
    y = y.detach().clone().requires_grad_()
    x, error, ladj = f.inverse_and_error(y)
    ref_x = f.inv(y)
    recon, ref_ladj = f.call_and_ladj(ref_x)
    ref_error = (recon - y).norm(dim=-1)
    assert x.shape == ref_x.shape and error.shape == ladj.shape == ref_error.shape
    torch.testing.assert_close(x, ref_x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(error, ref_error, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ladj, ref_ladj, atol=1e-10, rtol=1e-10)
    wrt = [y, *params]
    w = torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)

    def loss(x, error, ladj):  # the squared distance: the norm has no gradient at 0
        return (x * w).sum() + error.square().sum() + ladj.sum()

    _assert_same_gradients(loss(x, error, ladj), loss(ref_x, ref_error, ref_ladj), wrt, 1e-9)


def _assert_same_gradients(value, reference, wrt, tol):
    grads = torch.autograd.grad(value, wrt, allow_unused=True, retain_graph=True)
    # The graph is kept: a conditioned layer's per-chart terms are shared by later checks.
    expected = torch.autograd.grad(reference, wrt, allow_unused=True, retain_graph=True)
    for g, e in zip(grads, expected, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, atol=tol, rtol=tol)


def _check_repeats(f, y, repeats, params=()):
    """inverse_and_error(y, repeats) equals inverse_and_error of the repeated rows, in value
    and in gradient (inputs and parameters)."""
    y = y.detach().clone().requires_grad_()
    out = f.inverse_and_error(y, repeats=repeats)
    ref = f.inverse_and_error(y.repeat_interleave(repeats, -2))
    for a, b in zip(out, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    wrt = [y, *params]
    w = torch.linspace(0.5, 1.5, out[0].shape[-1], dtype=y.dtype)

    def loss(x, error, ladj):
        return (x * w).sum() + error.square().sum() + ladj.sum()

    _assert_same_gradients(loss(*out), loss(*ref), wrt, 1e-10)


@given(name=names, d=dims, extra=extras, seed=seeds)
def test_inverse_and_error_matches_the_reconstruction(name, d, extra, seed):
    """Points on the image (distance 0) and off it; rows given once for several pairs
    (``repeats``) give what the repeated rows give."""
    f = build(name, d, extra, seed)
    y = f(draw_inputs(f, (12,), seed)).detach()
    gen = torch.Generator().manual_seed(seed + 2)
    off = y + 0.3 * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    params = [p for p in getattr(f, "parameters", list)() if p.requires_grad]
    _check_inverse_and_error(f, torch.cat([y, off]), params)
    _check_repeats(f, torch.cat([y, off]), 1 + seed % 3, params)


def test_inverse_and_error_broadcasts_batched_parameters_like_the_inverse():
    gen = torch.Generator().manual_seed(0)
    f = ConformalEmbedding(
        [
            InverseStereographic(2),
            Scale(3, log_scale=torch.randn(4, generator=gen, dtype=torch.float64)),
            Shift(3, shift=torch.randn(4, 3, generator=gen, dtype=torch.float64)),
        ]
    )
    for y in (torch.randn(3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)):
        _check_inverse_and_error(f, y)


def test_indexed_chart_inverse_and_error_under_vmap():
    """The distance of a learned chart under vmap over the chart features (no in-place
    product on an unbatched buffer)."""
    gen = torch.Generator().manual_seed(0)
    spec = randomize(LearnedCharts(3, 2, 5, 3, hidden=(4,)).double(), gen, 0.5)
    index = torch.tensor([0, 2, 2, 1])
    y = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    features = torch.randn(6, 3, 3, generator=gen, dtype=torch.float64)

    def error(f):
        return spec.embedding(ChartContext(f, index)).inverse_and_error(y)[1]

    with torch.no_grad(), no_validation():  # value checks are control flow, not vmap-able
        batched = torch.func.vmap(error)(features)
        expected = torch.stack([error(f) for f in features])
    torch.testing.assert_close(batched, expected)


@given(
    seed=seeds,
    d=st.integers(1, 3),
    extra=st.integers(1, 4),
    charts=st.integers(1, 5),
    points=st.integers(1, 20),
    repeats=st.integers(1, 4),
)
def test_indexed_chart_inverse_and_error_matches_the_reconstruction(
    seed, d, extra, charts, points, repeats
):
    """The learned charts' embedding under a chart index: the distance is computed in the
    tiles of rows grouped by chart (both tile layouts occur), never by reconstruction; a point
    given once for its ``repeats`` pairs (an atlas's candidate charts) is read in place, with
    the values and gradients of the repeated rows."""
    gen = torch.Generator().manual_seed(seed)
    spec = randomize(LearnedCharts(charts, d, d + extra, 3, hidden=(4,)).double(), gen, 0.5)
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64)
    index = torch.randint(0, charts, (points * repeats,), generator=gen)
    f = spec.embedding(ChartContext(features, index))
    on = f(0.8 * torch.randn(points * repeats, d, generator=gen, dtype=torch.float64))
    y = on.detach()[::repeats]  # each point on the image of its first pair's chart
    offset = 0.3 * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    y = y + offset * (torch.arange(points) % 2).unsqueeze(-1)
    params = list(spec.parameters())
    _check_inverse_and_error(f, y.repeat_interleave(repeats, 0), params)
    _check_repeats(f, y, repeats, params)
    with pytest.raises(ValueError, match="repeats"):
        f.inverse_and_error(y, repeats=0)
    if repeats > 1:
        with pytest.raises(ValueError, match="indices"):
            f.inverse_and_error(y[:-1], repeats=repeats)


@given(
    seed=seeds,
    D=st.integers(1, 4),
    log_size=st.floats(-1.0, 1.0),
    log_gap=st.floats(-3.0, -1.0),
)
def test_mobius_is_accurate_in_float32_near_its_pole(seed, D, log_size, log_gap):
    """sigma_b(x) = | |b| x - b/|b| |^2 is of size gap^2 at relative distance gap from the pole
    b/|b|^2; its expanded form 1 - 2 b.x + |b|^2|x|^2 cancels to zero in float32 there (a
    learned chart then returned NaN for data beside its pole). The float32 map must match
    float64 to relative round-off over its own inputs."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    b = b / b.norm() * 10**log_size
    v = torch.randn(16, D, generator=gen, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    pole = b / b.pow(2).sum()
    # relative distance 10**log_gap in every direction (scaling pole's coordinates one by one
    # instead put a point 1e-3 away only 5e-5 away when a coordinate of the pole is ~0)
    x32 = (pole + 10**log_gap * pole.norm() * v).float()
    b32 = b.float()
    x, bb = x32.double(), b32.double()  # float64 reference on the same (rounded) inputs
    sigma = (bb.norm() * x - bb / bb.norm()).pow(2).sum(-1)
    # round-off in b.x and in x_perp is about 1e-7 |b||x| = 1e-7; sigma ~ gap^2
    rel = (Mobius._sigma(b32, x32).double() - sigma).abs() / sigma
    assert rel.max() < 20 * 1.2e-7 / 10**log_gap
    f32, f64 = Mobius(D, raw=b32), Mobius(D, raw=bb)
    y32, y64 = f32(x32).double(), f64(x)
    assert ((y32 - y64).norm(dim=-1) / y64.norm(dim=-1)).max() < 20 * 1.2e-7 / 10**log_gap
    # both branches of the stable form are the same function: float64 against the expansion
    far = torch.randn(16, D, generator=gen, dtype=torch.float64)
    for pts in (x, far):
        expanded = 1 - 2 * (bb * pts).sum(-1) + bb.pow(2).sum() * pts.pow(2).sum(-1)
        torch.testing.assert_close(Mobius._sigma(bb, pts), expanded, atol=1e-12, rtol=1e-6)


def test_mobius_gradient_at_the_identity():
    """b = 0 (the identity, the learned charts' initial bend): d/db log lambda = 2x."""
    f = Mobius(3)
    x = torch.randn(5, 3, dtype=torch.float64)
    f.double()
    f.log_conformal_factor(x, f(x)).sum().backward()
    torch.testing.assert_close(f.raw.grad, 2 * x.sum(0))


@given(seed=seeds, bins=st.integers(1, 20))
def test_spline_softmax_matches_torch(seed, bins):
    """The spline knots' softmax (plain passes below 16 bins on CPU, where torch's kernel is
    slow) is torch's softmax: values and gradients, large logits included (no overflow)."""
    gen = torch.Generator().manual_seed(seed)
    for scale in (1e-3, 1.0, 30.0, 200.0):
        for dtype in (torch.float32, torch.float64):
            x = (scale * torch.randn(3, 5, bins, generator=gen, dtype=torch.float64)).to(dtype)
            w = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
            ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
            out, expected = spline_module._softmax(ours), torch.softmax(ref, -1)
            # Both round to a few ulps of the largest term: of 1 for the values, of max |w|
            # for the gradients s * (w - sum(s w)), which cancel where one probability is ~1.
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(out, expected, rtol=8 * eps, atol=8 * eps)
            (out * w).sum().backward()
            (expected * w).sum().backward()
            atol = 8 * eps * float(w.abs().max())
            torch.testing.assert_close(ours.grad, ref.grad, rtol=8 * eps, atol=atol)


def test_spline_called_first_without_gradients_still_gives_them_later():
    """A spline keeps its packed bin table; one packed under no_grad must not serve a later
    call with gradients on (the knots' gradient would silently be missing)."""
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randn(1, 3, n, generator=gen, dtype=torch.float64) for n in (8, 8, 7)]
    raw[0].requires_grad_()
    f = spline_module.RationalQuadraticSpline.from_parameters(*raw, bound=3.0)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f(x)
    y = f(x)
    assert y.requires_grad
    y.sum().backward()
    fresh = raw[0].detach().clone().requires_grad_()
    spline_module.RationalQuadraticSpline.from_parameters(fresh, *raw[1:], bound=3.0)(
        x
    ).sum().backward()
    torch.testing.assert_close(raw[0].grad, fresh.grad, rtol=0, atol=0)


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
