"""Every transform of the library, built with random parameters: one list, tested by one set of
property tests (a new transform is tested by adding one line here)."""

from __future__ import annotations

import pyro.distributions.transforms as pyro_t
import torch
from torch import nn

from atlasdist.transforms import (
    ChartSpline,
    ChartSplineCoupling,
    Conditional,
    ConditionalCompose,
    ConformalEmbedding,
    InjectiveCompose,
    InverseStereographic,
    Mobius,
    Orthogonal,
    ProductEmbedding,
    RationalQuadraticSpline,
    Scale,
    Shift,
    Similarity,
    StiefelEmbedding,
    ZeroPad,
)

# Inputs are drawn with norm <= INPUT_RADIUS; Möbius domains are chosen to contain the images
# of such inputs under the layers before them.
INPUT_RADIUS = 2.0


def random_orthonormal(rows, cols, gen):
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * r.diagonal().sign()


def randomize(module: nn.Module, gen: torch.Generator, scale: float = 0.3) -> nn.Module:
    """Random parameters for every layer: orthonormal weights through the parametrization's
    right inverse, small normal values elsewhere."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and hasattr(sub, "parametrizations"):
            w = sub.weight
            q = random_orthonormal(max(w.shape), min(w.shape), gen)
            sub.weight = (q if w.shape[0] >= w.shape[1] else q.T).to(w.dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "parametrizations" in name:
                continue
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def random_pole(n, gen):
    p = torch.randn(n, generator=gen, dtype=torch.float64)
    return p / p.norm()


def _conditioned(cond, context_features, gen):
    # Conditioned after the dtype cast in build(): the conditioned layer holds plain tensors.
    randomize(cond, gen, scale=0.5)
    return cond, torch.randn(context_features, generator=gen, dtype=torch.float64)


# name -> builder(d, D, gen); d is the input dimension, D >= d the target dimension (a builder
# may fix its own dimensions, e.g. the sphere chart has D = d + 1).
CASES = {
    "ZeroPad": lambda d, D, g: ZeroPad(d, D),
    "StiefelEmbedding": lambda d, D, g: randomize(StiefelEmbedding(d, D), g),
    "InverseStereographic": lambda d, D, g: InverseStereographic(d, pole=random_pole(d + 1, g)),
    "Orthogonal": lambda d, D, g: randomize(Orthogonal(d), g),
    "Similarity": lambda d, D, g: randomize(Similarity(d, D), g),
    "Scale": lambda d, D, g: randomize(Scale(d), g),
    "Shift": lambda d, D, g: randomize(Shift(d), g),
    "Mobius(radius)": lambda d, D, g: randomize(Mobius(d, radius=2 * INPUT_RADIUS), g, 3.0),
    "Mobius": lambda d, D, g: randomize(Mobius(d), g, 0.1),
    "ConformalEmbedding(flat)": lambda d, D, g: randomize(
        ConformalEmbedding(
            [StiefelEmbedding(d, D), Orthogonal(D), Mobius(D, radius=4.0), Scale(D), Shift(D)]
        ),
        g,
    ),
    "ConformalEmbedding(sphere)": lambda d, D, g: randomize(
        ConformalEmbedding(
            [InverseStereographic(d), Mobius(d + 1, radius=2.0), Scale(d + 1), Shift(d + 1)]
        ),
        g,
    ),
    "ProductEmbedding(torus)": lambda d, D, g: ProductEmbedding(
        [InverseStereographic(1, pole=random_pole(2, g)), InverseStereographic(1)]
    ),
    "ProductEmbedding(mixed)": lambda d, D, g: randomize(
        ProductEmbedding([StiefelEmbedding(d, D), InverseStereographic(1)]), g
    ),
    "InjectiveCompose(spline+conformal)": lambda d, D, g: randomize(
        InjectiveCompose([pyro_t.Spline(d, count_bins=4), ZeroPad(d, D), Scale(D), Shift(D)]),
        g,
    ),
    "InjectiveCompose(affine-coupling+sphere)": lambda d, D, g: randomize(
        InjectiveCompose(
            [
                pyro_t.affine_coupling(d, hidden_dims=[8]) if d > 1 else pyro_t.Spline(1),
                InverseStereographic(d),
                Scale(d + 1),
            ]
        ),
        g,
    ),
    "conditioned ConformalEmbedding": lambda d, D, g: _conditioned(
        ConditionalCompose(
            [
                Conditional(StiefelEmbedding, d, D, context_features=3),
                Conditional(Orthogonal, D, context_features=3),
                Conditional(Mobius, D, context_features=3, radius=4.0),
                Conditional(Scale, D, context_features=3),
                Conditional(Shift, D, context_features=3),
            ]
        ),
        3,
        g,
    ),
    # bound 1.5 < INPUT_RADIUS: inputs inside and outside the spline's interval
    "RationalQuadraticSpline": lambda d, D, g: RationalQuadraticSpline.from_parameters(
        torch.randn(1, d, 5, generator=g, dtype=torch.float64),
        torch.randn(1, d, 5, generator=g, dtype=torch.float64),
        torch.randn(1, d, 4, generator=g, dtype=torch.float64),
        bound=1.5,
    ),
    "conditioned ChartSpline": lambda d, D, g: _conditioned(
        ChartSpline(d, 3, hidden=(8,), count_bins=4, bound=1.5), 3, g
    ),
    # a coupling needs two coordinates at least
    "conditioned ChartSplineCoupling": lambda d, D, g: _conditioned(
        ChartSplineCoupling(max(d, 2), 3, hidden=(8,), count_bins=4, bound=1.5), 3, g
    ),
    "conditioned Similarity": lambda d, D, g: _conditioned(
        Conditional(Similarity, d, D, context_features=3), 3, g
    ),
    "conditioned InverseStereographic": lambda d, D, g: _conditioned(
        Conditional(InverseStereographic, d, context_features=2), 2, g
    ),
}

CONFORMAL = {
    name
    for name in CASES
    if not name.startswith(("ProductEmbedding", "InjectiveCompose")) and "Spline" not in name
}


def build(name: str, d: int, extra: int, seed: int, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    f = CASES[name](d, d + extra, gen)
    if isinstance(f, tuple):
        cond, context = f
        return cond.to(device, dtype).condition(context.to(device, dtype))
    return f.to(device, dtype)


def draw_inputs(f, batch_shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 1)
    x = 0.8 * torch.randn(*batch_shape, f.in_features, generator=gen, dtype=torch.float64)
    norm = x.norm(dim=-1, keepdim=True)
    x = x * (INPUT_RADIUS / norm).clamp(max=1.0)
    return x.to(dtype)
