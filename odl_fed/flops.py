"""Training FLOPs with ``torch.utils.flop_counter``, linear-algebra ops included.

``FlopCounterMode`` counts matmuls and convolutions but not the factorisations a compressed
layer runs (QR, eigendecomposition, SVD); they are added here with the textbook dense counts, so
a method's compression cost is never hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "LINALG_FLOP_FORMULAS"]

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


LINALG_FLOP_FORMULAS = {
    aten.linalg_qr: _qr_flops,
    aten._linalg_eigh: _eigh_flops,
    aten._linalg_svd: _svd_flops,
    aten.linalg_eigvalsh: _eigvalsh_flops,
}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of running ``fn()``: the total and the count per aten op."""
    with FlopCounterMode(display=False, custom_mapping=LINALG_FLOP_FORMULAS) as counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op
