"""Small linear-algebra helpers shared by the transforms and distributions."""

from __future__ import annotations

import torch


def matrix_exp(a: torch.Tensor) -> torch.Tensor:
    r""":math:`e^{A}` of square matrices ``a`` :math:`(*, n, n)`, as ``torch.linalg.matrix_exp``
    but accurate for a single matrix too.

    torch picks its Taylor degree per call, and a single matrix of small norm takes a degree-8
    path whose coefficient is wrong in torch 2.13 (pytorch/pytorch#196592): errors up to
    2.4e-10 in float64 and 5e-5 in float32 (measured on random skew-symmetric 2 x 2 to 4 x 4
    matrices near 1-norm 0.05, against ``scipy.linalg.expm``), where a batch of two or more
    is accurate to 1e-13. A lone matrix is therefore evaluated beside a zero matrix.
    Differentiable; batched like ``torch.linalg.matrix_exp``.
    """
    n = a.shape[-1]
    if a.dim() < 2 or a.numel() != n * n:  # a batch (or empty, or not a matrix: torch's error)
        return torch.linalg.matrix_exp(a)
    single = a.reshape(1, n, n)
    pair = torch.cat([single, torch.zeros_like(single)])
    return torch.linalg.matrix_exp(pair)[:1].reshape(a.shape)
