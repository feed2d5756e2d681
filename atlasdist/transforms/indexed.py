r"""Per-chart linear maps applied by chart index, without a per-row copy of the matrix.

An atlas evaluates :math:`N m` (point, candidate chart) pairs but has only :math:`K` charts.
A chart's frame :math:`W_k \in \mathbb{R}^{D\times d}` is computed once per chart; gathering
it for every pair (``W[index]``) would copy :math:`N m D d` numbers (about 0.1 MiB per pair
at :math:`D = 784`, :math:`d = 32`), keep them for the backward pass, and make the product a
memory-bound batch of matrix-vector products. :func:`indexed_matvec` instead sorts the rows
by chart into tiles of :math:`T` rows that share a chart (a grouped matrix product): one
frame per tile, :math:`\lceil n_k / T\rceil` tiles for the :math:`n_k` rows of chart
:math:`k`, and a batched matrix-matrix product over the tiles (:func:`tiled` applies any
per-chart map this way).
"""

from __future__ import annotations

import torch

__all__ = ["indexed_matvec", "tiled", "tile_plan", "per_tile"]

_MAX_TILE = 128


class _TilePlan:
    """Where each row goes among the tiles, and the chart of each tile: computed once for an
    index and reused by every product with it (a chart's embedding and its left inverse).

    Two layouts, the cheaper for the rows at hand: tiles of :math:`T` rows (a matrix gathered
    per tile), or each chart one tile of the largest count, in chart order (``tile_chart`` is
    None: the per-chart tables are used as they are, nothing gathered), which pads unbalanced
    charts. ``matrix_elements`` (the size of one chart's matrix) and ``row_elements`` (of one
    row) weigh the gathers against the padding."""

    def __init__(
        self,
        index: torch.Tensor,
        charts: int,
        total: int,
        matrix_elements: int = 0,
        row_elements: int = 1,
    ):
        rows = index.shape[0]
        if total != rows:
            index = index.repeat(total // rows)
        counts = torch.bincount(index, minlength=charts)
        largest = int(counts.max()) if total else 0
        # The tile size of least cost (rows copied into tiles plus matrices gathered per tile)
        # among powers of two, one count per size.
        sizes = [1 << p for p in range(3, _MAX_TILE.bit_length())]
        size_t = torch.tensor(sizes, device=counts.device)
        tile_counts = torch.div(
            counts.unsqueeze(0) + size_t.unsqueeze(1) - 1,
            size_t.unsqueeze(1),
            rounding_mode="floor",
        ).sum(1)
        costs = tile_counts * (size_t * row_elements + matrix_elements)
        best = int(costs.argmin())
        tile, tiled_cost = sizes[best], int(costs[best])
        tiles = torch.div(counts + tile - 1, tile, rounding_mode="floor")
        direct = 0 < charts * largest * row_elements <= tiled_cost
        if direct:
            tile, tiles = largest, torch.ones_like(counts)
        self.tile = tile
        order = index.argsort(stable=True)
        chart_of_sorted = index.index_select(0, order)
        start = counts.cumsum(0) - counts
        position = torch.arange(total, device=index.device) - start.index_select(
            0, chart_of_sorted
        )
        first_tile = tiles.cumsum(0) - tiles
        row_tile = first_tile.index_select(0, chart_of_sorted) + torch.div(
            position, tile, rounding_mode="floor"
        )
        slot = position.remainder(tile)
        self.num_tiles = int(tiles.sum())
        self.tile_chart = (
            None
            if direct
            else torch.repeat_interleave(
                torch.arange(charts, device=index.device), tiles, output_size=self.num_tiles
            )
        )
        # Tile and slot of each row in its original order: rows are scattered into the tiles
        # and gathered back in one pass each.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(total, device=order.device)
        self.row_tile = row_tile.index_select(0, inverse)
        self.slot = slot.index_select(0, inverse)
        # Flat position of each row among the tile slots, and the row each slot reads, so
        # tiles are gathered in one pass with no zero fill: a slot that pads a tile reads the
        # tile's first row (same chart; its output there is dropped); a tile without rows (a
        # chart absent from the direct layout) is zeroed after the gather.
        self.position = self.row_tile * tile + self.slot
        source = torch.full((self.num_tiles, tile), -1, dtype=torch.long, device=index.device)
        source.view(-1)[self.position] = torch.arange(total, device=index.device)
        first = source[:, :1].clamp_min(0)
        self.source = torch.where(source < 0, first, source).view(-1)
        absent = counts == 0
        self.empty_tiles = absent.nonzero().squeeze(-1) if direct and bool(absent.any()) else None
        self.total, self.charts = total, charts


def per_tile(table: torch.Tensor, chart: torch.Tensor | None) -> torch.Tensor:
    """The rows of a per-chart table for each tile (``chart`` from :func:`tiled`; None: the
    tiles are the charts, in order)."""
    return table if chart is None else table.index_select(0, chart)


def _check_rows(index: torch.Tensor, x: torch.Tensor, repeats: int = 1) -> None:
    """Raises a ``ValueError`` unless ``x`` :math:`(*, B / \text{repeats}, n)` has one row per
    ``repeats`` entries of ``index`` :math:`(B,)`."""
    if index.dim() != 1:
        raise ValueError(f"indexed map: index must have shape (B,), got {tuple(index.shape)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"indexed map: repeats must be an int >= 1, got {repeats!r}")
    rows = index.shape[0]
    if x.dim() < 2 or x.shape[-2] * repeats != rows:
        raise ValueError(
            f"indexed map: x must have shape (*, {rows // repeats}, n) for {rows} indices "
            f"({repeats} per row), got {tuple(x.shape)}"
        )


def tiled(
    fn,
    index: torch.Tensor,
    x: torch.Tensor,
    charts: int,
    out_features: int,
    plan: _TilePlan | None = None,
    repeats: int = 1,
) -> torch.Tensor:
    r"""Applies a per-chart map to rows grouped by chart: ``fn(tiles, tile_chart)`` gets the
    rows in tiles of one chart each, shape :math:`(\text{tiles}, T, n)`, and the chart of
    each tile (or None when the tiles are the :math:`K` charts in order; look tables up with
    :func:`per_tile`), and returns :math:`(\text{tiles}, T, m)`; rows padding a tile are
    copies of the tile's first row (the tile of a chart without rows is zeros) and their
    outputs are dropped, so ``fn`` must act on each row independently.

    Arguments:
        fn: the tile map.
        index: chart of each row, shape :math:`(B,)`.
        x: rows :math:`(*, B, n)`.
        charts: :math:`K`.
        out_features: :math:`m`.
        plan: a :func:`tile_plan` for the same index and number of rows, to reuse.
        repeats: each row of ``x`` stands for this many consecutive rows (``x`` of shape
            :math:`(*, B / \text{repeats}, n)` is ``x.repeat_interleave(repeats, -2)``, e.g.
            a point for each of its candidate charts); the tiles read them in place, without
            the copy.

    Returns:
        :math:`(*, B, m)`.
    """
    _check_rows(index, x, repeats)
    rows = index.shape[0]
    lead = x.shape[:-2]
    flat = x.reshape(-1, x.shape[-1])
    total = flat.shape[0] * repeats
    if plan is None or plan.total != total or plan.charts != charts:
        plan = tile_plan(index, charts, total, row_elements=flat.shape[-1])
    source = plan.source if repeats == 1 else plan.source.div(repeats, rounding_mode="floor")
    padded = flat.index_select(0, source).view(plan.num_tiles, plan.tile, flat.shape[-1])
    if plan.empty_tiles is not None:  # charts without rows: zeros, not a copy of any row
        padded = padded.index_fill(0, plan.empty_tiles, 0)
    out = fn(padded, plan.tile_chart)
    y = out.reshape(-1, out.shape[-1]).index_select(0, plan.position)
    return y.reshape(lead + (rows, out_features))


def indexed_matvec(
    w: torch.Tensor,
    index: torch.Tensor,
    x: torch.Tensor,
    transpose: bool = False,
    plan: _TilePlan | None = None,
) -> torch.Tensor:
    r""":math:`y_i = W_{k_i} x_i` (or :math:`W_{k_i}^\top x_i` with ``transpose``), where
    :math:`k_i` = ``index[i]``.

    Arguments:
        w: per-chart matrices, shape :math:`(K, n, p)`.
        index: chart of each row, integer tensor of shape :math:`(B,)`.
        x: inputs of shape :math:`(*, B, p)` (:math:`(*, B, n)` with ``transpose``); leading
            dimensions broadcast over the rows.
        plan: the tiling of a previous call with the same ``index`` and input shape (see
            :func:`tile_plan`), to skip recomputing it.

    Returns:
        shape :math:`(*, B, n)` (:math:`(*, B, p)` with ``transpose``).

    Cost: the multiply-adds of ``W[index] @ x`` (up to the padding of one partial tile per
    chart), as matrix-matrix products over tiles (:func:`tiled`); memory kept for backward:
    the padded inputs and one matrix per tile, :math:`O(B (n + p) + (B/T + K)\, n p)`, not
    :math:`O(B n p)`. Plain torch operations: differentiable in ``w`` and ``x`` in every mode
    (reverse, forward, ``vmap``).

    Example:
        >>> w = torch.randn(3, 4, 2)
        >>> index = torch.tensor([2, 0, 2])
        >>> x = torch.randn(3, 2)
        >>> torch.allclose(indexed_matvec(w, index, x), (w[index] @ x.unsqueeze(-1))[..., 0])
        True
    """
    w = w.to(x.dtype)

    def product(tiles, chart):
        frames = per_tile(w, chart)
        return tiles @ (frames if transpose else frames.mT)

    n_out = w.shape[-1] if transpose else w.shape[-2]
    if plan is None:
        rows = x.numel() // max(1, x.shape[-1])
        plan = tile_plan(index, w.shape[0], rows, w.shape[-1] * w.shape[-2], x.shape[-1])
    return tiled(product, index, x, w.shape[0], n_out, plan)


def tile_plan(
    index: torch.Tensor,
    charts: int,
    total: int | None = None,
    matrix_elements: int = 0,
    row_elements: int = 1,
) -> _TilePlan:
    """The tiling :func:`tiled` uses for ``index`` over ``charts`` charts and ``total`` input
    rows (default ``len(index)``); ``matrix_elements`` and ``row_elements`` (the size of one
    chart's matrix and of one row) choose between its two layouts."""
    total = index.shape[0] if total is None else total
    return _TilePlan(index, charts, total, matrix_elements, row_elements)
