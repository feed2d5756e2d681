"""The atlas inside Pyro models (likelihood and prior) and the maximum-likelihood fit."""

import math

import _atlases as A
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from atlasdist import AtlasFlow
from atlasdist.training import fit


def circle_data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    angle = 0.5 * torch.randn(n, generator=gen, dtype=torch.float64) + 1.0
    return torch.stack([angle.cos(), angle.sin()], -1)


def test_svi_fits_an_atlas_likelihood_and_the_loss_falls():
    pyro.clear_param_store()
    torch.manual_seed(0)
    atlas = A.circle(0, scale=0.1)
    data = circle_data(512)

    def model(x):
        pyro.module("atlas", atlas)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", atlas.flow(), obs=x)

    def guide(x):
        pass

    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1 * len(data)


def test_atlas_as_a_prior_for_a_latent_variable():
    """z ~ atlas on S^2, y ~ N(z, 0.1^2 I); the guide is another atlas (pathwise rsample)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    prior = A.sphere(0)
    posterior = A.sphere(1)
    y = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)

    def model():
        z = pyro.sample("z", prior.flow())
        pyro.sample("y", dist.Normal(z, 0.1).to_event(1), obs=y)

    def guide():
        pyro.module("posterior", posterior)
        pyro.sample("z", posterior.flow())

    svi = SVI(
        model, guide, Adam({"lr": 0.01}), Trace_ELBO(num_particles=16, vectorize_particles=True)
    )
    losses = [svi.step() for _ in range(80)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    with torch.no_grad():
        z = posterior.flow().sample((2000,))
    # The posterior has moved towards the observation.
    assert float((z @ y).mean()) > 0.5


def test_fit_reduces_the_loss_and_is_reproducible():
    data = circle_data(1024)
    histories, states = [], []
    for _ in range(2):
        atlas = A.circle(0, scale=0.1)
        histories.append(
            fit(
                atlas,
                data,
                epochs=8,
                batch_size=128,
                lr=1e-2,
                seed=3,
                val_data=circle_data(256, 1),
                progress=False,
            )
        )
        states.append(atlas.state_dict())
    h = histories[0]
    assert h["loss"][-1] < h["loss"][0] - 0.1
    assert h["val_log_prob"][-1] > h["val_log_prob"][0]
    assert histories[0] == histories[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fit_says_why_when_data_are_off_the_support():
    atlas = A.circle(0)
    with pytest.raises((FloatingPointError, ValueError), match="support"):
        fit(atlas, 2 * circle_data(64), epochs=1, progress=False)


def test_fit_accepts_a_dataloader_and_learns_chart_geometry_with_noise():
    """Learnable circle charts fitted with the thickened likelihood move onto the data."""
    torch.manual_seed(0)
    poles = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    atlas = AtlasFlow.spheres(
        1,
        torch.zeros(2, 2),
        torch.ones(2),
        poles,
        learnable=True,
        hidden=(8,),
        layers=1,
        noise_scale=0.05,
    )
    data = 1.5 * circle_data(1024) + torch.tensor([0.3, -0.2], dtype=torch.float64)
    loader = torch.utils.data.DataLoader(data.float(), batch_size=128, shuffle=True)
    before = float(atlas.flow().distance_to_support(data.float()).mean())
    fit(atlas, loader, epochs=30, lr=2e-2, progress=False)
    after = float(atlas.flow().distance_to_support(data.float()).mean())
    assert after < 0.2 * before
