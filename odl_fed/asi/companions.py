"""The frozen layers between trained ones, made to hold only what their backward needs.

In a fine-tuned block (conv -> BatchNorm -> ReLU6 -> conv ...) the convs are not the only layers
that save activations: an eval-mode ``BatchNorm2d`` saves its whole input and a ``ReLU6`` its
whole output. A frozen BatchNorm's backward is a per-channel scale (it needs no input), and a
ReLU's backward needs one bit per element: which elements passed. These modules keep exactly that.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d

__all__ = ["FrozenBatchNorm2d", "BitMaskReLU", "pack_bits", "unpack_bits"]

# Gathers the lowest bit of each of 8 little-endian bytes of an int64 into its top byte.
_GATHER = 0x0102040810204080
# Spreads a byte over 8 bytes; the mask then keeps bit i in byte i.
_SPREAD = 0x0101010101010101
_SPREAD_MASK = 0x8040201008040201 - (1 << 64)  # as a signed int64
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as ``ceil(numel / 8)`` bytes, element ``i`` in bit ``i % 8`` of byte ``i // 8``."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder == "little":
        # Eight 0/1 bytes read as one int64; the multiply sums them into the top byte (no carries).
        words = flat.view(torch.uint8).view(torch.int64)
        return ((words * _GATHER) >> 56).to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    if sys.byteorder == "little":
        words = (packed.to(torch.int64) * _SPREAD) & _SPREAD_MASK
        return words.view(torch.uint8).ne(0)[:numel]
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-1) & weights).ne(0).view(-1)[:numel]


class _BitMaskClampFunction(torch.autograd.Function):
    """``clamp(x, 0, upper)`` saving one bit per element: where the gradient passes."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None) -> Tensor:
        if upper is None:
            y = torch.relu(x)
            passes = y > 0
        else:
            y = F.hardtanh(x, 0.0, upper)
            passes = (y > 0) & (y < upper)  # torch's own rule: strictly inside the interval
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(passes))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (packed,) = ctx.saved_tensors
        passes = unpack_bits(packed, grad_output.numel()).view(ctx.shape)
        return grad_output * passes, None


class BitMaskReLU(nn.Module):
    """``ReLU`` (``upper=None``) or ``ReLU6`` (``upper=6``) that saves a bit mask for backward."""

    def __init__(self, upper: float | None = None):
        super().__init__()
        self.upper = upper

    @classmethod
    def from_module(cls, module: nn.Module) -> BitMaskReLU:
        if isinstance(module, nn.ReLU6):
            return cls(upper=6.0)
        if isinstance(module, nn.ReLU):
            return cls(upper=None)
        if isinstance(module, nn.Hardtanh) and module.min_val == 0.0:
            return cls(upper=module.max_val)
        raise TypeError(f"BitMaskReLU replaces nn.ReLU, nn.ReLU6 or Hardtanh(0, t), but got {module!r}")

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return torch.relu(x) if self.upper is None else F.hardtanh(x, 0.0, self.upper)
        return _BitMaskClampFunction.apply(x, self.upper)

    def extra_repr(self) -> str:
        return "upper=None (ReLU)" if self.upper is None else f"upper={self.upper}"


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """Eval-mode BatchNorm as ``x * scale + shift``: its backward keeps only ``scale`` (C numbers).

    torchvision's module (same buffers and state-dict keys as ``BatchNorm2d``) with a one-pass
    forward: ``addcmul`` saves ``scale`` for the input gradient and nothing of ``x``.
    """

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(f"FrozenBatchNorm2d needs running statistics, but {bn!r} does not track them")
        frozen = cls(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)

    def to_batchnorm(self) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(self.weight.numel(), eps=self.eps).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            bn.weight.copy_(self.weight)
            bn.bias.copy_(self.bias)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
        return bn.eval()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
