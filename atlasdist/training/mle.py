"""Maximum-likelihood fitting of a module that builds a distribution (``module.flow()``)."""

from __future__ import annotations

import os
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
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, list[float]]:
    r"""Fits ``model`` by minibatch gradient descent (Adam) on ``loss_fn`` (default: the
    negative log-likelihood of ``model.flow()``).

    A ``loss_fn`` with a ``set_epoch(epoch)`` method is told the epoch before each one
    (schedules, e.g. :class:`~atlasdist.training.AtlasObjective`); one with a
    ``monitor(model, val_data) -> dict`` method reports held-out figures each epoch (otherwise
    the held-out mean ``log_prob`` is recorded).

    Arguments:
        model: an ``nn.Module`` with ``flow()`` returning a distribution, e.g.
            :class:`~atlasdist.AtlasFlow`.
        data: tensor of shape :math:`(N, D)` (shuffled into minibatches) or any iterable of
            batches (e.g. a ``DataLoader``).
        epochs: total passes over the data (a resumed run continues up to this number).
        batch_size: minibatch size for tensor data.
        lr: Adam learning rate (ignored when ``optimizer`` is given).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        val_data: held-out points, monitored each epoch.
        grad_clip: gradient norm clip (``None`` for none).
        seed: seeds the run (parameter updates and shuffling): the same seed gives the same
            history and parameters.
        checkpoint: file written after every epoch (model, optimizer, history, epoch and
            random states).
        resume: continue from ``checkpoint`` if it exists: the run goes on exactly as if it
            had not stopped.
        progress: show a progress bar.

    Returns:
        History with ``loss`` (mean per epoch) and the monitored held-out figures.

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
    generator = torch.Generator()
    if seed is not None:
        torch.manual_seed(seed)
        generator.manual_seed(seed)
    else:
        generator.seed()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    loader = _loader(data, batch_size, generator)
    history: dict[str, list[float]] = {"loss": []}
    start = 0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
    monitor = getattr(loss_fn, "monitor", None)
    bar = tqdm(range(start, epochs), disable=not progress, desc="fit", leave=False)
    for epoch in bar:
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in loader:
            batch = _first(batch)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"fit: the loss is {loss.item()}; with an exact density this usually means "
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
            if monitor is not None:
                figures = monitor(model, val_data)
            else:
                with torch.no_grad():
                    figures = {"val_log_prob": float(model.flow().log_prob(val_data).mean())}
            for key, value in figures.items():
                history.setdefault(key, []).append(value)
                postfix[key] = f"{value:.4g}"
        bar.set_postfix(postfix)
        if checkpoint is not None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "epoch": epoch + 1,
                    "torch_rng": torch.get_rng_state(),
                    "loader_rng": generator.get_state(),
                },
                checkpoint,
            )
    return history
