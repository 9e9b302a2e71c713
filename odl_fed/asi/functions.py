"""Autograd Functions of the compressed layers: they only move tensors through ``ctx``.

The forward is the exact layer; what the backward needs is saved with ``save_for_backward``
(the variant's packed tensors, and the weight only when the input gradient is wanted), so
``torch.autograd.graph.saved_tensors_hooks`` sees exactly what is held (a None among the packed
tensors is a mode kept whole: nothing is held for it). The conv's weight-gradient contraction
order is the layer's choice for its shape, passed in, not chosen here. The input gradient is
exact at any rank; the weight gradient comes from the variant's packed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input

from odl_fed.asi.variants import Variant
from odl_fed.asi.weight_grad import Conv2dGeometry, Conv2dOrder

__all__ = ["CompressedConv2dFunction", "CompressedLinearFunction"]


class CompressedConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: Conv2dGeometry,
                variant: Variant, order: Conv2dOrder | None, *packed: Tensor | None) -> Tensor:
        ctx.geometry = geometry
        ctx.variant = variant
        ctx.order = order
        ctx.input_shape = x.shape
        ctx.weight_shape = weight.shape
        ctx.num_packed = len(packed)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, *packed)
        g = geometry
        return F.conv2d(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        weight, *packed = ctx.saved_tensors
        g = ctx.geometry
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = conv2d_input(ctx.input_shape, weight, grad_output, g.stride, g.padding, g.dilation, g.groups)
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.variant.conv2d_weight(packed, grad_output, ctx.weight_shape, g, ctx.order)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return (grad_input, grad_weight, grad_bias, None, None, None, *([None] * ctx.num_packed))


class CompressedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, variant: Variant,
                *packed: Tensor | None) -> Tensor:
        ctx.variant = variant
        ctx.num_packed = len(packed)
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, *packed)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        weight, *packed = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output @ weight  # (..., C_out) @ (C_out, C) -> (..., C)
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.variant.linear_weight(packed, grad_output)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return (grad_input, grad_weight, grad_bias, None, *([None] * ctx.num_packed))
