"""Training FLOPs with ``torch.utils.flop_counter``, linear-algebra ops included.

``FlopCounterMode`` counts matmuls and convolutions but not the factorisations a compressed
layer runs (QR, eigendecomposition, SVD); they are added here with the textbook dense counts, so
a method's compression cost is never hidden. Its ``convolution_backward`` formula also ignores
``groups`` for the weight gradient (torch 2.14: a depthwise conv's weight gradient is counted
``groups`` times over), so that op is counted here too: each requested gradient of a conv costs
the same multiply-adds as its forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "EXTRA_FLOP_FORMULAS"]

aten = torch.ops.aten


def _qr_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    # Householder QR of m x n (m >= n) and forming the thin Q: 2 (2 m n^2 - 2 n^3 / 3).
    *batch, m, n = a_shape
    k = min(m, n)
    return int(torch.Size(batch).numel() * (4 * m * n * k - 4 * k**3 / 3))


def _eigh_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    # Symmetric eigendecomposition with eigenvectors: about 9 n^3.
    *batch, n, _ = a_shape
    return int(torch.Size(batch).numel() * 9 * n**3)


def _svd_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    # Thin SVD with singular vectors (R-SVD): about 6 m n^2 + 20 n^3 with n = min(m, n).
    *batch, m, n = a_shape
    m, n = max(m, n), min(m, n)
    return int(torch.Size(batch).numel() * (6 * m * n**2 + 20 * n**3))


def _eigvalsh_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, _ = a_shape
    return int(torch.Size(batch).numel() * 4 * n**3 / 3)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    # w_shape is (C_out, C_in / groups, k...): groups are already in it.
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    forward = 2 * grad_out_shape[0] * torch.Size(w_shape).numel() * torch.Size(spatial).numel()
    return forward * (int(output_mask[0]) + int(output_mask[1]))


EXTRA_FLOP_FORMULAS = {
    aten.convolution_backward: _conv_backward_flops,
    aten.linalg_qr: _qr_flops,
    aten._linalg_eigh: _eigh_flops,
    aten._linalg_svd: _svd_flops,
    aten.linalg_eigvalsh: _eigvalsh_flops,
}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of running ``fn()``: the total and the count per aten op."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op
