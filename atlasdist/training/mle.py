"""Maximum-likelihood fitting of a module that builds a distribution (``module.flow()``)."""

from __future__ import annotations

import copy
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

__all__ = ["fit", "negative_log_likelihood", "FitHistory"]


def negative_log_likelihood(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    r"""Mean :math:`-\log p(x)` of a batch under ``model.flow()``."""
    return -model.flow().log_prob(batch).mean()


class FitHistory(dict):
    """What :func:`fit` returns: a ``dict`` of per-epoch lists (``loss``, ``lr`` and the
    monitored held-out figures, e.g. ``val_log_prob``), with three attributes:

    - ``best_epoch``: the (0-based) epoch of the best monitored figure, whose parameters the
      model holds after the fit when ``restore_best`` (``None`` without a monitored figure);
    - ``best``: that figure;
    - ``stop_reason``: ``"epochs"`` (all epochs ran), ``"patience"`` (early stopping) or
      ``"time_limit"``.

    It compares equal to a ``dict`` with the same lists.
    """

    best_epoch: int | None = None
    best: float | None = None
    stop_reason: str = "epochs"


def _loader(data, batch_size: int, generator: torch.Generator | None) -> Iterable:
    if isinstance(data, torch.Tensor):
        return DataLoader(
            TensorDataset(data), batch_size=batch_size, shuffle=True, generator=generator
        )
    return data


def _first(batch):
    return batch[0] if isinstance(batch, list | tuple) else batch


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(data, epochs, batch_size, lr, val_data, grad_clip, patience, time_limit):
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"fit: lr must be a positive finite number, got {lr!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"fit: grad_clip must be > 0 or None, got {grad_clip!r}")
    if patience is not None and (not _is_int(patience) or patience < 1):
        raise ValueError(f"fit: patience must be a positive int or None, got {patience!r}")
    if patience is not None and val_data is None:
        raise ValueError("fit: patience needs val_data (early stopping watches held-out data)")
    if time_limit is not None and not (
        isinstance(time_limit, numbers.Real) and time_limit > 0 and not math.isnan(time_limit)
    ):
        raise ValueError(
            f"fit: time_limit must be a positive number of seconds, got {time_limit!r}"
        )
    if isinstance(data, torch.Tensor) and (data.dim() < 1 or len(data) == 0):
        raise ValueError(f"fit: data must hold at least one point, got shape {tuple(data.shape)}")
    if val_data is not None:
        if not isinstance(val_data, torch.Tensor):
            raise TypeError(f"fit: val_data must be a tensor, got {type(val_data).__name__}")
        if isinstance(data, torch.Tensor) and val_data.shape[1:] != data.shape[1:]:
            raise ValueError(
                f"fit: val_data must have points of the shape of data's, (N, "
                f"{', '.join(map(str, data.shape[1:]))}); got {tuple(val_data.shape)} against "
                f"data {tuple(data.shape)}"
            )


def _scheduler(schedule, optimizer, epochs: int, mode: str, patience: int | None):
    if schedule is None:
        return None
    if schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "plateau":
        wait = 5 if patience is None else max(1, patience // 3)
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=wait)
    if callable(schedule) and not isinstance(schedule, str):
        scheduler = schedule(optimizer)
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "state_dict"):
            raise TypeError(
                "fit: schedule(optimizer) must return a torch learning-rate scheduler (with "
                f"step and state_dict), got {type(scheduler).__name__}"
            )
        return scheduler
    raise ValueError(
        "fit: schedule must be None, 'plateau', 'cosine' or a function optimizer -> scheduler "
        f"(e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)), got {schedule!r}"
    )


def _improved(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class _Progress:
    """A tqdm bar on a terminal; otherwise one line every ``log_every`` seconds (and at the
    end), so a log file gets a few lines rather than a bar redrawn per epoch."""

    def __init__(self, enabled: bool, start: int, epochs: int, log_every: float):
        stream = sys.stderr
        self.bar = None
        self.log = None
        if enabled and stream is not None and stream.isatty():
            self.bar = tqdm(total=epochs, initial=start, desc="fit", leave=False)
        elif enabled:
            self.log, self.every, self.epochs = stream, log_every, epochs
            self.last = time.perf_counter()

    def update(self, epoch: int, figures: dict[str, str], force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(figures)
        elif self.log is not None:
            now = time.perf_counter()
            if force or now - self.last >= self.every:
                text = "  ".join(f"{k} {v}" for k, v in figures.items())
                print(f"fit: epoch {epoch + 1}/{self.epochs}  {text}", file=self.log, flush=True)
                self.last = now

    def close(self, message: str | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if message and (self.log is not None or self.bar is not None):
            print(f"fit: {message}", file=sys.stderr, flush=True)


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
    monitor: str | None = None,
    mode: str | None = None,
    patience: int | None = None,
    restore_best: bool = True,
    schedule: str | Callable | None = None,
    time_limit: float | None = None,
    grad_clip: float | None = 10.0,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: float = 30.0,
) -> FitHistory:
    r"""Fits ``model`` by minibatch gradient descent (Adam) on ``loss_fn`` (default: the
    negative log-likelihood :math:`-\frac{1}{B}\sum_b \log p(x_b)` of ``model.flow()``), with
    early stopping on held-out data, a learning-rate schedule and a time budget.

    **Held-out figures.** With ``val_data``, each epoch records ``val_log_prob``, the mean
    :math:`\log p` of the held-out points (or, for a ``loss_fn`` with a
    ``monitor(model, val_data) -> dict`` method, its figures instead, e.g.
    :class:`~atlasdist.training.AtlasObjective`'s ``val_log_prob_thickened``). The
    figure named ``monitor`` (default ``val_log_prob``; a ``loss_fn`` with ``monitor`` needs
    one named) selects the best epoch: its parameters are restored at the end
    (``restore_best``), and ``patience`` epochs in a row without a better figure stop the run.
    The best of ``mode="max"`` is the largest (default for names containing ``log_prob``),
    of ``"min"`` the smallest (default otherwise).

    **Schedule** (stepped once per epoch): ``"cosine"`` anneals the learning rate from ``lr``
    to 0 over ``epochs`` (:class:`~torch.optim.lr_scheduler.CosineAnnealingLR`);
    ``"plateau"`` halves it when the monitored figure (without ``val_data``: the training
    loss) has not improved for ``max(1, patience // 3)`` epochs (5 without ``patience``)
    (:class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`); a function
    ``optimizer -> scheduler`` builds any torch scheduler (a ``ReduceLROnPlateau`` is stepped
    with the monitored figure). ``history["lr"]`` records the rate of each epoch.

    A ``loss_fn`` with a ``set_epoch(epoch)`` method is told the epoch before each one
    (e.g. :class:`~atlasdist.training.AtlasObjective`'s schedules).

    Cost per epoch: one pass over ``data`` (forward and backward) and one forward pass over
    ``val_data``; with ``restore_best``, a copy of the parameters at each improvement.

    Arguments:
        model: an ``nn.Module`` with ``flow()`` returning a distribution, e.g.
            :class:`~atlasdist.AtlasFlow`.
        data: tensor of shape :math:`(N, D)` (shuffled into minibatches) or any iterable of
            batches (e.g. a ``DataLoader``).
        epochs: the most passes over the data, a positive int (a resumed run continues up to
            this number).
        batch_size: minibatch size for tensor data, a positive int.
        lr: Adam learning rate, positive (ignored when ``optimizer`` is given; a schedule
            then starts from the optimizer's rate).
        optimizer: an optimizer over ``model``'s parameters (default Adam).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        val_data: held-out points :math:`(N', D)`, evaluated each epoch.
        monitor: the held-out figure that selects the best epoch.
        mode: ``"max"`` or ``"min"``: which way the monitored figure improves.
        patience: stop after this many epochs without improvement (``None``: never early).
        restore_best: end with the parameters of the best epoch (needs ``val_data``).
        schedule: ``None``, ``"cosine"``, ``"plateau"`` or ``optimizer -> scheduler``.
        time_limit: seconds; no epoch starts after they have passed (the running one
            finishes). Counted per call: a resumed run gets a fresh budget.
        grad_clip: gradient norm clip (``None`` for none).
        seed: seeds the run (parameter updates and shuffling): the same seed gives the same
            history and parameters.
        checkpoint: file written after every epoch: model, optimizer, scheduler, history,
            epoch, random states, and the best state, best figure and patience counter.
        resume: continue from ``checkpoint`` if it exists: the run goes on exactly as if it
            had not stopped (a run that stopped early by ``patience`` stays stopped).
        progress: report progress: a tqdm bar when stderr is a terminal, else one line on
            stderr every ``log_every`` seconds and one at the end (a log file stays short).
        log_every: seconds between progress lines when stderr is not a terminal.

    Returns:
        :class:`FitHistory`: ``loss`` (mean per epoch), ``lr`` and the held-out figures, with
        ``best_epoch``, ``best`` and ``stop_reason``.

    Example:
        >>> from atlasdist import AtlasFlow
        >>> atlas = AtlasFlow.spheres(1, torch.zeros(2, 2), torch.ones(2),
        ...                           torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
        >>> angle = torch.randn(640)
        >>> x = torch.stack([angle.cos(), angle.sin()], -1)
        >>> history = fit(atlas, x[:512], val_data=x[512:], epochs=3, patience=2,
        ...               schedule="cosine", seed=0, progress=False)
        >>> len(history["loss"]), history.stop_reason, history.best_epoch in (0, 1, 2)
        (3, 'epochs', True)
    """
    _check_arguments(data, epochs, batch_size, lr, val_data, grad_clip, patience, time_limit)
    has_monitor_method = getattr(loss_fn, "monitor", None) is not None
    if monitor is None and val_data is not None and not has_monitor_method:
        monitor = "val_log_prob"
    if monitor is not None and val_data is None:
        raise ValueError(f"fit: monitor={monitor!r} needs val_data (it is a held-out figure)")
    if patience is not None and monitor is None:
        raise ValueError(
            "fit: patience needs a monitored figure: name one of loss_fn.monitor's keys, e.g. "
            "monitor='val_log_prob_thickened'"
        )
    if mode is None:
        mode = "max" if monitor is not None and "log_prob" in monitor else "min"
    if mode not in ("max", "min"):
        raise ValueError(f"fit: mode must be 'max' or 'min', got {mode!r}")
    started = time.perf_counter()
    generator = torch.Generator()
    if seed is not None:
        torch.manual_seed(seed)
        generator.manual_seed(seed)
    else:
        generator.seed()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    plateau_mode = mode if monitor is not None else "min"
    scheduler = _scheduler(schedule, optimizer, epochs, plateau_mode, patience)
    loader = _loader(data, batch_size, generator)
    history = FitHistory(loss=[], lr=[])
    start, best_state, bad_epochs = 0, None, 0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        history = FitHistory(state["history"])
        history.setdefault("lr", [])
        history.best_epoch, history.best = state.get("best_epoch"), state.get("best")
        history.stop_reason = state.get("stop_reason", "epochs")
        best_state, bad_epochs = state.get("best_state"), state.get("bad_epochs", 0)
        start = state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        if history.stop_reason == "patience":
            start = epochs
    history.stop_reason = "epochs" if start < epochs else history.stop_reason
    bar = _Progress(progress, start, epochs, log_every)
    epoch = start
    for epoch in range(start, epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        history["lr"].append(float(optimizer.param_groups[0]["lr"]))
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
                norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if not torch.isfinite(norm):
                    # clipping an infinite norm would turn every parameter into NaN
                    raise FloatingPointError(
                        f"fit: the gradient norm is {norm.item()} at epoch {epoch + 1}; the "
                        "parameters are left as they were before this step (try a smaller lr)"
                    )
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        history["loss"].append(total / max(count, 1))
        postfix = {"loss": f"{history['loss'][-1]:.4f}"}
        if val_data is not None:
            if has_monitor_method:
                figures = loss_fn.monitor(model, val_data)
            else:
                with torch.no_grad():
                    figures = {"val_log_prob": float(model.flow().log_prob(val_data).mean())}
            for key, value in figures.items():
                history.setdefault(key, []).append(float(value))
                postfix[key] = f"{float(value):.4g}"
        watched = None
        if monitor is not None:
            if monitor not in history or monitor == "loss":
                raise ValueError(
                    f"fit: monitor={monitor!r} is not a held-out figure; the figures are "
                    f"{sorted(k for k in history if k not in ('loss', 'lr'))}"
                )
            watched = history[monitor][-1]
            if _improved(watched, history.best, mode):
                history.best, history.best_epoch, bad_epochs = watched, epoch, 0
                if restore_best:
                    best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
        if scheduler is not None:
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                scheduler.step(history["loss"][-1] if watched is None else watched)
            else:
                scheduler.step()
        if patience is not None and bad_epochs >= patience:
            history.stop_reason = "patience"
        elif (
            time_limit is not None
            and epoch + 1 < epochs
            and time.perf_counter() - started >= time_limit
        ):
            history.stop_reason = "time_limit"
        postfix["lr"] = f"{optimizer.param_groups[0]['lr']:.3g}"
        last = epoch + 1 == epochs or history.stop_reason != "epochs"
        bar.update(epoch, postfix, force=last)
        if checkpoint is not None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "history": dict(history),
                    "epoch": epoch + 1,
                    "torch_rng": torch.get_rng_state(),
                    "loader_rng": generator.get_state(),
                    "best_state": best_state,
                    "best": history.best,
                    "best_epoch": history.best_epoch,
                    "bad_epochs": bad_epochs,
                    "stop_reason": history.stop_reason,
                },
                checkpoint,
            )
        if history.stop_reason != "epochs":
            break
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    message = None
    if history.stop_reason != "epochs":
        message = f"stopped after epoch {epoch + 1} ({history.stop_reason})"
    if history.best_epoch is not None and message is not None:
        message += f"; best {monitor} {history.best:.4g} at epoch {history.best_epoch + 1}"
    bar.close(message)
    return history
