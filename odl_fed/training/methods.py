"""The fine-tuning methods by name: what each needs (ranks or not) and how it puts its layers in place.

One registry, as torchvision's models have one: the command line, the fleet files, the client
planner and the benchmarks ask it instead of testing method names themselves.

=========  ==================================================================================
vanilla    plain backprop: every trained conv keeps its whole input for backward
asi        ASI where the budget needs it: each trained conv stays exact when the budget lets it,
           else it holds a warm Tucker form of its input at planned ranks (the product's default)
asi-only   ASI on every trained conv, at planned ranks (benchmarks: pure ASI at any budget)
hosvd      an exact truncated HOSVD of the input at every step, at planned ranks (ASI's reference)
gradfilt   gradient filtering: input and output gradient pooled in r x r patches (no ranks)
=========  ==================================================================================

Every method but ``vanilla`` also swaps the frozen BatchNorm and ReLU layers of the fine-tuned
part for ones that save no input (exact, see :mod:`odl_fed.asi.companions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from odl_fed.asi import inject_asi
from odl_fed.asi.layers import Ranks
from odl_fed.asi.surgery import inject_companions
from odl_fed.asi.variants import GradFilterVariant, Variant, get_variant
from odl_fed.config import names
from odl_fed.config.names import check_registry
from odl_fed.config.suggest import did_you_mean

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """A fine-tuning method.

    Parameters
    ----------
    name : str
        Its name in fleets and on the command line.
    variant : str or None
        The compressed layers' variant (:mod:`odl_fed.asi.variants`); None keeps the layers as they are.
    plans_ranks : bool
        The planner chooses each layer's ranks for an activation budget.
    keeps_exact : bool
        A layer may stay exact (uncompressed) where the budget allows; its ranks are then None.
        (A variant that stores its Tucker form in 16 or 8 bits, ``asi-fp16`` or ``asi-int8``, is
        planned at 2 or 1 bytes per number: :attr:`storage_itemsize`.)
    companions : bool
        The frozen BatchNorm/ReLU of the fine-tuned part save no input.
    """

    name: str
    variant: str | None
    plans_ranks: bool
    keeps_exact: bool = False
    companions: bool = True

    @property
    def storage_itemsize(self) -> int | None:
        """Bytes per number the variant holds its Tucker forms in, when narrower than the input's (else None)."""
        storage = getattr(get_variant(self.variant), "storage", None) if self.variant else None
        return None if storage is None else torch.empty(0, dtype=storage).element_size()

    def apply(self, model: nn.Module, ranks: Mapping[str, Ranks | None], *, radius: int = 2) -> list[str]:
        """Put the method's layers in place for the trained convs ``ranks`` names; return what was swapped.

        ``ranks`` maps each trained conv to its ranks; None keeps a conv exact (``asi``), or is the
        only value for methods without ranks. The first name is the first trained conv.
        """
        if self.variant is None:
            return []
        if not ranks:
            raise ValueError(f"method {self.name!r} needs at least one trained layer, but got none")
        if self.plans_ranks:
            compressed = {name: r for name, r in ranks.items() if r is not None}
            if len(compressed) < len(ranks) and not self.keeps_exact:
                exact = sorted(set(ranks) - set(compressed))
                raise ValueError(f"method {self.name!r} compresses every trained layer, but {exact} have no ranks")
            variant: str | Variant = self.variant
        else:
            compressed, variant = {name: None for name in ranks}, GradFilterVariant(radius=radius)
        swapped = inject_asi(model, compressed, variant=variant, companions=False) if compressed else []
        if self.companions:
            swapped += inject_companions(model, after=next(iter(ranks)))
        return swapped


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("vanilla", variant=None, plans_ranks=False, companions=False),
    Method("asi", variant="asi", plans_ranks=True, keeps_exact=True),
    Method("asi-only", variant="asi", plans_ranks=True),
    Method("hosvd", variant="hosvd", plans_ranks=True),
    Method("gradfilt", variant="gradfilt", plans_ranks=False),
    Method("asi-fp16", variant="asi-fp16", plans_ranks=True, keeps_exact=True),
    Method("asi-int8", variant="asi-int8", plans_ranks=True, keeps_exact=True),
)}


check_registry("method", names.METHODS, METHODS)


def get_method(name: str | Method) -> Method:
    """A method by name (or the method itself)."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, but got method={name!r}{did_you_mean(name, METHODS)}")
    return METHODS[name]
