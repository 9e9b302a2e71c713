"""Compressed-backprop wrappers of ``Conv2d`` and ``Linear``.

A wrapper keeps its ``base_layer`` (same parameters: ``conv.weight.grad`` is filled by backward)
and the warm-start state of its variant: one basis buffer per input mode, kept across steps and
in ``state_dict``. Forward is exact; only what is saved for backward changes. Without a weight
gradient to compute (``torch.no_grad``, inference, a frozen weight) nothing is compressed.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from odl_fed.asi.functions import CompressedConv2dFunction, CompressedLinearFunction
from odl_fed.asi.tucker import Step, contraction_order
from odl_fed.asi.variants import Variant, get_variant
from odl_fed.asi.weight_grad import Conv2dGeometry, Conv2dOrder, conv2d_weight_order

__all__ = ["ASIConv2d", "ASILinear", "Ranks", "conv_geometry", "validate_ranks"]

logger = logging.getLogger(__name__)

Ranks = Sequence[int | None]


class ContractionOrders(NamedTuple):
    """What a layer chooses once per input shape (the cheapest in FLOPs) and reuses every step."""

    core: tuple[Step, ...] | None  # the product steps that contract the input into the Tucker core, in order
    weight: Conv2dOrder | None  # a conv's weight-gradient order (weight_grad.CONV2D_ORDERS)


CONV_MODES = ("batch", "channel", "height", "width")
LINEAR_MODES = {2: ("batch", "channel"), 3: ("batch", "token", "channel")}


def validate_ranks(ranks: Ranks, modes: Sequence[str], layer: str) -> tuple[int | None, ...]:
    """Ranks as a tuple, one per mode: a positive int, or None for the mode's full size."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != len(modes):
        raise ValueError(
            f"{layer}: ranks must be a sequence of {len(modes)} values, one per mode {tuple(modes)}, "
            f"but got ranks={ranks!r}"
        )
    for mode, rank in zip(modes, ranks):
        if rank is None:
            continue
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"{layer}: the {mode} rank must be a positive integer or None, but got {rank!r}")
    return tuple(None if r is None else int(r) for r in ranks)


class _CompressedLayer(nn.Module):
    """What the conv and linear wrappers share: base layer, ranks, variant, warm bases."""

    modes: tuple[str, ...]

    def __init__(self, base_layer: nn.Module, *, ranks: Ranks, variant: str | Variant, modes, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name
        self.modes = tuple(modes)
        self.variant = get_variant(variant)
        if self.variant.uses_ranks:
            self.ranks = validate_ranks(ranks, self.modes, self._label())
        elif ranks is not None:
            raise ValueError(f"{self._label()}: variant {self.variant.name!r} takes no ranks, but got ranks={ranks!r}")
        else:
            self.ranks = None
        self.last_ranks: tuple[int, ...] | None = None
        # (input shape, ranks) -> orders: derived from shapes alone, so not state (not in state_dict)
        self._orders: dict[tuple, ContractionOrders] = {}
        for mode in self.modes:
            self.register_buffer(f"basis_{mode}", None)

    def _label(self) -> str:
        return f"{type(self).__name__} {self.layer_name!r}" if self.layer_name else type(self).__name__

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def bases(self) -> list[Tensor | None]:
        return [getattr(self, f"basis_{mode}") for mode in self.modes]

    def reset_parameters(self) -> None:
        """Forget the warm-start bases (the next step starts from the exact leading subspaces)."""
        for mode in self.modes:
            setattr(self, f"basis_{mode}", None)

    def effective_ranks(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """The ranks used for an input of ``shape``: each capped at its mode's size."""
        if self.ranks is None:
            return None
        ranks = tuple(d if r is None else min(r, d) for r, d in zip(self.ranks, shape, strict=True))
        if ranks != self.last_ranks:
            logger.debug("%s: ranks %s are %s for input %s", self._label(), self.ranks, ranks, tuple(shape))
        return ranks

    def contraction_orders(self, shape: Sequence[int], ranks: Sequence[int] | None) -> ContractionOrders:
        """The contraction orders for an input of ``shape`` held at ``ranks``: chosen on the first
        call for that shape, by FLOP count, then cached on the layer."""
        key = (tuple(shape), None if ranks is None else tuple(ranks))
        orders = self._orders.get(key)
        if orders is None:
            core = None if ranks is None else contraction_order(shape, ranks)
            orders = self._orders[key] = ContractionOrders(core, self._weight_order(shape, ranks))
            logger.debug("%s: contraction orders %s for input %s at ranks %s", self._label(), orders, key[0], key[1])
        return orders

    def _weight_order(self, shape: Sequence[int], ranks: Sequence[int] | None) -> Conv2dOrder | None:
        return None

    def _pack(self, x: Tensor) -> tuple[tuple[Tensor | None, ...], ContractionOrders]:
        with torch.no_grad():
            x = x.detach().contiguous()
            ranks = self.effective_ranks(x.shape)
            orders = self.contraction_orders(x.shape, ranks)
            saved, bases = self.variant.pack(x, ranks, self.bases(), core_order=orders.core)
        self.last_ranks = ranks
        for mode, basis in zip(self.modes, bases or ()):
            setattr(self, f"basis_{mode}", basis)
        return saved, orders

    def _needs_graph(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        bias = self.bias
        return x.requires_grad or self.weight.requires_grad or (bias is not None and bias.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Bases change shape with the batch and are absent before the first step: take them as saved.
        for mode in self.modes:
            saved = state_dict.get(f"{prefix}basis_{mode}")
            setattr(self, f"basis_{mode}", None if saved is None else saved.detach().clone().to(self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}" if self.ranks is None else f"variant={self.variant.name}, ranks={self.ranks}"


class ASIConv2d(_CompressedLayer):
    """``Conv2d`` whose weight gradient comes from a Tucker form of its input ``(B, C, H, W)``.

    Parameters
    ----------
    base_layer : nn.Conv2d
        The layer to wrap; its parameters are used, not copied.
    ranks : (k_batch, k_channel, k_height, k_width)
        Tucker ranks; each is capped at its mode's size, None means the full size.
    variant : str (default: "asi")
        How the input is compressed: "asi" (warm subspace iteration) or "hosvd".
    """

    def __init__(self, base_layer: nn.Conv2d, *, ranks: Ranks | None, variant: str | Variant = "asi", name: str = "",
                 pre_padding: nn.Module | None = None):
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"ASIConv2d wraps nn.Conv2d, but got {type(base_layer).__name__}")
        super().__init__(base_layer, ranks=ranks, variant=variant, modes=CONV_MODES, name=name)
        # A padding the base layer applies in its own forward (EfficientNet's static "same" padding):
        # folded into the conv's own padding when it can be, so the input held is the unpadded one.
        self.geometry, self.pre_padding = conv_geometry(base_layer, pre_padding, self._label())

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, ranks: Ranks | None, variant: str | Variant = "asi",
                  name: str = "", pre_padding: nn.Module | None = None) -> ASIConv2d:
        return cls(conv, ranks=ranks, variant=variant, name=name, pre_padding=pre_padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_padding is not None:
            x = self.pre_padding(x)
        g = self.geometry
        if not self._needs_graph(x):
            return F.conv2d(x, self.weight, self.bias, g.stride, g.padding, g.dilation, g.groups)
        if x.dim() != 4:
            raise ValueError(f"{self._label()}: expected an input (B, C, H, W), but got shape {tuple(x.shape)}")
        packed, orders = self._pack(x) if self.weight.requires_grad else ((), None)
        order = None if orders is None else orders.weight
        return CompressedConv2dFunction.apply(x, self.weight, self.bias, g, self.variant, order, *packed)

    def _weight_order(self, shape, ranks):
        if ranks is None:
            return None
        return conv2d_weight_order(shape, ranks, self.weight.shape, self.geometry)


class ASILinear(_CompressedLayer):
    """``Linear`` whose weight gradient comes from a Tucker form of its input.

    ``ranks`` has two values ``(k_batch, k_channel)`` for inputs ``(B, C)`` or three
    ``(k_batch, k_token, k_channel)`` for token inputs ``(B, L, C)``; inputs with more middle
    dimensions ``(B, L1, L2, ..., C)`` have them flattened into the token mode.
    """

    def __init__(self, base_layer: nn.Linear, *, ranks: Ranks | None, variant: str | Variant = "asi", name: str = ""):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"ASILinear wraps nn.Linear, but got {type(base_layer).__name__}")
        # gradfilt (no ranks) pools tokens: it is for (B, L, C) inputs
        modes = LINEAR_MODES.get(len(ranks) if isinstance(ranks, Sequence) else 3 if ranks is None else -1,
                                 LINEAR_MODES[2])
        super().__init__(base_layer, ranks=ranks, variant=variant, modes=modes, name=name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, ranks: Ranks | None, variant: str | Variant = "asi",
                    name: str = "") -> ASILinear:
        return cls(linear, ranks=ranks, variant=variant, name=name)

    def forward(self, x: Tensor) -> Tensor:
        if not self._needs_graph(x):
            return F.linear(x, self.weight, self.bias)
        n_modes = len(self.modes)
        if x.dim() < n_modes or (n_modes == 2 and x.dim() != 2):
            raise ValueError(
                f"{self._label()}: ranks {self.ranks} are for inputs with modes {self.modes}, "
                f"but got an input of shape {tuple(x.shape)}"
            )
        leading = x.shape[:-1]
        if x.dim() > n_modes:
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, L1, ..., C) -> (B, L, C)
        packed = self._pack(x)[0] if self.weight.requires_grad else ()
        y = CompressedLinearFunction.apply(x, self.weight, self.bias, self.variant, *packed)
        return y.reshape(*leading, y.shape[-1])


def conv_geometry(conv: nn.Conv2d, pre_padding: nn.Module | None = None, label: str = ""
                  ) -> tuple[Conv2dGeometry, nn.Module | None]:
    """The conv's geometry, with a padding applied before it (``pre_padding``) folded in where the
    conv can apply it itself (``Identity``, or a symmetric ``ZeroPad2d``), and what is left of it.

    Folded, the compressed layer holds the unpadded input: fewer numbers to compress, and exact
    (the padded input's Tucker form is the unpadded one's with zero rows added to the height and
    width factors, which is what the conv's padding does in the weight gradient).
    """
    geometry = _conv_geometry(conv, label)
    if pre_padding is None or isinstance(pre_padding, nn.Identity):
        return geometry, None
    if isinstance(pre_padding, nn.ZeroPad2d):
        left, right, top, bottom = pre_padding.padding
        if left == right and top == bottom:
            padding = (geometry.padding[0] + top, geometry.padding[1] + left)
            return geometry._replace(padding=padding), None
    return geometry, pre_padding


def _conv_geometry(conv: nn.Conv2d, label: str) -> Conv2dGeometry:
    if conv.padding_mode != "zeros":
        raise ValueError(f"{label}: padding_mode must be one of ['zeros'], but got padding_mode={conv.padding_mode!r}")
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same"
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError(
                    f"{label}: padding='same' needs an even dilation*(kernel-1) per side to be symmetric, "
                    f"but got kernel_size={conv.kernel_size}, dilation={conv.dilation}"
                )
            padding = tuple(t // 2 for t in totals)
    return Conv2dGeometry(_pair(conv.stride), _pair(padding), _pair(conv.dilation), conv.groups)
