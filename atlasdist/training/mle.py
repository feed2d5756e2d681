"""Maximum-likelihood fitting of a module that builds a distribution (``module.flow()``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

__all__ = ["fit", "negative_log_likelihood"]


def negative_log_likelihood(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    r"""Mean :math:`-\log p(x)` of a batch under ``model.flow()``."""
    return -model.flow().log_prob(batch).mean()


def _loader(data, batch_size: int, generator: torch.Generator | None) -> Iterable:
    if isinstance(data, torch.Tensor):
        return DataLoader(
            TensorDataset(data), batch_size=batch_size, shuffle=True, generator=generator
        )
    return data


def _first(batch):
    return batch[0] if isinstance(batch, list | tuple) else batch


def fit(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = negative_log_likelihood,
    val_data: torch.Tensor | None = None,
    grad_clip: float | None = 10.0,
    seed: int | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    r"""Fits ``model`` by minibatch gradient descent (Adam) on ``loss_fn`` (default: the
    negative log-likelihood of ``model.flow()``).

    Arguments:
        model: an ``nn.Module`` with ``flow()`` returning a distribution, e.g.
            :class:`~atlasdist.AtlasFlow`.
        data: tensor of shape :math:`(N, D)` (shuffled into minibatches) or any iterable of
            batches (e.g. a ``DataLoader``).
        epochs: passes over the data.
        batch_size: minibatch size for tensor data.
        lr: Adam learning rate (ignored when ``optimizer`` is given).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        val_data: held-out points; their mean log-likelihood is recorded each epoch.
        grad_clip: gradient norm clip (``None`` for none).
        seed: seeds torch's generator for the run (parameter updates and shuffling).
        progress: show a progress bar.

    Returns:
        History with ``loss`` (mean per epoch) and, with ``val_data``, ``val_log_prob``.

    Example:
        >>> from atlasdist import AtlasFlow
        >>> atlas = AtlasFlow.spheres(1, torch.zeros(2, 2), torch.ones(2),
        ...                           torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
        >>> angle = torch.randn(512)
        >>> x = torch.stack([angle.cos(), angle.sin()], -1)
        >>> history = fit(atlas, x, epochs=2, progress=False)
        >>> len(history["loss"])
        2
    """
    generator = None
    if seed is not None:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    loader = _loader(data, batch_size, generator)
    history: dict[str, list[float]] = {"loss": []}
    if val_data is not None:
        history["val_log_prob"] = []
    bar = tqdm(range(epochs), disable=not progress, desc="fit", leave=False)
    for _ in bar:
        total, count = 0.0, 0
        for batch in loader:
            batch = _first(batch)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"fit: the loss is {float(loss)}; with an exact density this usually means "
                    "data off the model's support (use noise_scale for noisy data)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        history["loss"].append(total / max(count, 1))
        postfix = {"loss": f"{history['loss'][-1]:.4f}"}
        if val_data is not None:
            with torch.no_grad():
                val = float(model.flow().log_prob(val_data).mean())
            history["val_log_prob"].append(val)
            postfix["val"] = f"{val:.4f}"
        bar.set_postfix(postfix)
    return history
