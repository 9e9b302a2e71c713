"""How a compressed layer holds its input for the backward pass: one object per method.

A variant turns the layer input into the few tensors saved for backward (``pack``) and computes
the weight gradient from them (``conv2d_weight`` / ``linear_weight``). Layers hold the per-layer
state (the previous step's bases); variants are stateless, so one instance serves every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from odl_fed.asi.tucker import TuckerForm, hosvd_factors, leading_subspace, mode_grams, subspace_iteration, tucker_core
from odl_fed.asi.weight_grad import Conv2dGeometry, conv2d_weight_from_tucker, linear_weight_from_tucker

__all__ = ["TuckerVariant", "ASIVariant", "HOSVDVariant", "VARIANTS", "get_variant"]


def _identity_basis(dim: int, like: Tensor) -> Tensor:
    return torch.eye(dim, dtype=like.dtype, device=like.device)


class TuckerVariant:
    """A variant that holds the input as a Tucker form; subclasses choose the factors."""

    name: str = ""

    def factors(self, x: Tensor, ranks: Sequence[int], previous: Sequence[Tensor | None]) -> list[Tensor]:
        raise NotImplementedError

    def pack(self, x: Tensor, ranks: Sequence[int], previous: Sequence[Tensor | None]) -> TuckerForm:
        """Compress contiguous ``x`` to a Tucker form at ``ranks`` (each already <= its mode's size)."""
        factors = self.factors(x, ranks, previous)
        return TuckerForm(tucker_core(x, factors), tuple(u.contiguous() for u in factors))

    @staticmethod
    def unpack(saved: Sequence[Tensor]) -> TuckerForm:
        core, *factors = saved
        return TuckerForm(core, tuple(factors))

    def conv2d_weight(self, saved: Sequence[Tensor], grad_output: Tensor, weight_shape, geometry: Conv2dGeometry):
        return conv2d_weight_from_tucker(self.unpack(saved), grad_output, weight_shape, geometry)

    def linear_weight(self, saved: Sequence[Tensor], grad_output: Tensor):
        return linear_weight_from_tucker(self.unpack(saved), grad_output)


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
                bases.append(_identity_basis(dim, x))
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


VARIANTS: dict[str, TuckerVariant] = {v.name: v for v in (ASIVariant(), HOSVDVariant())}


def get_variant(name: str | TuckerVariant) -> TuckerVariant:
    if isinstance(name, TuckerVariant):
        return name
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, but got variant={name!r}") from None
