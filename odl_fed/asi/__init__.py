"""Shortcut backprop layers: ASI (Activation Subspace Iteration, ICML 2025) and its kin."""

from odl_fed.asi.companions import BitMaskReLU, FrozenBatchNorm2d
from odl_fed.asi.layers import ASIConv2d, ASILinear
from odl_fed.asi.surgery import (
    LayerNotFoundError,
    freeze_except,
    inject_asi,
    last_conv_names,
    restore_model,
)
from odl_fed.asi.tucker import TuckerForm, hosvd, tucker_numel
from odl_fed.asi.variants import VARIANTS, get_variant

__all__ = [
    "ASIConv2d",
    "ASILinear",
    "BitMaskReLU",
    "FrozenBatchNorm2d",
    "LayerNotFoundError",
    "TuckerForm",
    "VARIANTS",
    "freeze_except",
    "get_variant",
    "hosvd",
    "inject_asi",
    "last_conv_names",
    "restore_model",
    "tucker_numel",
]
