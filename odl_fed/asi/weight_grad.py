"""Weight gradients computed straight from a Tucker form of the layer input.

The full-size input is never rebuilt unless that is the cheapest way. A conv's weight gradient
has three contraction orders; each is exact, and which one costs fewest FLOPs depends on the
layer's shape and ranks, so :func:`conv2d_weight_order` picks it once per layer shape (the layer
caches it) with :func:`conv2d_weight_flops`, an analytic count checked against
``torch.utils.flop_counter`` in the tests:

- ``"expand"``: ``dY`` contracted over the batch factor, the core expanded over height and width,
  the conv's weight correlation over the ``K_b`` "samples", the channel factor last. Any conv.
- ``"project"``: a 1x1 conv (groups 1) only: ``dY`` is contracted onto the batch, height and width
  factors (each output pixel reads one input pixel), then meets the core, then the channel factor.
  No correlation over full-size maps at all.
- ``"reconstruct"``: the input rebuilt from the form, then the conv's own weight gradient. Wins for
  depthwise convs, where the other orders correlate every output channel with all ``K_c`` channels.

A mode kept whole has no factor (None): no product with its identity is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_weight

from odl_fed.asi.tucker import (
    TuckerForm,
    contraction_flops,
    contraction_order,
    expand,
    expansion_flops,
    expansion_order,
    tucker_core,
)

__all__ = [
    "CONV2D_ORDERS",
    "Conv2dGeometry",
    "Conv2dOrder",
    "conv2d_output_size",
    "conv2d_weight_flops",
    "conv2d_weight_from_tucker",
    "conv2d_weight_order",
    "linear_weight_from_tucker",
]

Conv2dOrder = Literal["expand", "project", "reconstruct"]
# Ties go to the first: "project" is plain GEMMs, "expand" goes through the conv's weight correlation
# (a few ms of fixed cost on CPU even when tiny).
CONV2D_ORDERS: tuple[Conv2dOrder, ...] = ("project", "expand", "reconstruct")
# Orders whose FLOPs are within this factor of the fewest count as tied.
ORDER_TIE_RATIO = 1.1


class Conv2dGeometry(NamedTuple):
    """What a conv needs besides its tensors (padding already resolved to two ints)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def conv2d_output_size(size: Sequence[int], kernel: Sequence[int], geometry: Conv2dGeometry) -> tuple[int, int]:
    """``(H', W')`` of a conv over an ``(H, W)`` input."""
    g = geometry
    return tuple((size[i] + 2 * g.padding[i] - g.dilation[i] * (kernel[i] - 1) - 1) // g.stride[i] + 1
                 for i in range(2))


def _pointwise(weight_shape: Sequence[int], geometry: Conv2dGeometry) -> bool:
    return tuple(weight_shape[2:]) == (1, 1) and geometry.groups == 1


def conv2d_weight_flops(input_shape: Sequence[int], ranks: Sequence[int], weight_shape: Sequence[int],
                        geometry: Conv2dGeometry) -> dict[Conv2dOrder, int]:
    """FLOPs of each applicable contraction order for ``dW`` of a conv whose input ``(B, C, H, W)``
    is held at ``ranks`` (a mode with ``K_n == d_n`` kept whole: no factor, no product).

    Counted as ``torch.utils.flop_counter`` counts (2 per multiply-add of every matmul and conv).
    """
    batch, channels, height, width = input_shape
    k_b, k_c, k_h, k_w = ranks
    c_out, c_in_group, kh, kw = weight_shape
    h_out, w_out = conv2d_output_size((height, width), (kh, kw), geometry)
    has = [k < d for d, k in zip(input_shape, ranks)]
    vanilla = 2 * batch * c_out * c_in_group * kh * kw * h_out * w_out  # conv2d_weight on the full input
    costs: dict[Conv2dOrder, int] = {}

    # expand: Z1 = U_b^T dY, Z3 = core x U_h x U_w, Z4 = correlation, then U_c per group
    z1 = 2 * k_b * batch * c_out * h_out * w_out if has[0] else 0
    z3_shape = (k_b, k_c, height, width)
    z3 = expansion_flops(z3_shape, ranks, expansion_order(z3_shape, ranks, [m for m in (2, 3) if has[m]]))
    if has[1]:
        z4 = 2 * k_b * c_out * k_c * kh * kw * h_out * w_out
        last = 2 * c_out * c_in_group * k_c * kh * kw
    else:
        z4, last = vanilla // batch * k_b, 0
    costs["expand"] = z1 + z3 + z4 + last

    if _pointwise(weight_shape, geometry):
        # project: dY x U_b x U_h' x U_w' (U_h': the rows of U_h the output pixels read), core, U_c
        out_ranks = (k_b, c_out, k_h, k_w)
        rows = _project_rows_needed((height, width), (h_out, w_out), geometry, has)
        modes = [m for m in (0, 2, 3) if (has[m] if m == 0 else rows[m - 2])]
        dy_shape = (batch, c_out, h_out, w_out)
        order = contraction_order(dy_shape, out_ranks, modes)
        costs["project"] = (contraction_flops(dy_shape, out_ranks, order) + 2 * k_b * c_out * k_h * k_w * k_c
                            + (2 * c_out * k_c * channels if has[1] else 0))

    costs["reconstruct"] = expansion_flops(input_shape, ranks, expansion_order(input_shape, ranks)) + vanilla
    return costs


def conv2d_weight_order(input_shape: Sequence[int], ranks: Sequence[int], weight_shape: Sequence[int],
                        geometry: Conv2dGeometry) -> Conv2dOrder:
    """The contraction order with the fewest FLOPs for this layer shape (within :data:`ORDER_TIE_RATIO`
    of the fewest: the first in :data:`CONV2D_ORDERS`)."""
    costs = conv2d_weight_flops(input_shape, ranks, weight_shape, geometry)
    fewest = min(costs.values())
    return next(o for o in CONV2D_ORDERS if o in costs and costs[o] <= ORDER_TIE_RATIO * fewest)


def conv2d_weight_from_tucker(
    form: TuckerForm, grad_output: Tensor, weight_shape: torch.Size, geometry: Conv2dGeometry,
    order: Conv2dOrder | None = None,
) -> Tensor:
    """``dW`` of a conv whose input ``(B, C, H, W)`` is held as a Tucker form ``(K_b, K_c, K_h, K_w)``.

    ``order`` is one of :data:`CONV2D_ORDERS` (default: :func:`conv2d_weight_order`); all are exact.
    """
    if order is None:
        order = conv2d_weight_order(form.shape, form.ranks, weight_shape, geometry)
    if order == "expand":
        return _weight_by_expanding(form, grad_output, weight_shape, geometry)
    if order == "project":
        if not _pointwise(weight_shape, geometry):
            raise ValueError(f"order 'project' is for 1x1 convs with groups=1, but got weight shape "
                             f"{tuple(weight_shape)} and groups={geometry.groups}")
        return _weight_by_projecting(form, grad_output, weight_shape, geometry)
    if order == "reconstruct":
        g = geometry
        x = expand(form.core, form.factors)  # (B, C, H, W)
        return conv2d_weight(x, weight_shape, grad_output, g.stride, g.padding, g.dilation, g.groups)
    raise ValueError(f"order must be one of {list(CONV2D_ORDERS)}, but got order={order!r}")


def _weight_by_expanding(form: TuckerForm, grad_output: Tensor, weight_shape, geometry: Conv2dGeometry) -> Tensor:
    core = form.core  # (K_b, K_c, K_h, K_w)
    u_b, u_c, u_h, u_w = form.factors  # (B, K_b) (C, K_c) (H, K_h) (W, K_w), None: kept whole
    k_b, k_c, _, _ = core.shape
    batch, c_out, h_out, w_out = grad_output.shape
    groups, kh, kw = geometry.groups, weight_shape[2], weight_shape[3]
    g = geometry

    # Z1: dY contracted over the batch.  (K_b, B) @ (B, C_out*H'*W') -> (K_b, C_out, H', W')
    z1 = grad_output if u_b is None else (u_b.T @ grad_output.reshape(batch, -1)).view(k_b, c_out, h_out, w_out)
    # Z3: core expanded over height and width.  (K_b, K_c, K_h, K_w) -> (K_b, K_c, H, W)
    z3 = expand(core, (None, None, u_h, u_w))
    if u_c is None:  # the channels kept whole: Z3 is the input's own channels, the conv's groups apply
        return conv2d_weight(z3, weight_shape, z1, g.stride, g.padding, g.dilation, groups)
    # Z4: the conv's weight correlation over the K_b "samples".  -> (C_out, K_c, kh, kw)
    z4 = conv2d_weight(z3, (c_out, k_c, kh, kw), z1, stride=g.stride, padding=g.padding, dilation=g.dilation,
                       groups=1)
    # dW: channel factor, per group.  (g, 1, C/g, K_c) @ (g, C_out/g, K_c, kh*kw) -> (g, C_out/g, C/g, kh*kw)
    c_per_group = u_c.shape[0] // groups
    u_c = u_c.reshape(groups, 1, c_per_group, k_c)
    z4 = z4.reshape(groups, c_out // groups, k_c, kh * kw)
    return torch.matmul(u_c, z4).reshape(weight_shape)


def _project_rows_needed(size, out_size, geometry: Conv2dGeometry, has: Sequence[bool]) -> tuple[bool, bool]:
    """Whether height / width need a factor on the output grid (a whole mode needs none when the
    1x1 conv reads every input pixel once, in place: no padding, stride 1)."""
    return tuple(has[2 + i] or geometry.padding[i] != 0 or geometry.stride[i] != 1 or out_size[i] != size[i]
                 for i in range(2))


def _rows_read(u: Tensor | None, size: int, out_size: int, padding: int, stride: int, like: Tensor) -> Tensor | None:
    """The rows of ``u`` (``(H, K)``, None: identity) that output pixels ``0..H'-1`` of a 1x1 conv read:
    input row ``stride * h' - padding``, zero where that falls in the padding.  -> (H', K)"""
    if u is None and padding == 0 and stride == 1 and out_size == size:
        return None
    if u is None:
        u = torch.eye(size, dtype=like.dtype, device=like.device)
    padded = F.pad(u, (0, 0, padding, padding))  # (H + 2p, K)
    return padded[::stride][:out_size].contiguous()


def _weight_by_projecting(form: TuckerForm, grad_output: Tensor, weight_shape, geometry: Conv2dGeometry) -> Tensor:
    core = form.core  # (K_b, K_c, K_h, K_w)
    u_b, u_c, u_h, u_w = form.factors  # (B, K_b) (C, K_c) (H, K_h) (W, K_w), None: kept whole
    k_b, k_c, k_h, k_w = core.shape
    _, c_out, h_out, w_out = grad_output.shape
    height, width = form.shape[2:]
    g = geometry
    u_h = _rows_read(u_h, height, h_out, g.padding[0], g.stride[0], grad_output)  # (H', K_h)
    u_w = _rows_read(u_w, width, w_out, g.padding[1], g.stride[1], grad_output)  # (W', K_w)
    # P: dY contracted onto the batch, height and width factors.  (B, C_out, H', W') -> (K_b, C_out, K_h, K_w)
    p = tucker_core(grad_output.contiguous(), (u_b, None, u_h, u_w))
    # Z: P meets the core over (K_b, K_h, K_w).  sum_b (C_out, K_h*K_w) @ (K_h*K_w, K_c) -> (C_out, K_c)
    m = k_h * k_w
    z = torch.bmm(p.reshape(k_b, c_out, m), core.reshape(k_b, k_c, m).transpose(1, 2)).sum(0)
    # dW: channel factor.  (C_out, K_c) @ (K_c, C) -> (C_out, C, 1, 1)
    if u_c is not None:
        z = z @ u_c.T
    return z.reshape(weight_shape)


def linear_weight_from_tucker(form: TuckerForm, grad_output: Tensor) -> Tensor:
    """``dW`` of a linear layer whose input ``(B, ..., C)`` is held as a Tucker form.

    All modes but the last (batch, tokens) are contracted out of ``dY`` first (a mode kept whole is
    skipped), then the core meets the result, then the channel factor: ``(C_out, C)`` without the
    ``(B, ..., C)`` input.
    """
    *leading, u_c = form.factors
    # (B, L, C_out) -> (K_b, L, C_out) -> (K_b, K_l, C_out)
    z = tucker_core(grad_output.contiguous(), (*leading, None))
    k_c = form.core.shape[-1]
    core = form.core.reshape(-1, k_c)  # (K_b*K_l, K_c)
    z = z.reshape(-1, z.shape[-1])  # (K_b*K_l, C_out)
    grad = z.T @ core  # (C_out, K_c)
    return grad if u_c is None else grad @ u_c.T  # (C_out, K_c) @ (K_c, C) -> (C_out, C)
