"""Chart conditioning (one parameter set per context row) and the autodiff geometry reference."""

import math

import pytest
import torch
from _cases import randomize
from hypothesis import given
from hypothesis import strategies as st

from atlasdist.geometry import (
    batched_jacobian,
    jacobian,
    log_volume_ratio,
    manifold_log_volume_ratio,
    tangent_frame,
)
from atlasdist.transforms import (
    ChartTable,
    ConditionalConformalEmbedding,
    ConditionalInverseStereographic,
    ConditionalMobius,
    ConditionalOrthogonal,
    ConditionalScale,
    ConditionalShift,
    ConditionalStiefelEmbedding,
    Hypernet,
    householder_stiefel,
)

seeds = st.integers(0, 2**20)


def conditional_embedding(d, D, c):
    return ConditionalConformalEmbedding(
        [
            ConditionalStiefelEmbedding(d, D, c),
            ConditionalOrthogonal(D, c),
            ConditionalMobius(D, c, radius=4.0),
            ConditionalScale(D, c),
            ConditionalShift(D, c),
        ]
    )


@given(seed=seeds, d=st.integers(1, 3), extra=st.integers(0, 2), rows=st.integers(1, 6))
def test_batched_contexts_act_row_wise(seed, d, extra, rows):
    """Conditioning on B contexts at once equals conditioning on each row alone, for inputs
    (B, d) and (S, B, d); log-dets per row match the autodiff reference."""
    gen = torch.Generator().manual_seed(seed)
    cond = randomize(conditional_embedding(d, d + extra, 3), gen, 0.5).double()
    ctx = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    x = 0.5 * torch.randn(2, rows, d, generator=gen, dtype=torch.float64)
    y, ladj = cond.condition(ctx).call_and_ladj(x)
    assert y.shape == (2, rows, d + extra) and ladj.shape == (2, rows)
    for i in range(rows):
        single = cond.condition(ctx[i])
        yi, li = single.call_and_ladj(x[:, i])
        torch.testing.assert_close(y[:, i], yi)
        torch.testing.assert_close(ladj[:, i], li)
        torch.testing.assert_close(li, log_volume_ratio(single, x[:, i]), atol=1e-10, rtol=0)
    torch.testing.assert_close(cond.condition(ctx).inv(y), x)


@given(seed=seeds, rows=st.integers(2, 9), cols=st.integers(1, 9))
def test_householder_stiefel_is_orthonormal_for_any_raw_values(seed, rows, cols):
    cols = min(rows, cols)
    gen = torch.Generator().manual_seed(seed)
    n = sum(rows - 1 - j for j in range(cols))
    raw = 10 * torch.randn(4, n, generator=gen, dtype=torch.float64)
    w = householder_stiefel(raw, rows, cols)
    torch.testing.assert_close(w.mT @ w, torch.eye(cols, dtype=torch.float64).expand(4, -1, -1))
    at_zero = householder_stiefel(torch.zeros(n, dtype=torch.float64), rows, cols)
    torch.testing.assert_close(at_zero, torch.eye(rows, cols, dtype=torch.float64))


def test_conditional_layers_start_at_a_fixed_map():
    ctx = torch.randn(5, 2)
    x = torch.randn(5, 3)
    for layer in [ConditionalShift(3, 2), ConditionalScale(3, 2), ConditionalMobius(3, 2)]:
        torch.testing.assert_close(layer.condition(ctx)(x), x)
    pole = ConditionalInverseStereographic(2, 2).condition(ctx).pole
    torch.testing.assert_close(pole, torch.tensor([0.0, 0.0, 1.0]).expand(5, 3))


def test_chart_table_looks_up_per_chart_parameters():
    shifts = torch.tensor([[1.0, 0.0], [0.0, -2.0], [3.0, 3.0]])
    layer = ConditionalShift(2, 3, hypernet=ChartTable(shifts, learnable=False))
    onehot = torch.eye(3)[torch.tensor([2, 0, 1, 2])]
    out = layer.condition(onehot)(torch.zeros(4, 2))
    torch.testing.assert_close(out, shifts[torch.tensor([2, 0, 1, 2])])
    assert len(list(layer.parameters())) == 0
    assert len(list(ConditionalShift(2, 3, hypernet=ChartTable(shifts)).parameters())) == 1
    with pytest.raises(ValueError, match="gives 2 parameters"):
        ConditionalScale(2, 3, hypernet=ChartTable(shifts))
    with pytest.raises(ValueError, match="one-hot context"):
        layer.condition(torch.zeros(4, 2))


def test_hypernet_rejects_a_wrong_context():
    with pytest.raises(ValueError, match=r"context of shape \(\*, 3\)"):
        ConditionalShift(2, 3).condition(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="context_features"):
        Hypernet(0, 3)
    with pytest.raises(ValueError, match="disagree"):
        ConditionalConformalEmbedding([ConditionalShift(2, 3), ConditionalScale(2, 4)])


# -- geometry ---------------------------------------------------------------------------


@given(seed=seeds, d=st.integers(1, 4), extra=st.integers(0, 3))
def test_log_volume_ratio_of_a_linear_map(seed, d, extra):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d + extra, d, generator=gen, dtype=torch.float64)
    x = torch.randn(7, d, generator=gen, dtype=torch.float64)
    expected = 0.5 * torch.linalg.slogdet(a.T @ a).logabsdet
    torch.testing.assert_close(
        log_volume_ratio(lambda v: v @ a.T, x), expected.expand(7), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(jacobian(lambda v: v @ a.T, x), a.expand(7, -1, -1))
    torch.testing.assert_close(batched_jacobian(lambda v: v @ a.T, x), a.expand(7, -1, -1))


def test_log_volume_ratio_rejects_a_dimension_drop():
    with pytest.raises(ValueError, match="raise or keep"):
        log_volume_ratio(lambda v: v[..., :1], torch.zeros(3, 2))


def sphere_projection(v):
    return v / v.norm(dim=-1, keepdim=True)


@given(seed=seeds, n=st.integers(2, 5))
def test_tangent_frame_of_the_sphere(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = sphere_projection(torch.randn(6, n, generator=gen, dtype=torch.float64))
    t = tangent_frame(sphere_projection, x, n - 1)
    torch.testing.assert_close(t.mT @ t, torch.eye(n - 1, dtype=torch.float64).expand(6, -1, -1))
    torch.testing.assert_close(
        (t.mT @ x.unsqueeze(-1)).squeeze(-1), torch.zeros(6, n - 1).double()
    )


@given(seed=seeds, n=st.integers(2, 5))
def test_manifold_volume_ratio_of_the_normalized_linear_map(seed, n):
    """f(x) = Mx/|Mx| on S^(n-1): R_f(x) = |det M| / |Mx|^n (reference/003); a rotation has
    ratio one."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64) + 2 * torch.eye(n).double()
    x = sphere_projection(torch.randn(6, n, generator=gen, dtype=torch.float64))
    got = manifold_log_volume_ratio(
        lambda v: sphere_projection(v @ m.T), x, sphere_projection, n - 1
    )
    expected = torch.linalg.slogdet(m).logabsdet - n * (x @ m.T).norm(dim=-1).log()
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    q, _ = torch.linalg.qr(m)
    rot = manifold_log_volume_ratio(lambda v: v @ q.T, x, sphere_projection, n - 1)
    torch.testing.assert_close(rot, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    assert math.isfinite(float(got.sum()))
