"""How a Tucker form's numbers are held for backward: the input's dtype, 16-bit floats, or 8-bit integers.

:func:`store_form` turns a :class:`TuckerForm` into the flat tuple of tensors saved for backward,
:func:`load_form` turns that tuple back into a form in the dtype the gradient is computed in, and
:func:`tucker_nbytes` counts the bytes held at given ranks (the count the planner uses). Pure
functions of tensors; a variant names its storage dtype.

8-bit storage is symmetric and linear, with one float32 scale per slice: the core has one scale
per index of its channel mode (a conv input ``(B, C, H, W)``: mode 1; a linear input: its last
mode), because the core's energy falls steeply along that mode's rank; each factor has one
scale per column. On the real inputs of EfficientNet-Lite0's last convs this keeps dW within
about 1-1.5% (relative) of float32 storage, against about 5% with one scale per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from odl_fed.asi.tucker import TuckerForm, tucker_numel

__all__ = ["STORAGE_NAMES", "INT8_LEVELS", "channel_mode", "quantize_int8", "dequantize_int8", "store_form",
           "load_form", "tucker_nbytes"]

STORAGE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}
INT8_LEVELS = 127  # symmetric: -127..127, so that 0 is exact and the range is the same both ways
SCALE_ITEMSIZE = 4  # each 8-bit slice's scale is a float32


def channel_mode(ndim: int) -> int:
    """The mode whose slices get their own 8-bit scale: a conv input's channels, else the last mode."""
    return 1 if ndim == 4 else ndim - 1


def quantize_int8(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``t`` as int8 with one float32 scale per index of ``dim`` (round to nearest)."""
    others = [d for d in range(t.dim()) if d != dim]
    scale = t.abs().amax(dim=others, keepdim=True).float() / INT8_LEVELS
    scale = scale.masked_fill(scale == 0, 1.0)  # an all-zero slice: any scale holds it exactly
    q = torch.round(t.float() / scale).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return q, scale.flatten()


def dequantize_int8(q: Tensor, scale: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    shape = [1] * q.dim()
    shape[dim] = -1
    return q.to(dtype) * scale.to(dtype).view(shape)


def store_form(form: TuckerForm, storage: torch.dtype | None) -> tuple[Tensor | None, ...]:
    """What is saved for backward: ``(core, *factors)``; with int8, their scales follow in the same order.

    A None (a mode kept whole) stays None, and so does its scale.
    """
    tensors = form.tensors()
    if storage is None:
        return tensors
    if storage != torch.int8:
        return tuple(None if t is None else t.to(storage) for t in tensors)
    dims = (channel_mode(form.core.dim()), *([1] * len(form.factors)))  # core: channel slices; factors: columns
    pairs = [(None, None) if t is None else quantize_int8(t, dim) for t, dim in zip(tensors, dims)]
    return (*(q for q, _ in pairs), *(s for _, s in pairs))


def load_form(saved: Sequence[Tensor | None], dtype: torch.dtype | None) -> TuckerForm:
    """The stored form back, in ``dtype`` (None: as stored); int8 storage is told apart by its dtype."""
    core = saved[0]
    if core.dtype != torch.int8:
        first, *factors = (t if t is None or dtype is None else t.to(dtype) for t in saved)
        return TuckerForm(first, tuple(factors))
    count = len(saved) // 2
    values, scales = saved[:count], saved[count:]
    dtype = dtype or torch.float32
    dims = (channel_mode(core.dim()), *([1] * (count - 1)))
    core, *factors = (None if q is None else dequantize_int8(q, s, dim, dtype)
                      for q, s, dim in zip(values, scales, dims))
    return TuckerForm(core, tuple(factors))


def tucker_nbytes(shape: Sequence[int], ranks: Sequence[int], itemsize: int) -> int:
    """Bytes a Tucker form at ``ranks`` holds at ``itemsize`` bytes per number; at 1 (int8), with its scales."""
    nbytes = tucker_numel(shape, ranks) * itemsize
    if itemsize == 1:
        stored_factor_ranks = sum(k for d, k in zip(shape, ranks, strict=True) if k < d)
        nbytes += SCALE_ITEMSIZE * (ranks[channel_mode(len(shape))] + stored_factor_ranks)
    return nbytes
