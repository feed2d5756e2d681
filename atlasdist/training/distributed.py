r"""Data-parallel fitting on :mod:`torch.distributed`: what :func:`~atlasdist.training.fit`
does when it runs in several processes (``torchrun --nproc_per_node=N``).

One step of :math:`N` ranks is one step of a single process on the *global batch*
:math:`B = B_0 \cup \dots \cup B_{N-1}`: rank :math:`r` computes the mean loss
:math:`\ell_r` of its part :math:`B_r` and its gradient, and the ranks sum
:math:`|B_r| \nabla \ell_r` and :math:`|B_r|`, so every rank holds

.. math::
    \nabla \ell_B = \frac{1}{|B|} \sum_r |B_r|\, \nabla \ell_r ,

the gradient of the mean loss over the global batch, before clipping and the optimizer step.
The gradients are reduced explicitly after ``backward`` (one flat buffer per dtype, one
``all_reduce``), not by :class:`~torch.nn.parallel.DistributedDataParallel`'s hooks: the
losses of this library are computed through a distribution (``model.flow()``), not
``module.forward``, the FIF loss differentiates twice (``create_graph``), and a parameter may
be unused on some ranks or in some phases (the manifold phase of
:class:`~atlasdist.training.AtlasObjective`). A small all-reduced table says which parameters
have a gradient on any rank, so every rank takes part in the same collectives (no hang) and a
parameter unused on all ranks keeps ``grad = None`` (Adam then leaves it alone, as in one
process). The price is no overlap of communication with the backward pass.

Everything not in the gradient is agreed on explicitly: the parameters and buffers are
broadcast from rank 0 at the start, the shuffling generator is the same on all ranks, the
held-out figures are reduced over the ranks' shards, and rank 0 broadcasts the epoch's
figures and its time-budget decision, so early stopping, the best epoch and the schedule are
decided identically everywhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DataParallel",
    "StepTotals",
    "default_backend",
    "init_distributed",
    "launched_by_torchrun",
    "local_device",
]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or any launcher that sets ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) as one of more than one process."""
    if not all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def default_backend() -> str:
    """``"nccl"`` where CUDA and NCCL are available, else ``"gloo"`` (CPU)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def local_device() -> torch.device:
    """The device this rank should put its model and data on: ``cuda:LOCAL_RANK`` where CUDA
    is available (``LOCAL_RANK`` as set by ``torchrun``, 0 without it), else the CPU.

    Example:
        >>> local_device().type in ("cpu", "cuda")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> bool:
    """Initializes the default process group from ``torchrun``'s environment variables, unless
    one is already initialized; returns whether a process group is initialized afterwards.

    The backend defaults to :func:`default_backend` (``nccl`` on CUDA, ``gloo`` on CPU); with
    ``nccl`` the current CUDA device becomes ``cuda:LOCAL_RANK``. :func:`~atlasdist.training.fit`
    calls this itself when :func:`launched_by_torchrun`; call it first to pick the backend.

    Example:
        >>> init_distributed()  # a plain ``python`` process: nothing to join
        False
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


class _Indices(Dataset):
    """The indices ``0 .. n-1``, fetched a batch at a time (no per-point Python call)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


def _identity(batch):
    return batch


class StepTotals(NamedTuple):
    """What the ranks agreed on in one step."""

    count: float
    """Points in the global batch."""
    loss_sum: float
    """Sum over the ranks of the mean loss times the rank's points."""
    active: float
    """Ranks that still had a batch."""
    failures: tuple[int, int]
    """Ranks whose loss was not finite, ranks whose loss or backward pass raised."""
    used: list[float]
    """Per parameter, the ranks on which it has a gradient."""


class DataParallel:
    r"""The collective side of data-parallel :func:`~atlasdist.training.fit`: this rank's
    place in a process group and the reductions that make :math:`N` ranks act as one process
    on the global batch (see the module's description).

    Arguments:
        group: the process group (default: the default group, which must be initialized).

    Example (one process, a group of one; under torchrun the group is there already):
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> dp = DataParallel()
        >>> dp.rank, dp.world_size, dp.rank_seed(7)
        (0, 1, 7)
        >>> batches = dp.batches(torch.arange(10.0), 4, torch.Generator().manual_seed(0))
        >>> [len(batch) for batch in batches]
        [4, 4, 2]
        >>> dist.destroy_process_group()
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DataParallel: torch.distributed has no initialized process group; launch with "
                "torchrun or call atlasdist.training.distributed.init_distributed() first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # NCCL reduces CUDA tensors only; gloo is given CPU tensors (it also takes CUDA ones,
        # but not for every operation).
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    @staticmethod
    def active(group: dist.ProcessGroup | None = None) -> DataParallel | None:
        """A :class:`DataParallel` over ``group`` when torch.distributed is initialized with
        more than one process, else ``None``."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size(group) < 2:
            return None
        return DataParallel(group)

    # -- collectives ------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks (returned on ``tensor``'s device)."""
        buffer = tensor.to(self.device)
        dist.all_reduce(buffer, group=self.group)
        return buffer.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (same shape and dtype on all ranks)."""
        buffer = tensor.to(self.device)
        dist.broadcast(buffer, src=self._global(0), group=self.group)
        return buffer.to(tensor.device)

    def broadcast_object(self, obj):
        """Rank 0's picklable ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group, device=self.device)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        """Waits for every rank (a one-number ``all_reduce``, on the backend's device)."""
        self.all_reduce(torch.zeros(1))

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def agree(self, values: Sequence[float]) -> list[float]:
        """Rank 0's ``values`` (float64) on every rank: decisions taken once, e.g. a time
        budget read from rank 0's clock."""
        return self.broadcast(torch.tensor(list(values), dtype=torch.float64)).tolist()

    @torch.no_grad()
    def sync_module(self, module: nn.Module) -> None:
        """Copies rank 0's parameters and buffers into ``module`` on every rank."""
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(self.broadcast(tensor.detach()))

    # -- data -------------------------------------------------------------------------------

    def check_same(self, tensor: torch.Tensor, name: str) -> None:
        """Raises a ``ValueError`` on every rank unless ``tensor`` has the same length and sum
        on every rank (``fit`` shards a tensor itself, so each rank must hold all of it)."""
        local = [float(len(tensor)), float(tensor.detach().double().sum())]
        first = self.broadcast(torch.tensor(local, dtype=torch.float64)).tolist()
        same = local[0] == first[0] and (
            local[1] == first[1]
            or (math.isnan(local[1]) and math.isnan(first[1]))
            or math.isclose(local[1], first[1], rel_tol=1e-9)
        )
        failed = self.count_failures(not same)
        if failed:
            raise ValueError(
                f"fit: {name} must be the same tensor on every rank (fit shards it itself); "
                f"{failed} of {self.world_size} ranks hold another one (rank {self.rank}: "
                f"{int(local[0])} points summing to {local[1]:.6g}; rank 0: {int(first[0])} "
                f"summing to {first[1]:.6g}). To give each rank its own part, pass an iterable "
                "of batches instead, e.g. a DataLoader with a DistributedSampler"
            )

    def shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of ``data`` :math:`(N, \\dots)`:
        ``data.tensor_split(world_size)[rank]`` (parts differ in length by at most one)."""
        return data.tensor_split(self.world_size)[self.rank]

    def batches(
        self, data: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> Iterator[torch.Tensor]:
        r"""This rank's part of each shuffled global batch of ``world_size * batch_size``
        points of ``data`` :math:`(N, \dots)`.

        The global batches are those of ``DataLoader(TensorDataset(data),
        batch_size=world_size * batch_size, shuffle=True, generator=generator)`` (the same
        draws from ``generator``, identical on all ranks), and rank :math:`r` takes part
        :math:`r` of ``indices.tensor_split(world_size)``. A full global batch gives every rank
        ``batch_size`` points; the last one, when :math:`N` is not a multiple, is split
        unevenly (a rank may get no point at all). Neither padding nor ``drop_last``: with
        gradients weighted by the points of each rank, each step is the step of one process
        on the global batch; padding would count repeated points twice and ``drop_last``
        would lose points that one process sees.
        """
        loader = DataLoader(
            _Indices(len(data)),
            batch_size=self.world_size * batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=_identity,
        )
        for indices in loader:
            yield data[indices.tensor_split(self.world_size)[self.rank].to(data.device)]

    # -- seeds ------------------------------------------------------------------------------

    def rank_seed(self, seed: int) -> int:
        """The seed of this rank's global torch generator (the one stochastic losses draw
        from, e.g. the FIF loss's Hutchinson probes): ``seed`` on rank 0, so that one process
        is rank 0 of one; on rank :math:`r > 0`, ``numpy.random.SeedSequence([seed, r])``'s
        first 63 bits (independent streams, no collision between ``seed + r`` and
        ``seed + 1``)."""
        if self.rank == 0:
            return seed
        state = np.random.SeedSequence([seed, self.rank]).generate_state(1, np.uint64)[0]
        return int(state) >> 1

    # -- one step ---------------------------------------------------------------------------

    def reduce_step(
        self,
        parameters: Sequence[torch.Tensor],
        count: int,
        loss_sum: float,
        active: bool,
        failures: tuple[bool, bool],
    ) -> StepTotals:
        r"""Sums, over the ranks, this rank's points ``count``, ``loss_sum`` (mean loss times
        ``count``), whether it had a batch (``active``), its ``failures`` (a non-finite loss,
        an exception) and which ``parameters`` have a gradient: one small ``all_reduce`` of
        float64 numbers (exact for counts below :math:`2^{53}`)."""
        flags = [p.grad is not None for p in parameters]
        meta = torch.tensor(
            [count, loss_sum, float(active), float(failures[0]), float(failures[1]), *flags],
            dtype=torch.float64,
        )
        meta = self.all_reduce(meta).tolist()
        return StepTotals(meta[0], meta[1], meta[2], (int(meta[3]), int(meta[4])), meta[5:])

    @torch.no_grad()
    def average_gradients(
        self, parameters: Sequence[torch.Tensor], count: int, totals: StepTotals
    ) -> None:
        r"""Replaces each gradient :math:`\nabla \ell_r` by
        :math:`\frac{1}{|B|}\sum_r |B_r| \nabla \ell_r` (``count`` :math:`= |B_r|`,
        ``totals.count`` :math:`= |B|`): one ``all_reduce`` per dtype over the parameters that
        have a gradient on some rank (``totals.used``, from :meth:`reduce_step`); a parameter
        without a gradient on any rank keeps ``grad = None``."""
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p, used in zip(parameters, totals.used, strict=True):
            if used:
                groups.setdefault((p.dtype, p.device), []).append(p)
        for params in groups.values():
            flat = torch.cat(
                [
                    (p.grad * count if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in params
                ]
            )
            flat = self.all_reduce(flat).div_(totals.count)
            for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = piece.view_as(p).clone()

    # -- held-out figures -------------------------------------------------------------------

    def count_failures(self, failed: bool) -> int:
        """How many ranks ``failed`` (one ``all_reduce``): every rank raises, none waits."""
        return int(self.all_reduce(torch.tensor([float(failed)], dtype=torch.float64)).item())

    def reduce_means(self, figures: dict[str, float], count: int) -> dict[str, float]:
        r"""Means over all ranks' points of per-rank means, :math:`\sum_r n_r f_r / \sum_r n_r`
        for each figure (``count`` :math:`= n_r`; every rank gives the same keys)."""
        keys = list(figures)
        local = [float(count), *(count * float(figures[k]) for k in keys)]
        out = self.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        return {k: v / out[0] for k, v in zip(keys, out[1:], strict=True)}
