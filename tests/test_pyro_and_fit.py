"""The atlas inside Pyro models (likelihood and prior); fit() is tested in test_fit.py."""

import math

import _atlases as A
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam


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
