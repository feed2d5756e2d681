r"""Per-chart linear maps applied by chart index, without a per-row copy of the matrix.

An atlas evaluates :math:`N m` (point, candidate chart) pairs but has only :math:`K` charts.
A chart's frame :math:`W_k \in \mathbb{R}^{D\times d}` is computed once per chart; gathering
it for every pair (``W[index]``) would copy :math:`N m D d` numbers and keep them for the
backward pass (about 0.2 MiB per pair at :math:`D = 784`, :math:`d = 32`).
:func:`indexed_matvec` computes :math:`y_i = W_{k_i} x_i` in bounded chunks instead, and its
backward accumulates :math:`\partial L/\partial W_k = \sum_{i: k_i = k} g_i x_i^\top` in
chunks, so the memory kept for backward is that of the inputs, :math:`O(N m (D + d))`.
"""

from __future__ import annotations

import torch

__all__ = ["indexed_matvec"]

# Elements of one chunk's gathered matrices (W[index[chunk]]): bounds the transient memory.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, matrix_elements: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, matrix_elements))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _apply(w, index, x, transpose):
    # y_i = W_{k_i} x_i (or W_{k_i}^T x_i), chunk by chunk.
    n = w.shape[-1] if transpose else w.shape[-2]
    out = x.new_empty(x.shape[:-1] + (n,))
    for a, b in _chunks(x.shape[0], w.shape[-1] * w.shape[-2]):
        wk = w[index[a:b]]
        if transpose:
            wk = wk.mT
        out[a:b] = torch.bmm(wk, x[a:b].unsqueeze(-1)).squeeze(-1)
    return out


def _outer_sum(w, index, left, right):
    # sum over rows i with index i = k of left_i right_i^T, shape of w.
    grad = torch.zeros_like(w)
    for a, b in _chunks(left.shape[0], w.shape[-1] * w.shape[-2]):
        grad = grad.index_add(0, index[a:b], left[a:b].unsqueeze(-1) * right[a:b].unsqueeze(-2))
    return grad


class _IndexedMatvec(torch.autograd.Function):
    @staticmethod
    def forward(w, index, x, transpose):
        return _apply(w, index, x, transpose)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, index, x, transpose = inputs
        ctx.save_for_backward(w, index, x)
        ctx.save_for_forward(w, index, x)
        ctx.transpose = transpose

    @staticmethod
    def backward(ctx, grad):
        w, index, x = ctx.saved_tensors
        grad_w = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_x = _IndexedMatvec.apply(w, index, grad, not ctx.transpose)
        if ctx.needs_input_grad[0]:
            # y = W x: dW_k += g x^T; y = W^T x: dW_k += x g^T.
            grad_w = (
                _outer_sum(w, index, x, grad) if ctx.transpose else _outer_sum(w, index, grad, x)
            )
        return grad_w, None, grad_x, None

    @staticmethod
    def jvp(ctx, w_dot, index_dot, x_dot, transpose_dot):
        w, index, x = ctx.saved_tensors
        out = None
        if x_dot is not None:
            out = _apply(w, index, x_dot, ctx.transpose)
        if w_dot is not None:
            term = _apply(w_dot, index, x, ctx.transpose)
            out = term if out is None else out + term
        return out


def indexed_matvec(
    w: torch.Tensor, index: torch.Tensor, x: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    r""":math:`y_i = W_{k_i} x_i` (or :math:`W_{k_i}^\top x_i` with ``transpose``), where
    :math:`k_i` = ``index[i]``.

    Arguments:
        w: per-chart matrices, shape :math:`(K, n, p)`.
        index: chart of each row, integer tensor of shape :math:`(B,)`.
        x: inputs of shape :math:`(*, B, p)` (:math:`(*, B, n)` with ``transpose``); leading
            dimensions broadcast over the rows.

    Returns:
        shape :math:`(*, B, n)` (:math:`(*, B, p)` with ``transpose``).

    Cost: the same multiply-adds as ``W[index] @ x``; transient memory bounded by a chunk, and
    only ``w``, ``index`` and ``x`` are kept for backward. Differentiable in ``w`` and ``x``
    (reverse mode, twice, and forward mode).

    Example:
        >>> w = torch.randn(3, 4, 2)
        >>> index = torch.tensor([2, 0, 2])
        >>> x = torch.randn(3, 2)
        >>> torch.allclose(indexed_matvec(w, index, x), (w[index] @ x.unsqueeze(-1))[..., 0])
        True
    """
    if index.dim() != 1:
        raise ValueError(f"indexed_matvec: index must have shape (B,), got {tuple(index.shape)}")
    rows = index.shape[0]
    if x.dim() < 2 or x.shape[-2] != rows:
        raise ValueError(
            f"indexed_matvec: x must have shape (*, {rows}, n) for {rows} indices, got "
            f"{tuple(x.shape)}"
        )
    lead = x.shape[:-2]
    flat = x.reshape(-1, x.shape[-1])
    if lead:
        index = index.repeat(flat.shape[0] // rows)
    y = _IndexedMatvec.apply(w.to(x.dtype), index, flat, transpose)
    return y.reshape(lead + (rows, y.shape[-1]))
