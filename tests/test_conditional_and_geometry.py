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
    ChartContext,
    ChartSpline,
    ChartSplineCoupling,
    ChartTable,
    Conditional,
    ConditionalCompose,
    Hypernet,
    InverseStereographic,
    Mobius,
    Orthogonal,
    Scale,
    Shift,
    Similarity,
    StiefelEmbedding,
    chart_affine_coupling,
    condition,
    householder_stiefel,
    indexed_matvec,
)

seeds = st.integers(0, 2**20)


def conditional_embedding(d, D, c, similarity=False):
    """Every conditionable conformal layer; with ``similarity``, a Similarity into R^(D+1)
    after them."""
    tail = [Conditional(Similarity, D, D + 1, context_features=c)] if similarity else []
    return ConditionalCompose(
        [
            Conditional(StiefelEmbedding, d, D, context_features=c),
            Conditional(Orthogonal, D, context_features=c),
            Conditional(Mobius, D, context_features=c, radius=4.0),
            Conditional(Scale, D, context_features=c),
            Conditional(Shift, D, context_features=c),
            *tail,
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


@given(seed=seeds, d=st.integers(1, 3), extra=st.integers(0, 2), charts=st.integers(1, 5))
def test_chart_context_equals_conditioning_each_row(seed, d, extra, charts):
    """Under a ChartContext (per-chart features computed once, gathered by index; frames
    applied by index) the layer equals the one conditioned on each row's features: values,
    log-dets, inverse and gradients."""
    gen = torch.Generator().manual_seed(seed)
    cond = randomize(conditional_embedding(d, d + extra, 3, True), gen, 0.5).double()
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64)
    index = torch.randint(charts, (7,), generator=gen)
    x = 0.5 * torch.randn(2, 7, d, generator=gen, dtype=torch.float64)
    by_chart = cond.condition(ChartContext(features, index))
    by_row = cond.condition(features[index])
    y, ladj = by_chart.call_and_ladj(x)
    y_row, ladj_row = by_row.call_and_ladj(x)
    torch.testing.assert_close(y, y_row)
    torch.testing.assert_close(ladj, ladj_row)
    torch.testing.assert_close(by_chart.inv(y), x)
    grads = torch.autograd.grad((y.sum() + ladj.sum()), list(cond.parameters()))
    grads_row = torch.autograd.grad((y_row.sum() + ladj_row.sum()), list(cond.parameters()))
    for g, h in zip(grads, grads_row, strict=True):
        torch.testing.assert_close(g, h)


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
    for layer in [Shift, Scale, Mobius]:
        torch.testing.assert_close(Conditional(layer, 3, context_features=2).condition(ctx)(x), x)
    pole = Conditional(InverseStereographic, 2, context_features=2).condition(ctx).pole
    torch.testing.assert_close(pole, torch.tensor([0.0, 0.0, 1.0]).expand(5, 3))


def test_chart_table_looks_up_per_chart_parameters():
    shifts = torch.tensor([[1.0, 0.0], [0.0, -2.0], [3.0, 3.0]])
    layer = Conditional(Shift, 2, table=ChartTable(shifts, learnable=False))
    charts = torch.tensor([2, 0, 1, 2])
    out = layer.condition(charts)(torch.zeros(4, 2))
    torch.testing.assert_close(out, shifts[charts])
    by_chart = layer.condition(ChartContext(torch.zeros(3, 1), charts))(torch.zeros(4, 2))
    torch.testing.assert_close(by_chart, shifts[charts])
    assert len(list(layer.parameters())) == 0
    assert len(list(Conditional(Shift, 2, table=ChartTable(shifts)).parameters())) == 1
    with pytest.raises(ValueError, match="gives 2 parameters"):
        Conditional(Scale, 2, table=ChartTable(shifts))
    with pytest.raises(TypeError, match="chart numbers"):
        layer.condition(torch.zeros(4, 3))


def test_hypernet_rejects_a_wrong_context():
    with pytest.raises(ValueError, match=r"context of shape \(\*, 3\)"):
        Conditional(Shift, 2, context_features=3).condition(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="context_features"):
        Hypernet(0, 3)
    with pytest.raises(ValueError, match="context_features"):
        Conditional(Shift, 2)
    with pytest.raises(ValueError, match="disagree"):
        ConditionalCompose(
            [Conditional(Shift, 2, context_features=3), Conditional(Scale, 2, context_features=4)]
        )


# -- geometry ---------------------------------------------------------------------------


@given(seed=seeds, d=st.integers(1, 4), extra=st.integers(0, 3))
def test_log_volume_ratio_of_a_linear_map(seed, d, extra):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d + extra, d, generator=gen, dtype=torch.float64)
    x = torch.randn(7, d, generator=gen, dtype=torch.float64)
    # 1/2 log det(A^T A) = sum log sigma_i, from the singular values (backward stable):
    # forming A^T A squares the condition number, and that reference drifted 1.4e-12 from the
    # exact value for a 2 x 2 A of condition 550. Both sides err by about eps * cond(A).
    sigma = torch.linalg.svdvals(a)
    expected = sigma.log().sum()
    atol = 16 * torch.finfo(torch.float64).eps * float(sigma[0] / sigma[-1])
    torch.testing.assert_close(
        log_volume_ratio(lambda v: v @ a.T, x), expected.expand(7), atol=atol, rtol=0
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


@given(
    seed=seeds,
    charts=st.integers(1, 6),
    rows=st.integers(0, 40),
    lead=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    transpose=st.booleans(),
    skew=st.booleans(),
)
def test_indexed_matvec_equals_the_gathered_product(seed, charts, rows, lead, transpose, skew):
    """W[index] x by tiles: values, reverse-mode gradients (w and x) and forward-mode
    derivatives equal the per-row gather, for balanced and one-chart-heavy indices, leading
    batch dimensions and empty batches."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(charts, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(charts, (rows,), generator=gen)
    if skew and rows:
        index[: (3 * rows) // 4] = 0
    x = torch.randn(*lead, rows, 5 if transpose else 3, generator=gen, dtype=torch.float64)
    x.requires_grad_()
    frames = w[index].mT if transpose else w[index]
    reference = (frames @ x.unsqueeze(-1)).squeeze(-1)
    got = indexed_matvec(w, index, x, transpose=transpose)
    torch.testing.assert_close(got, reference)
    cotangent = torch.randn(reference.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(got, (w, x), cotangent, allow_unused=True)
    expected = torch.autograd.grad(reference, (w, x), cotangent, allow_unused=True)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(e), e)
    tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    w0 = w.detach()
    jvp = torch.func.jvp(
        lambda v: indexed_matvec(w0, index, v, transpose), (x.detach(),), (tangent,)
    )
    frames0 = frames.detach()
    torch.testing.assert_close(jvp[1], (frames0 @ tangent.unsqueeze(-1)).squeeze(-1))


@given(seed=seeds, charts=st.integers(2, 5), rows=st.integers(2, 30))
def test_a_non_finite_row_reaches_only_its_own_charts_gradient(seed, charts, rows):
    """Rows padding a tile copy a row of the same chart: an infinite row spoils the gradient
    of its own chart's matrix only, not those of the other charts."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(charts, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(charts, (rows,), generator=gen)
    index[1] = (index[0] + 1) % charts  # another chart has rows too
    x = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    x[0] = math.inf
    y = indexed_matvec(w, index, x)
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(y), y, 0).sum(), w)
    finite = torch.isfinite(grad).flatten(1).all(-1)
    spoiled = torch.zeros(charts, dtype=torch.bool)
    spoiled[index[0]] = True
    assert torch.equal(finite, ~spoiled)


@given(seed=seeds, d=st.integers(1, 4), charts=st.integers(1, 5), lead=st.integers(0, 1))
def test_chart_aware_latent_flows_equal_row_wise_conditioning(seed, d, charts, lead):
    """ChartSpline (knots once per chart) and the ChartDenseNN coupling (chart part of the
    first layer once per chart) give the values and log-dets of conditioning each row on its
    chart's features."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts = [ChartSpline(d, 3, hidden=(8,), count_bins=4, bound=2.0)]
    if d > 1:
        parts.append(chart_affine_coupling(d, 3, hidden=(8,)))
        parts.append(ChartSplineCoupling(d, 3, hidden=(8,), count_bins=4, bound=2.0))
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64)
    index = torch.randint(charts, (6,), generator=gen)
    x = 1.5 * torch.randn(*([2] * lead), 6, d, generator=gen, dtype=torch.float64)
    for part in parts:
        randomize(part.double(), gen, 0.5)
        by_chart = condition(part, ChartContext(features, index))
        by_row = condition(part, features[index])
        y, y_row = by_chart(x), by_row(x)
        torch.testing.assert_close(y, y_row)
        ladj = by_chart.log_abs_det_jacobian(x, y)
        ladj_row = by_row.log_abs_det_jacobian(x, y_row)
        torch.testing.assert_close(ladj, ladj_row)
        torch.testing.assert_close(by_chart.inv(y), x)


def assert_same_maps_and_gradients(by_chart, by_row, x, params):
    """Two conditionings of one layer agree: values, log-dets, left inverse and the gradients
    of values plus log-dets with respect to ``params``."""
    y, y_row = by_chart(x), by_row(x)
    torch.testing.assert_close(y, y_row)
    ladj = by_chart.log_abs_det_jacobian(x, y)
    torch.testing.assert_close(ladj, by_row.log_abs_det_jacobian(x, y_row))
    torch.testing.assert_close(by_chart.inv(y), x)
    grads = torch.autograd.grad(y.sum() + ladj.sum(), params)
    y_row = by_row(x)
    grads_row = torch.autograd.grad(
        y_row.sum() + by_row.log_abs_det_jacobian(x, y_row).sum(), params
    )
    for g, h in zip(grads, grads_row, strict=True):
        torch.testing.assert_close(g, h)


@given(seed=seeds, d=st.integers(1, 4), charts=st.integers(1, 5), inputs=st.integers(1, 3))
def test_chart_context_with_per_row_inputs_equals_row_wise_conditioning(seed, d, charts, inputs):
    """A ChartContext with per-row inputs e (an atlas modelling p(x | c)) conditions every
    chart-aware latent-flow layer on [v_k, e] for each row: ChartSpline, the ChartDenseNN
    coupling and a hypernet-conditioned layer give the values, log-dets, inverse and gradients
    (parameters, chart features and inputs) of conditioning each row on that concatenation."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    width = 3 + inputs
    parts = [
        ChartSpline(d, width, hidden=(8,), count_bins=4, bound=2.0),
        Conditional(Shift, d, context_features=width, hidden=(4,)),
    ]
    if d > 1:
        parts.append(chart_affine_coupling(d, width, hidden=(8,)))
        parts.append(ChartSplineCoupling(d, width, hidden=(8,), count_bins=4, bound=2.0))
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64)
    index = torch.randint(charts, (6,), generator=gen)
    e = torch.randn(6, inputs, generator=gen, dtype=torch.float64)
    features.requires_grad_()
    e.requires_grad_()
    context = ChartContext(features, index, e)
    assert context.rows().shape == (6, width) and not context.per_chart
    x = 1.5 * torch.randn(6, d, generator=gen, dtype=torch.float64)
    for part in parts:
        randomize(part.double(), gen, 0.5)
        by_chart = condition(part, context)
        by_row = condition(part, torch.cat([features[index], e], -1))
        assert_same_maps_and_gradients(by_chart, by_row, x, [*part.parameters(), features, e])


def test_chart_dense_nn_rejects_a_context_of_the_wrong_width():
    coupling = chart_affine_coupling(2, 4, hidden=(8,))
    context = ChartContext(torch.randn(3, 3), torch.tensor([0, 2]), torch.randn(2, 2))
    with pytest.raises(ValueError, match="ChartDenseNN: the network takes a context of 4"):
        condition(coupling, context)(torch.randn(2, 2))


@given(seed=seeds, charts=st.integers(2, 6), similarity=st.booleans())
def test_training_runs_the_hypernets_for_the_charts_in_use_only(seed, charts, similarity):
    """With gradients on, a hypernet-conditioned embedding under a ChartContext runs every
    hypernet on the distinct charts of its rows only (chart ``charts - 1`` is never used);
    values, log-dets, the left inverse and the gradients (parameters and chart features) equal
    conditioning each row on its chart's features. Without gradients all K charts run (the
    rows the evaluation cache keeps)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    emb = conditional_embedding(2, 3, 3, similarity=similarity)
    randomize(emb.double(), gen, 0.3)
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(charts - 1, (5,), generator=gen)
    used = int(index.unique().numel())
    rows_seen = []
    hypernets = [m for m in emb.modules() if isinstance(m, Hypernet)]
    hooks = [
        h.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0])) for h in hypernets
    ]
    by_chart = condition(emb, ChartContext(features, index))
    assert rows_seen == [used] * len(hypernets)
    with torch.no_grad():
        rows_seen.clear()
        condition(emb, ChartContext(features, index))
        assert rows_seen == [charts] * len(hypernets)
    for hook in hooks:
        hook.remove()
    by_row = condition(emb, features[index])
    x = 0.5 * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    assert_same_maps_and_gradients(by_chart, by_row, x, [*emb.parameters(), features])


class _FeatureRows(torch.overrides.TorchFunctionMode):
    """Records the rows of every chart-feature table a layer computes from: inputs to any
    linear map with the features' width (3), which only the per-chart terms have here."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and args[0].shape[-1] == 3:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _chart_aware_latent_layers(d: int) -> list:
    """The chart-aware latent-flow layers on R^d for 3 chart features: ChartSpline, and for
    d > 1 the affine and spline couplings (their ChartDenseNN computes the chart part)."""
    parts = [ChartSpline(d, 3, hidden=(8,), count_bins=4, bound=2.0)]
    if d > 1:
        parts.append(chart_affine_coupling(d, 3, hidden=(8,)))
        parts.append(ChartSplineCoupling(d, 3, hidden=(8,), count_bins=4, bound=2.0))
    return parts


@given(seed=seeds, d=st.integers(1, 4), charts=st.integers(2, 6))
def test_training_computes_the_latent_flows_chart_terms_for_the_charts_in_use_only(
    seed, d, charts
):
    """With gradients on, the chart-aware latent-flow layers (ChartSpline's knots, the chart
    part of the ChartDenseNN in the affine and spline couplings) compute what depends on the
    chart for the distinct charts of the rows only (chart ``charts - 1`` is never used), and
    equal conditioning each row on its chart's features: values, log-dets, inverse and
    gradients (parameters and chart features). Without gradients all K charts run (the rows
    the evaluation cache keeps)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts = _chart_aware_latent_layers(d)
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(charts - 1, (7,), generator=gen)
    used = int(index.unique().numel())
    x = 1.5 * torch.randn(7, d, generator=gen, dtype=torch.float64)
    for part in parts:
        randomize(part.double(), gen, 0.5)
        with _FeatureRows() as seen:
            by_chart = condition(part, ChartContext(features, index))
            by_chart(x)  # a coupling computes its chart part when it runs
        assert seen.rows == [used]
        with torch.no_grad(), _FeatureRows() as seen:
            condition(part, ChartContext(features, index))(x)
        assert seen.rows == [charts]
        by_row = condition(part, features[index])
        assert_same_maps_and_gradients(by_chart, by_row, x, [*part.parameters(), features])


@given(seed=seeds, d=st.integers(1, 4), charts=st.integers(2, 6))
def test_a_subset_of_rows_keeps_the_charts_of_all_rows(seed, d, charts):
    """ChartContext.subset(rows): with gradients on, the layers conditioned on it compute their
    per-chart quantities for the charts of all the rows (here one more than the subset uses),
    and give on those rows bitwise the values and log-dets of the layers conditioned on the
    whole context (an atlas's exact density runs its flows on some pairs and keeps the values
    of evaluating every pair)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parts = _chart_aware_latent_layers(d)
    features = torch.randn(charts, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.cat([torch.randint(charts - 1, (6,), generator=gen), torch.tensor([charts - 1])])
    rows = (index != charts - 1).nonzero().squeeze(-1)  # every row but the last chart's
    everything = ChartContext(features, index)
    used = int(index.unique().numel())
    x = 1.5 * torch.randn(7, d, generator=gen, dtype=torch.float64)
    for part in parts:
        randomize(part.double(), gen, 0.5)
        whole = condition(part, everything)
        with _FeatureRows() as seen:
            some = condition(part, everything.subset(rows))
            y = some(x[rows])
        assert seen.rows == [used]
        y_whole = whole(x)
        assert torch.equal(y, y_whole[rows])
        assert torch.equal(
            some.log_abs_det_jacobian(x[rows], y),
            whole.log_abs_det_jacobian(x, y_whole)[rows],
        )


def test_distinct_charts_follow_an_index_changed_in_place():
    """ChartContext.distinct() is computed once per context, and again after its index is
    changed in place: a reused context never conditions on stale charts."""
    context = ChartContext(torch.randn(5, 3), torch.tensor([4, 1, 4]))
    used, position = context.distinct()
    assert used.tolist() == [1, 4] and position.tolist() == [1, 0, 1]
    assert context.distinct()[0] is used  # memoized
    context.index.copy_(torch.tensor([0, 2, 3]))
    used, position = context.distinct()
    assert used.tolist() == [0, 2, 3] and position.tolist() == [0, 1, 2]


def test_chart_dense_nn_broadcasts_one_context_row_over_the_rows():
    """A chart context of one row conditions every row of x (the chart part of the first
    layer broadcasts), with and without gradients, like the plain network on that row."""
    torch.manual_seed(0)
    coupling = chart_affine_coupling(4, 3, hidden=(8,))
    features = torch.randn(3, 3)
    x = torch.randn(5, 4)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = condition(coupling, ChartContext(features, torch.tensor([2])))(x)
            y_row = condition(coupling, features[2].expand(5, 3))(x)
        torch.testing.assert_close(y, y_row)
