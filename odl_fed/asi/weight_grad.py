"""Weight gradients computed straight from a Tucker form of the layer input.

The full-size input is never rebuilt: the output gradient is first contracted with the batch
factor (it shrinks ``B`` to ``K_b``, the largest saving), the small core is expanded only over
the spatial modes, and the channel factor is applied last, on the kernel-sized result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.grad import conv2d_weight

from odl_fed.asi.tucker import TuckerForm

__all__ = ["Conv2dGeometry", "conv2d_weight_from_tucker", "linear_weight_from_tucker"]


class Conv2dGeometry(NamedTuple):
    """What a conv needs besides its tensors (padding already resolved to two ints)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def conv2d_weight_from_tucker(
    form: TuckerForm, grad_output: Tensor, weight_shape: torch.Size, geometry: Conv2dGeometry
) -> Tensor:
    """``dW`` of a conv whose input ``(B, C, H, W)`` is held as a Tucker form ``(K_b, K_c, K_h, K_w)``."""
    core = form.core  # (K_b, K_c, K_h, K_w)
    u_b, u_c, u_h, u_w = form.factors  # (B, K_b) (C, K_c) (H, K_h) (W, K_w)
    k_b, k_c, k_h, k_w = core.shape
    batch, c_out, h_out, w_out = grad_output.shape
    groups = geometry.groups

    # Z1: dY contracted over the batch.  (K_b, B) @ (B, C_out*H'*W') -> (K_b, C_out, H', W')
    z1 = (u_b.T @ grad_output.reshape(batch, -1)).view(k_b, c_out, h_out, w_out)
    # Z3: core expanded over height and width.  (K_b*K_c, K_h, K_w) -> (K_b, K_c, H, W)
    z3 = (u_h @ core.reshape(k_b * k_c, k_h, k_w) @ u_w.T).view(k_b, k_c, u_h.shape[0], u_w.shape[0])
    # Z4: the conv's weight correlation over the K_b "samples".  -> (C_out, K_c, kh, kw)
    kh, kw = weight_shape[2], weight_shape[3]
    z4 = conv2d_weight(
        z3, (c_out, k_c, kh, kw), z1,
        stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation, groups=1,
    )
    # dW: channel factor, per group.  (g, 1, C/g, K_c) @ (g, C_out/g, K_c, kh*kw) -> (g, C_out/g, C/g, kh*kw)
    c_per_group = u_c.shape[0] // groups
    u_c = u_c.reshape(groups, 1, c_per_group, k_c)
    z4 = z4.reshape(groups, c_out // groups, k_c, kh * kw)
    return torch.matmul(u_c, z4).reshape(weight_shape)


def linear_weight_from_tucker(form: TuckerForm, grad_output: Tensor) -> Tensor:
    """``dW`` of a linear layer whose input ``(B, ..., C)`` is held as a Tucker form.

    All modes but the last (batch, tokens) are contracted out of ``dY`` first, then the core
    meets the result, then the channel factor: ``(C_out, C)`` without the ``(B, ..., C)`` input.
    """
    *leading, u_c = form.factors
    z = grad_output  # (B, L, C_out) -> (K_b, L, C_out) -> (K_b, K_l, C_out)
    for mode, u in enumerate(leading):
        shape = z.shape
        t = z.reshape(shape[:mode].numel(), shape[mode], -1)  # (A, d_n, Z)
        z = torch.matmul(u.T, t).reshape(*shape[:mode], u.shape[1], *shape[mode + 1:])
    k_c = u_c.shape[1]
    core = form.core.reshape(-1, k_c)  # (K_b*K_l, K_c)
    z = z.reshape(-1, z.shape[-1])  # (K_b*K_l, C_out)
    return (z.T @ core) @ u_c.T  # (C_out, K_c) @ (K_c, C) -> (C_out, C)
