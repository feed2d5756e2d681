r"""Vector-quantized autoencoder: learned chart centres and chart regions (reference/000, "The
chart regions").

An encoder :math:`E: \mathbb{R}^D \to \mathbb{R}^c`, a decoder :math:`\mathrm{Dec}:
\mathbb{R}^c \to \mathbb{R}^D` and a codebook :math:`\{v_k\}_{k=1}^K \subset \mathbb{R}^c`
minimise :math:`|x - \mathrm{Dec}(v_{k(x)})|^2`, :math:`k(x) = \arg\min_k |E(x) - v_k|`,
with the straight-through estimator, codebook and commitment losses (van den Oord et al.,
*Neural discrete representation learning*, 2017), k-means++ initialisation of the codebook
from encoded data, and revival of dead codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import (
    check_count,
    check_features,
    check_finite,
    check_floating,
    check_parameter,
    check_sizes,
    module_tensor,
)
from .kmeans import kmeans
from .membership import ChartMembership

__all__ = ["VQAutoencoder", "mlp"]


def mlp(sizes: Sequence[int], activation=nn.SiLU) -> nn.Sequential:
    """Multilayer perceptron with the given layer sizes (no activation after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class VQAutoencoder(nn.Module):
    r"""Vector-quantized autoencoder whose codebook gives the chart centres.

    ``forward(x)`` returns the straight-through reconstruction and the three losses;
    :meth:`fit` trains it; :meth:`membership` gives the
    :class:`~atlasdist.charts.ChartMembership` of its chart regions
    :math:`U_k = \{x : |E(x) - v_k| < (1 + \varepsilon)\tilde d_m(x)\}`.

    Arguments:
        D: data dimension.
        charts: codebook size :math:`K`.
        code_dim: code-space dimension :math:`c` (default :math:`D`).
        hidden: hidden layer sizes of encoder and decoder.
        commitment: weight of the commitment loss :math:`|E(x) - \mathrm{sg}(v_k)|^2`.
        encoder, decoder: optional modules replacing the default MLPs.

    Example:
        >>> vq = VQAutoencoder(D=3, charts=8)
        >>> x = torch.randn(256, 3)
        >>> history = vq.fit(x, epochs=2, progress=False)
        >>> vq.assign(x).shape
        torch.Size([256])
    """

    def __init__(
        self,
        D: int,
        charts: int,
        code_dim: int | None = None,
        hidden: Sequence[int] = (64, 64),
        commitment: float = 0.25,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ):
        super().__init__()
        D = check_count(D, "D", "VQAutoencoder")
        charts = check_count(charts, "charts", "VQAutoencoder")
        code_dim = D if code_dim is None else check_count(code_dim, "code_dim", "VQAutoencoder")
        if encoder is None or decoder is None:
            hidden = check_sizes(hidden, "hidden", "VQAutoencoder")
        check_parameter(commitment, "commitment", "VQAutoencoder", nonnegative=True)
        self.D, self.num_charts, self.code_dim = D, charts, code_dim
        self.encoder = encoder if encoder is not None else mlp([D, *hidden, code_dim])
        self.decoder = decoder if decoder is not None else mlp([code_dim, *hidden, D])
        self.codebook = nn.Parameter(torch.randn(charts, code_dim))
        self.commitment = commitment

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_floating(x, "VQAutoencoder", "data", module_tensor(self))
        check_features(x, self.D, "VQAutoencoder", "data")
        check_finite(x, "VQAutoencoder", "data")
        return self.encoder(x)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`d_k(x) = |E(x) - v_k|`, shape :math:`(N, K)`."""
        return torch.cdist(self.encode(x), self.codebook)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each point, shape (N,)."""
        return self.distances(x).argmin(-1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.encode(x)
        index = torch.cdist(code, self.codebook).argmin(-1)
        quantized = self.codebook[index]
        # Straight-through: the decoder sees the code, the encoder gets its gradient.
        recon = self.decoder(code + (quantized - code).detach())
        losses = {
            "reconstruction": (recon - x).pow(2).sum(-1).mean(),
            "codebook": (quantized - code.detach()).pow(2).sum(-1).mean(),
            "commitment": (code - quantized.detach()).pow(2).sum(-1).mean(),
        }
        losses["loss"] = (
            losses["reconstruction"] + losses["codebook"] + self.commitment * losses["commitment"]
        )
        return {"recon": recon, "index": index, **losses}

    @torch.no_grad()
    def init_codebook(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """k-means++ then Lloyd on the encoded data."""
        centres, _ = kmeans(self.encode(x), self.num_charts, generator=generator)
        self.codebook.copy_(centres)

    @torch.no_grad()
    def quantization_error(self, x: torch.Tensor) -> float:
        r"""The objective of the reference, :math:`|x - \mathrm{Dec}(v_{k(x)})|^2` averaged:
        how well the codes alone represent the data."""
        return float((self.decoder(self.codebook[self.assign(x)]) - x).pow(2).sum(-1).mean())

    @torch.no_grad()
    def revive_dead_codes(
        self, x: torch.Tensor, counts: torch.Tensor, generator: torch.Generator | None = None
    ) -> int:
        """Moves codes that no point used (``counts == 0``) onto random encoded points; returns
        how many were revived."""
        dead = (counts == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(x), (len(dead),), generator=generator).to(x.device)
            self.codebook[dead] = self.encode(x[pick])
        return len(dead)

    def fit(
        self,
        x: torch.Tensor,
        epochs: int = 50,
        batch_size: int = 256,
        lr: float = 1e-3,
        seed: int | None = None,
        progress: bool = True,
    ) -> dict[str, list[float]]:
        """Trains the autoencoder on ``x`` (N, D): k-means++ codebook initialisation, Adam on the
        VQ losses, dead codes revived after every epoch. Returns per-epoch history of the loss,
        the quantization error and the number of codes in use."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if seed is not None:
            torch.manual_seed(seed)
        self.init_codebook(x, gen)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        history: dict[str, list[float]] = {"loss": [], "quantization_error": [], "codes_used": []}
        for _ in tqdm(range(epochs), disable=not progress, desc="vq", leave=False):
            perm = torch.randperm(len(x), generator=gen).to(x.device)
            total = 0.0
            for idx in perm.split(batch_size):
                out = self(x[idx])
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()
                total += out["loss"].item() * len(idx)
            with torch.no_grad():
                counts = torch.bincount(self.assign(x), minlength=self.num_charts)
            self.revive_dead_codes(x, counts, gen)
            history["loss"].append(total / len(x))
            history["quantization_error"].append(self.quantization_error(x))
            history["codes_used"].append(int((counts > 0).sum()))
        return history

    def membership(self, m: int = 2, eps: float = 0.0, cap: int | None = None) -> ChartMembership:
        """The chart membership of this autoencoder's regions (encoder = :math:`E`; use
        ``self.codebook`` as the centres)."""
        return ChartMembership(m=m, eps=eps, cap=cap, encoder=self.encoder)
