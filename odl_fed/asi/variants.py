"""How a compressed layer holds its input for the backward pass: one object per method.

A variant turns the layer input into the few tensors saved for backward (``pack``) and computes
the weight gradient from them (``conv2d_weight`` / ``linear_weight``). Layers hold the per-layer
state (the previous step's bases); variants are stateless, so one instance serves every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_weight

from odl_fed.asi.storage import STORAGE_NAMES, load_form, store_form
from odl_fed.asi.tucker import TuckerForm, hosvd_factors, leading_subspace, mode_grams, subspace_iteration, tucker_core
from odl_fed.asi.weight_grad import Conv2dGeometry, Conv2dOrder, conv2d_weight_from_tucker, linear_weight_from_tucker

__all__ = ["Variant", "TuckerVariant", "ASIVariant", "HOSVDVariant", "GradFilterVariant", "VARIANTS", "get_variant"]


Packed = tuple[tuple[Tensor, ...], "tuple[Tensor, ...] | None"]


class Variant:
    """How a compressed layer holds its input: ``pack`` it, and get ``dW`` back from what was packed.

    ``pack`` returns the tensors to save for backward and the per-mode bases to keep for the next
    step (None when the variant keeps no state). ``uses_ranks`` says whether the layer needs ranks.
    ``core_order`` and ``order`` are the contraction orders the layer chose once for its shape
    (None: chosen on the spot); a variant without contractions ignores them.
    """

    name: str = ""
    uses_ranks: bool = True

    def pack(self, x: Tensor, ranks: Sequence[int] | None, previous: Sequence[Tensor | None], *,
             core_order: Sequence[int] | None = None) -> Packed:
        raise NotImplementedError

    def conv2d_weight(self, saved: Sequence[Tensor | None], grad_output: Tensor, weight_shape,
                      geometry: Conv2dGeometry, order: Conv2dOrder | None = None):
        raise NotImplementedError

    def linear_weight(self, saved: Sequence[Tensor], grad_output: Tensor):
        raise NotImplementedError


class TuckerVariant(Variant):
    """A variant that holds the input as a Tucker form; subclasses choose the factors.

    ``storage``: the dtype the core and factors are held in for backward (None: the input's own;
    :mod:`odl_fed.asi.storage`). A 16-bit storage halves the bytes held at the same ranks, an 8-bit
    one (with a float32 scale per slice) quarters them, so a budget buys more rank; the weight
    gradient is computed in the input's dtype from the stored form, and the warm-start bases kept
    for the next step stay in the input's dtype.
    """

    def __init__(self, storage: torch.dtype | None = None):
        if storage is not None and storage not in STORAGE_NAMES:
            raise ValueError(f"storage must be one of {list(STORAGE_NAMES)} or None, but got storage={storage!r}")
        self.storage = storage
        if storage is not None:
            self.name = f"{type(self).name}-{STORAGE_NAMES[storage]}"  # e.g. asi-fp16

    def __repr__(self) -> str:
        return f"{type(self).__name__}(storage={self.storage})" if self.storage else f"{type(self).__name__}()"

    def factors(self, x: Tensor, ranks: Sequence[int], previous: Sequence[Tensor | None]) -> list[Tensor | None]:
        """One factor per mode, None for a mode kept whole (rank >= its size)."""
        raise NotImplementedError

    def pack(self, x: Tensor, ranks: Sequence[int], previous: Sequence[Tensor | None], *,
             core_order: Sequence[int] | None = None) -> Packed:
        """Compress contiguous ``x`` to a Tucker form at ``ranks`` (each already <= its mode's size)."""
        factors = tuple(None if u is None else u.contiguous() for u in self.factors(x, ranks, previous))
        form = TuckerForm(tucker_core(x, factors, core_order), factors)
        return store_form(form, self.storage), form.factors

    @staticmethod
    def unpack(saved: Sequence[Tensor | None], dtype: torch.dtype | None = None) -> TuckerForm:
        """The stored form, in ``dtype`` when given (the dtype the gradient is computed in)."""
        return load_form(saved, dtype)

    def conv2d_weight(self, saved, grad_output, weight_shape, geometry, order=None):
        return conv2d_weight_from_tucker(self.unpack(saved, grad_output.dtype), grad_output, weight_shape, geometry,
                                         order)

    def linear_weight(self, saved: Sequence[Tensor], grad_output: Tensor):
        return linear_weight_from_tucker(self.unpack(saved, grad_output.dtype), grad_output)


class ASIVariant(TuckerVariant):
    """Activation Subspace Iteration: one warm-started subspace-iteration step per mode.

    A mode with no usable previous basis (the first step, or a batch of another size) starts
    from its exact leading subspace instead of a random one, so no step pays a cold-start error.
    """

    name = "asi"

    def factors(self, x, ranks, previous):
        bases: list[Tensor | None] = []
        warm, cold = [], []
        for mode, (rank, prev) in enumerate(zip(ranks, previous, strict=True)):
            dim = x.shape[mode]
            if rank >= dim:
                bases.append(None)  # kept whole: no basis, no product
            elif prev is None or tuple(prev.shape) != (dim, rank):
                bases.append(None)
                cold.append(mode)
            else:
                bases.append(prev.to(x.dtype))
                warm.append(mode)
        bases = subspace_iteration(x, bases, warm)
        grams = mode_grams(x, cold)
        for mode in cold:
            bases[mode] = leading_subspace(x, mode, ranks[mode], grams[mode])
        return bases


class HOSVDVariant(TuckerVariant):
    """Exact truncated HOSVD at every step (Nguyen et al., NeurIPS 2024): ASI's costly reference."""

    name = "hosvd"

    def factors(self, x, ranks, previous):
        return list(hosvd_factors(x, ranks))


class GradFilterVariant(Variant):
    """Gradient filtering (Yang et al., CVPR 2023): the input and the output gradient average-pooled.

    The input is saved average-pooled in ``radius x radius`` patches (``radius`` tokens for a
    token linear); in backward the output gradient is summed over the same patches and the weight
    gradient is the layer's own correlation of the two pooled maps (stride, padding, dilation and
    groups kept in pooled coordinates). Exact at ``radius=1``.
    The input gradient stays exact, as for every variant here.
    """

    name = "gradfilt"
    uses_ranks = False

    def __init__(self, radius: int = 2):
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
            raise ValueError(f"gradfilt radius must be a positive integer, but got radius={radius!r}")
        self.radius = radius

    def __repr__(self) -> str:
        return f"GradFilterVariant(radius={self.radius})"

    def pack(self, x, ranks, previous, *, core_order=None):
        r = self.radius
        if x.dim() == 4:
            pooled = F.avg_pool2d(x, r, ceil_mode=True)  # (B, C, ceil(H/r), ceil(W/r))
        elif x.dim() == 3:
            pooled = F.avg_pool1d(x.transpose(1, 2), r, ceil_mode=True).transpose(1, 2)  # (B, ceil(L/r), C)
        else:
            raise ValueError("gradfilt pools a spatial or token mode: it needs (B, C, H, W) or (B, L, C) "
                             f"inputs, but got shape {tuple(x.shape)}")
        return (pooled.contiguous(),), None

    def conv2d_weight(self, saved, grad_output, weight_shape, geometry, order=None):
        (pooled,) = saved
        r = self.radius
        # Summed (not averaged) over each patch: exact when the input is constant on the patch,
        # and a short patch at the border weighs what it covers.
        grad = F.avg_pool2d(grad_output, r, ceil_mode=True, divisor_override=1)
        # The output size the pooled input gives under the layer's geometry; pad or crop to it.
        size = [
            (pooled.shape[2 + i] + 2 * geometry.padding[i] - geometry.dilation[i] * (weight_shape[2 + i] - 1) - 1)
            // geometry.stride[i] + 1
            for i in range(2)
        ]
        grad = grad[..., : size[0], : size[1]]
        grad = F.pad(grad, (0, size[1] - grad.shape[-1], 0, size[0] - grad.shape[-2]))
        g = geometry
        return conv2d_weight(pooled, weight_shape, grad, g.stride, g.padding, g.dilation, g.groups)

    def linear_weight(self, saved, grad_output):
        (pooled,) = saved  # (B, L/r, C)
        r = self.radius
        grad = F.avg_pool1d(grad_output.transpose(1, 2), r, ceil_mode=True).transpose(1, 2)  # (B, L/r, C_out)
        counts = torch.full((grad.shape[1],), float(r), dtype=grad.dtype, device=grad.device)
        counts[-1] = grad_output.shape[1] - r * (grad.shape[1] - 1)  # a short last patch
        grad = grad * counts.view(1, -1, 1)  # summed over each patch
        return grad.reshape(-1, grad.shape[-1]).T @ pooled.reshape(-1, pooled.shape[-1])


VARIANTS: dict[str, Variant] = {v.name: v for v in (ASIVariant(), ASIVariant(storage=torch.float16),
                                                    ASIVariant(storage=torch.bfloat16), ASIVariant(storage=torch.int8),
                                                    HOSVDVariant(),
                                                    GradFilterVariant())}


def get_variant(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, but got variant={name!r}") from None
