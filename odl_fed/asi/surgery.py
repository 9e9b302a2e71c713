"""Layer surgery: swap named layers of a model for compressed-backprop ones, in place, and back.

``inject_asi`` wraps each target (ordered dispatch, first match wins) and, with
``companions=True``, also swaps the frozen BatchNorm and ReLU layers of the fine-tuned part
(every module registered after the first target: the forward order of torchvision's CNNs) for
ones that save no input. ``restore_model`` undoes it, for export or a vanilla comparison.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from odl_fed.asi.companions import BitMaskReLU, FrozenBatchNorm2d
from odl_fed.asi.layers import ASIConv2d, ASILinear, Ranks
from odl_fed.asi.variants import Variant

__all__ = ["inject_asi", "inject_companions", "restore_model", "last_conv_names", "freeze_except", "LayerNotFoundError",
           "SUPPORTED_LAYERS"]


class LayerNotFoundError(KeyError):
    """A target name that is not a module of the model."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


Dispatch = Callable[[nn.Module, Ranks, "str | Variant", str], "nn.Module | None"]


def _dispatch_static_same_padding_conv2d(module, ranks, variant, name):
    # EfficientNet's Conv2dStaticSamePadding: a Conv2d that zero-pads its input in its own forward.
    if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "static_padding", None), nn.Module):
        return ASIConv2d.from_conv(module, ranks=ranks, variant=variant, name=name,
                                   pre_padding=module.static_padding)
    return None


def _dispatch_conv2d(module, ranks, variant, name):
    if isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward:
        return ASIConv2d.from_conv(module, ranks=ranks, variant=variant, name=name)
    return None


def _dispatch_linear(module, ranks, variant, name):
    if isinstance(module, nn.Linear):
        return ASILinear.from_linear(module, ranks=ranks, variant=variant, name=name)
    return None


_DISPATCHERS: tuple[Dispatch, ...] = (_dispatch_static_same_padding_conv2d, _dispatch_conv2d, _dispatch_linear)
SUPPORTED_LAYERS = ("torch.nn.Conv2d", "Conv2dStaticSamePadding (EfficientNet)", "torch.nn.Linear")
_COMPRESSED = (ASIConv2d, ASILinear)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _lookup(model: nn.Module, name: str, modules: Mapping[str, nn.Module]) -> nn.Module:
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise LayerNotFoundError(f"layer {name!r} is not in the model {type(model).__name__}{hint}")


def inject_asi(
    model: nn.Module,
    targets: Mapping[str, Ranks],
    *,
    variant: str | Variant = "asi",
    companions: bool = True,
) -> list[str]:
    """Swap each ``targets`` layer (name -> ranks) for its compressed form; return what was swapped.

    Conv2d ranks are ``(k_batch, k_channel, k_height, k_width)``; Linear ranks
    ``(k_batch, k_channel)`` or ``(k_batch, k_token, k_channel)``. All names are checked before
    anything is changed, so a bad target leaves the model as it was.
    """
    if not targets:
        raise ValueError("inject_asi needs at least one target layer, but got none")
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    replacements: dict[str, nn.Module] = {}
    for name, ranks in targets.items():
        module = _lookup(model, name, modules)
        if isinstance(module, _COMPRESSED):
            raise ValueError(f"layer {name!r} is already a {type(module).__name__}")
        for dispatch in _DISPATCHERS:
            new = dispatch(module, ranks, variant, name)
            if new is not None:
                break
        else:
            raise TypeError(
                f"layer {name!r} is a {type(module).__module__}.{type(module).__name__}, which cannot be "
                f"compressed; supported layer types: {', '.join(SUPPORTED_LAYERS)}"
            )
        replacements[name] = new
    if companions:
        first = min(targets, key=order.__getitem__)
        replacements |= {name: new for name, new in _companions(modules, first).items() if name not in replacements}
    for name, new in replacements.items():
        _replace(model, name, new)
    return sorted(replacements, key=order.__getitem__)


def _companions(modules: Mapping[str, nn.Module], after: str) -> dict[str, nn.Module]:
    """Frozen BatchNorm and ReLU layers registered after ``after``, as ones that save no input."""
    names = list(modules)
    found = {}
    for name in names[names.index(after) + 1:]:
        module = modules[name]
        if isinstance(module, nn.BatchNorm2d):
            found[name] = FrozenBatchNorm2d.from_batchnorm(module)
        elif isinstance(module, (nn.ReLU, nn.ReLU6)):
            found[name] = BitMaskReLU.from_module(module)
    return found


def inject_companions(model: nn.Module, *, after: str) -> list[str]:
    """Swap the frozen BatchNorm and ReLU layers after layer ``after`` (the first trained one) for
    ones that save no input, whether or not the trained layers themselves are compressed."""
    modules = dict(model.named_modules())
    _lookup(model, after, modules)
    replacements = _companions(modules, after)
    for name, new in replacements.items():
        _replace(model, name, new)
    return list(replacements)


def restore_model(model: nn.Module) -> list[str]:
    """Undo :func:`inject_asi`: the original layers back in place; return the restored names."""
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, _COMPRESSED):
            new = module.get_base_layer()
        elif isinstance(module, FrozenBatchNorm2d):
            new = module.to_batchnorm()
        elif isinstance(module, BitMaskReLU):
            new = nn.ReLU() if module.upper is None else (nn.ReLU6() if module.upper == 6.0 else
                                                           nn.Hardtanh(0.0, module.upper))
        else:
            continue
        _replace(model, name, new)
        restored.append(name)
    return restored


def last_conv_names(model: nn.Module, count: int) -> list[str]:
    """Names of the last ``count`` Conv2d layers in registration (= forward, for torchvision CNNs) order."""
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, ASIConv2d))
             and not name.endswith(".base_layer")]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(convs):
        raise ValueError(f"count must be an integer from 1 to {len(convs)} (the model's Conv2d layers), "
                         f"but got count={count!r}")
    return convs[-count:]


def freeze_except(model: nn.Module, trained: Sequence[str]) -> None:
    """Only the parameters of ``trained`` layers require grad; BatchNorm layers go to eval mode."""
    model.requires_grad_(False)
    for name in trained:
        model.get_submodule(name).requires_grad_(True)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
