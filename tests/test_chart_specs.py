"""Properties every chart spec must have (one registry, ``_atlases.CHART_SPECS``): per-chart
work under a ChartContext equals conditioning each row on its own chart; the closed-form
volume term of every chart matches automatic differentiation; the left inverse undoes the
chart; an atlas of the spec has the exact density of its charts; specs stack."""

import _atlases as A
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atlasdist import AtlasFlow, ChartMembership
from atlasdist.charts import ChartStack
from atlasdist.geometry import log_volume_ratio
from atlasdist.transforms import ChartContext

names = st.sampled_from(sorted(A.CHART_SPECS))
seeds = st.integers(0, 2**20)


FEATURES = 3  # the width of chart features the registry's specs take


def features_for(spec, gen):
    return torch.randn(spec.num_charts, FEATURES, generator=gen, dtype=torch.float64)


def latent(spec, rows, gen):
    return 0.7 * torch.randn(rows, spec.in_features, generator=gen, dtype=torch.float64)


@given(name=names, seed=seeds, charts=st.integers(1, 4))
def test_each_row_uses_its_own_chart(name, seed, charts):
    """Evaluated for a batch of rows with mixed charts, every row gets exactly what its chart
    alone gives (values, volume terms, left inverse)."""
    spec = A.CHART_SPECS[name](charts, seed)
    gen = torch.Generator().manual_seed(seed)
    features = features_for(spec, gen)
    index = torch.randint(charts, (9,), generator=gen)
    u = latent(spec, 9, gen)
    emb = spec.embedding(ChartContext(features, index))
    x, ladj = emb.call_and_ladj(u)
    assert x.shape == (9, spec.out_features) and ladj.shape == (9,)
    for i in range(9):
        alone = spec.embedding(ChartContext(features, index[i : i + 1]))
        xi, li = alone.call_and_ladj(u[i : i + 1])
        torch.testing.assert_close(x[i : i + 1], xi)
        torch.testing.assert_close(ladj[i : i + 1], li)
    torch.testing.assert_close(emb.inv(x), u, atol=1e-9, rtol=1e-9)


@given(name=names, seed=seeds, charts=st.integers(1, 3))
def test_closed_form_volume_term_of_every_chart_matches_autodiff(name, seed, charts):
    spec = A.CHART_SPECS[name](charts, seed)
    gen = torch.Generator().manual_seed(seed)
    features = features_for(spec, gen)
    for k in range(charts):
        emb = spec.embedding(ChartContext(features, torch.full((6,), k)))
        u = latent(spec, 6, gen)
        _, ladj = emb.call_and_ladj(u)
        one = spec.embedding(ChartContext(features, torch.full((1,), k)))
        reference = log_volume_ratio(lambda v, f=one: f(v.unsqueeze(0))[0], u)
        torch.testing.assert_close(ladj, reference, atol=1e-9, rtol=0)


@given(name=names, seed=seeds)
def test_single_chart_atlas_has_the_change_of_variables_density(name, seed):
    """An atlas of one chart of the spec: log p(g(z)) = log q(h^{-1}) - volume term of g, the
    volume term by automatic differentiation of the whole chart map."""
    spec = A.CHART_SPECS[name](1, seed)
    gen = torch.Generator().manual_seed(seed)
    context = features_for(spec, gen)
    atlas = AtlasFlow(
        spec.out_features, spec.in_features, spec, context=context, hidden=(8,), layers=1
    )
    atlas = A.randomize_flows(atlas.double(), seed, 0.2)
    p = atlas(validate_args=True)
    z = latent(spec, 8, gen)
    k = torch.zeros(8, dtype=torch.long)
    x = p.decode(z, k)
    volume = log_volume_ratio(lambda w: p.decode(w.unsqueeze(0), k[:1])[0], z)
    expected = p.base.log_prob(z) - volume
    torch.testing.assert_close(p.log_prob(x), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("second", sorted(A.CHART_SPECS))
def test_specs_of_one_dimension_stack(second):
    """A stack of two kinds of chart (same d and D) acts as each kind on its own rows."""
    first = A.CHART_SPECS["PlaneCharts"](2, 0)
    other = A.CHART_SPECS[second](3, 1)
    if (other.in_features, other.out_features) != (first.in_features, first.out_features):
        first = A.CHART_SPECS[second](2, 0)
    stack = ChartStack([first, other])
    assert stack.num_charts == 5
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5, FEATURES, generator=gen, dtype=torch.float64)
    index = torch.tensor([4, 0, 2, 1, 3, 4, 0])
    u = latent(first, 7, gen)
    x, ladj = stack.embedding(ChartContext(features, index)).call_and_ladj(u)
    for i, k in enumerate(index.tolist()):
        spec, local = (first, k) if k < 2 else (other, k - 2)
        rows = features[:2] if k < 2 else features[2:]
        alone = spec.embedding(ChartContext(rows, torch.tensor([local])))
        xi, li = alone.call_and_ladj(u[i : i + 1])
        torch.testing.assert_close(x[i : i + 1], xi)
        torch.testing.assert_close(ladj[i : i + 1], li)
    atlas = AtlasFlow(
        first.out_features,
        first.in_features,
        [first, other],
        context=features,
        membership=ChartMembership(m=5),
    ).double()
    assert atlas.num_charts == 5 and atlas().sample((4,)).shape == (4, first.out_features)
