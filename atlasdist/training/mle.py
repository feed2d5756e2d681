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


def _clip_and_step(model: nn.Module, optimizer, grad_clip: float | None, epoch: int) -> None:
    if grad_clip is not None:
        norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if not torch.isfinite(norm):
            # clipping an infinite norm would turn every parameter into NaN
            raise FloatingPointError(
                f"fit: the gradient norm is {norm.item()} at epoch {epoch + 1}; the "
                "parameters are left as they were before this step (try a smaller lr)"
            )
    optimizer.step()


def _local_epoch(model, loader, loss_fn, optimizer, grad_clip, epoch) -> tuple[float, int]:
    """One pass of one process over ``loader``: (sum of batch losses times sizes, points)."""
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
        _clip_and_step(model, optimizer, grad_clip, epoch)
        total += loss.item() * len(batch)
        count += len(batch)
    return total, count


def _parallel_epoch(dp, model, loader, loss_fn, optimizer, grad_clip, epoch) -> tuple:
    """One pass of this rank over its part of the data, in step with the other ranks.

    Every rank runs the same number of steps: a rank whose batches have run out (an iterable
    shard shorter than another rank's) or whose part of the last global batch is empty joins
    each step's reductions with no points, until no rank has a batch left. A failure on one
    rank (a non-finite loss, an exception in the loss or its backward pass) is counted in the
    step's reduction, so every rank raises instead of waiting for the failed one.
    """
    parameters = list(model.parameters())
    total, count = 0.0, 0.0
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        batch = None if batch is None else _first(batch)
        points = 0 if batch is None else len(batch)
        optimizer.zero_grad(set_to_none=True)
        value, nonfinite, error = 0.0, False, None
        if points:
            try:
                loss = loss_fn(model, batch)
                value = loss.item()
                nonfinite = not math.isfinite(value)
                if not nonfinite:
                    loss.backward()
            except Exception as exc:  # re-raised below, once the other ranks know
                error = exc
        totals = dp.reduce_step(
            parameters, points, value * points, batch is not None, (nonfinite, error is not None)
        )
        if error is not None:
            raise error
        if totals.failures[1]:
            raise RuntimeError(
                f"fit: the loss or its backward pass raised on {totals.failures[1]} of "
                f"{dp.world_size} ranks at epoch {epoch + 1} (see that rank's error); rank "
                f"{dp.rank} stops too"
            )
        if totals.failures[0]:
            raise FloatingPointError(
                f"fit: the loss is {totals.loss_sum / totals.count} on {totals.failures[0]} of "
                f"{dp.world_size} ranks; with an exact density this usually means data off the "
                "model's support (use noise_scale for noisy data)"
            )
        if not totals.active:
            return total, count
        if not totals.count:
            continue
        dp.average_gradients(parameters, points, totals)
        _clip_and_step(model, optimizer, grad_clip, epoch)
        total += totals.loss_sum
        count += totals.count


def _parallel_figures(dp, model, loss_fn, val, has_monitor_method) -> dict[str, float]:
    """The held-out figures over all ranks' shards ``val``: means weighted by shard size."""
    figures, error = {}, None
    try:
        if has_monitor_method:
            figures = loss_fn.monitor(model, val)
        else:
            with torch.no_grad():
                figures = {"val_log_prob": float(model.flow().log_prob(val).mean())}
    except Exception as exc:  # re-raised below, once the other ranks know
        error = exc
    failed = dp.count_failures(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"fit: the held-out figures raised on {failed} of {dp.world_size} ranks (see that "
            f"rank's error); rank {dp.rank} stops too"
        )
    return dp.reduce_means({k: float(v) for k, v in figures.items()}, len(val))


def _data_parallel(distributed: bool | None):
    if distributed is False:
        return None
    from .distributed import DataParallel, init_distributed

    if not init_distributed():
        if distributed:
            raise ValueError(
                "fit: distributed=True needs torch.distributed: launch with torchrun "
                "--nproc_per_node=N, or call torch.distributed.init_process_group first"
            )
        return None
    return DataParallel() if distributed else DataParallel.active()


class _Batches:
    """This rank's part of each shuffled global batch, a fresh order each pass."""

    def __init__(self, dp, data: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.dp, self.data, self.batch_size, self.generator = dp, data, batch_size, generator

    def __iter__(self):
        return self.dp.batches(self.data, self.batch_size, self.generator)


def _rng_states() -> dict:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _load_checkpoint(path, dp) -> dict | None:
    if dp is None:
        return torch.load(path, weights_only=False) if os.path.exists(path) else None
    # Rank 0 reads (its file system holds the checkpoint) and sends it to the others.
    state = None
    if dp.rank == 0 and os.path.exists(path):
        state = torch.load(path, weights_only=False, map_location="cpu")
    return dp.broadcast_object(state)


def _check_world_size(state: dict, dp, path) -> None:
    saved, now = state.get("world_size", 1), 1 if dp is None else dp.world_size
    if saved != now:
        raise ValueError(
            f"fit: the checkpoint {os.fspath(path)!r} was written by a run of {saved} "
            f"process(es), this one has {now}: resume it with {saved} (the global batch, "
            "processes x batch_size, and each rank's random stream depend on the number)"
        )


def _save_checkpoint(state: dict, path) -> None:
    # Write then rename: a run killed while saving leaves the previous checkpoint whole.
    path = os.fspath(path)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


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
    distributed: bool | None = None,
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

    **Data-parallel** (``torchrun --nproc_per_node=N``, see ``docs/distributed.rst`` and
    :mod:`atlasdist.training.distributed`): when torch.distributed is initialized with
    :math:`N > 1` processes, or the process was started by torchrun (``fit`` then initializes
    the group itself: ``nccl`` on CUDA, ``gloo`` on CPU), each rank trains on its part of
    every global batch of :math:`N \cdot` ``batch_size`` points and the gradients are
    averaged, weighted by points, so that one step is the step of one process on the global
    batch (``loss_fn`` must return a mean over the batch's points, as the library's losses
    do). The parameters are broadcast from rank 0 at the start; the held-out data are split
    between the ranks and their figures averaged; rank 0's figures and clock decide early
    stopping and the time budget for all; rank 0 alone writes the checkpoint and shows
    progress. Each rank needs the same ``data`` and ``val_data`` (a tensor is sharded by
    ``fit``; an iterable is taken as the rank's own shard, e.g. a ``DataLoader`` with a
    ``DistributedSampler``, whose ``set_epoch`` ``fit`` calls).

    Cost per epoch: one pass over ``data`` (forward and backward) and one forward pass over
    ``val_data``; with ``restore_best``, a copy of the parameters at each improvement.
    Data-parallel, per step: two ``all_reduce`` (a table of counts and flags, then the
    gradients, one flat buffer per dtype); per epoch, two or three small collectives.

    Arguments:
        model: an ``nn.Module`` with ``flow()`` returning a distribution, e.g.
            :class:`~atlasdist.AtlasFlow`.
        data: tensor of shape :math:`(N, D)` (shuffled into minibatches) or any iterable of
            batches (e.g. a ``DataLoader``).
        epochs: the most passes over the data, a positive int (a resumed run continues up to
            this number).
        batch_size: minibatch size for tensor data, a positive int (data-parallel: per rank,
            so the global batch is processes :math:`\times` ``batch_size``).
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
            history and parameters. Data-parallel: the shuffling is the same on all ranks (a
            one-process run with the global batch shuffles alike), the global torch
            generator of rank :math:`r` gets
            :meth:`~atlasdist.training.distributed.DataParallel.rank_seed` (``seed`` on rank
            0); without a seed, rank 0 draws one for all.
        checkpoint: file written after every epoch (written whole, then renamed over the
            last one): model, optimizer, scheduler, history, epoch, random states, and the
            best state, best figure and patience counter.
        resume: continue from ``checkpoint`` if it exists: the run goes on exactly as if it
            had not stopped (a run that stopped early by ``patience`` stays stopped).
            Data-parallel: rank 0 reads the checkpoint and sends it to the others; it holds
            every rank's random state and must be resumed with as many processes.
        progress: report progress: a tqdm bar when stderr is a terminal, else one line on
            stderr every ``log_every`` seconds and one at the end (a log file stays short).
        log_every: seconds between progress lines when stderr is not a terminal.
        distributed: ``None`` (default): data-parallel when torch.distributed is initialized
            with more than one process or torchrun started this process; ``True``: require
            it (any number of processes, a ``ValueError`` without a process group);
            ``False``: this process alone, even inside a process group (e.g. one model per
            rank).

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
    if distributed not in (None, True, False):
        raise ValueError(f"fit: distributed must be None, True or False, got {distributed!r}")
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
    dp = _data_parallel(distributed)
    started = time.perf_counter()
    generator = torch.Generator()
    if dp is not None:
        if seed is None:
            # one shuffling order for all ranks: rank 0's fresh seed
            fresh = torch.tensor(generator.seed() % 2**63, dtype=torch.int64)
            seed = int(dp.broadcast(fresh))
        torch.manual_seed(dp.rank_seed(seed))
        generator.manual_seed(seed)
        dp.sync_module(model)
    elif seed is not None:
        torch.manual_seed(seed)
        generator.manual_seed(seed)
    else:
        generator.seed()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    plateau_mode = mode if monitor is not None else "min"
    scheduler = _scheduler(schedule, optimizer, epochs, plateau_mode, patience)
    if dp is None:
        loader = _loader(data, batch_size, generator)
    elif isinstance(data, torch.Tensor):
        dp.check_same(data, "data")
        loader = _Batches(dp, data, batch_size, generator)
    else:
        loader = data  # this rank's own shard, e.g. a DataLoader with a DistributedSampler
    if dp is not None and val_data is not None:
        dp.check_same(val_data, "val_data")
    if dp is not None and val_data is not None and len(val_data) >= dp.world_size:
        local_val = dp.shard(val_data)
    else:
        local_val = val_data
    history = FitHistory(loss=[], lr=[])
    start, best_state, bad_epochs = 0, None, 0
    state = _load_checkpoint(checkpoint, dp) if resume and checkpoint is not None else None
    if state is not None:
        _check_world_size(state, dp, checkpoint)
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
        if dp is None:
            torch.set_rng_state(state["torch_rng"])
        else:
            _set_rng_states(state["rank_rng"][dp.rank])
        generator.set_state(state["loader_rng"])
        if history.stop_reason == "patience":
            start = epochs
    history.stop_reason = "epochs" if start < epochs else history.stop_reason
    bar = _Progress(progress and (dp is None or dp.rank == 0), start, epochs, log_every)
    epoch = start
    for epoch in range(start, epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        history["lr"].append(float(optimizer.param_groups[0]["lr"]))
        if dp is None:
            total, count = _local_epoch(model, loader, loss_fn, optimizer, grad_clip, epoch)
        else:
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            total, count = _parallel_epoch(dp, model, loader, loss_fn, optimizer, grad_clip, epoch)
        epoch_loss = total / max(count, 1)
        figures = {}
        if val_data is not None and dp is not None:
            figures = _parallel_figures(dp, model, loss_fn, local_val, has_monitor_method)
        elif val_data is not None:
            if has_monitor_method:
                figures = loss_fn.monitor(model, val_data)
            else:
                with torch.no_grad():
                    figures = {"val_log_prob": float(model.flow().log_prob(val_data).mean())}
        out_of_time = False
        if dp is not None:
            # Rank 0's figures and clock decide for all: the same best epoch, schedule and stop.
            out_of_time = time_limit is not None and time.perf_counter() - started >= time_limit
            agreed = dp.agree([epoch_loss, *map(float, figures.values()), float(out_of_time)])
            epoch_loss, out_of_time = agreed[0], bool(agreed[-1])
            figures = dict(zip(figures, agreed[1:-1], strict=True))
        history["loss"].append(epoch_loss)
        postfix = {"loss": f"{history['loss'][-1]:.4f}"}
        if val_data is not None:
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
        elif epoch + 1 < epochs and (
            out_of_time
            if dp is not None
            else time_limit is not None and time.perf_counter() - started >= time_limit
        ):
            history.stop_reason = "time_limit"
        postfix["lr"] = f"{optimizer.param_groups[0]['lr']:.3g}"
        last = epoch + 1 == epochs or history.stop_reason != "epochs"
        bar.update(epoch, postfix, force=last)
        if checkpoint is not None:
            rank_rng = None if dp is None else dp.all_gather_object(_rng_states())
            state = {
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
            }
            if dp is not None:
                state.update(rank_rng=rank_rng, world_size=dp.world_size)
            if dp is None or dp.rank == 0:
                _save_checkpoint(state, checkpoint)
        if history.stop_reason != "epochs":
            break
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    if dp is not None:
        dp.barrier()  # rank 0's checkpoint is written when fit returns on any rank
    message = None
    if history.stop_reason != "epochs":
        message = f"stopped after epoch {epoch + 1} ({history.stop_reason})"
    if history.best_epoch is not None and message is not None:
        message += f"; best {monitor} {history.best:.4g} at epoch {history.best_epoch + 1}"
    bar.close(message)
    return history
