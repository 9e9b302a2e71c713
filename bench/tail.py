"""The fine-tuned tail of a model, run from cached features: what the benchmarks share.

A model is a chain of blocks (:func:`block_sequence`), each taking the previous block's output.
With the prefix frozen, BatchNorm and dropout in eval and no augmentation, the input of block
``start`` is a fixed function of each image: the benchmarks compute it once
(:func:`prefix_features`, :func:`cache_features`) and train ``Tail(model, start)`` over it, which
gives the model's own logits (:func:`cache_features` checks this on a batch).

Used by ``bench.accuracy`` (real data, every method) and ``bench.asi_layers`` (one random batch).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from odl_fed.training.data import ImageData, batches

__all__ = ["block_sequence", "first_block", "run_from", "Tail", "prefix_features", "layer_inputs", "Cached",
           "cache_features"]

EQUIVALENCE_TOLERANCE = 1e-4  # cached-feature logits against the full model's, relative
CACHE_BATCH = 64


def _efficientnet_class():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    return EfficientNet


def _is_efficientnet(model: nn.Module) -> bool:
    efficientnet = _efficientnet_class()
    return efficientnet is not None and isinstance(model, efficientnet)


def block_sequence(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's chain of blocks, each with its qualified name.

    Each block takes one tensor, the previous block's output, so the input of a block is all
    that the rest of the model needs.
    """
    if isinstance(model, torchvision.models.MobileNetV2):
        return [(f"features.{i}", block) for i, block in enumerate(model.features)]
    if isinstance(model, torchvision.models.ResNet):
        return [(f"layer{stage}.{i}", block) for stage in range(1, 5)
                for i, block in enumerate(getattr(model, f"layer{stage}"))]
    if _is_efficientnet(model):
        return [(f"_blocks.{i}", block) for i, block in enumerate(model._blocks)]
    if isinstance(model, nn.Sequential):
        return [(str(i), layer) for i, layer in enumerate(model)]
    raise TypeError(f"a tail supports MobileNetV2, ResNet, EfficientNet and nn.Sequential models, "
                    f"but got {type(model).__name__}")


def first_block(model: nn.Module, layer_names: Sequence[str]) -> int:
    """Index of the block holding the earliest of ``layer_names`` (len(blocks): after the last block)."""
    blocks = block_sequence(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    earliest = min(layer_names, key=order.__getitem__)
    for index, (name, _) in enumerate(blocks):
        if earliest == name or earliest.startswith(f"{name}."):
            return index
    if order[earliest] < order[blocks[-1][0]]:
        raise ValueError(f"{earliest} comes before the first block of {type(model).__name__} "
                         f"({blocks[0][0]}): a tail cannot start there")
    return len(blocks)  # a layer after the blocks (EfficientNet's _conv_head)


def run_from(model: nn.Module, start: int, x: Tensor) -> Tensor:
    """``model``'s forward from block ``start`` on, ``x`` being that block's input.

    Modules are looked up at call time, so layers swapped in after this is set up are used.
    """
    blocks = [block for _, block in block_sequence(model)]
    if isinstance(model, torchvision.models.MobileNetV2):
        for block in blocks[start:]:
            x = block(x)
        return model.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))
    if isinstance(model, torchvision.models.ResNet):
        for block in blocks[start:]:
            x = block(x)
        return model.fc(torch.flatten(model.avgpool(x), 1))
    if isinstance(model, nn.Sequential):
        for layer in blocks[start:]:
            x = layer(x)
        return x
    rate = model._global_params.drop_connect_rate  # EfficientNet: its extract_features, then its head
    for index in range(start, len(blocks)):
        x = blocks[index](x, drop_connect_rate=rate * index / len(blocks) if rate else rate)
    x = model._swish(model._bn1(model._conv_head(x)))
    return model._fc(model._dropout(model._avg_pooling(x).flatten(1)))


class Tail(nn.Module):
    """``model`` from block ``start`` on: ``Tail(model, start)(features)`` is ``model(images)``.

    ``features`` is the input of block ``start`` computed from ``images`` (:func:`prefix_features`).
    The model is a submodule, so its layers are named ``model.<name>`` here.
    """

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, features: Tensor) -> Tensor:
        return run_from(self.model, self.start, features)


class _Stop(Exception):
    pass


def _block_input_module(model: nn.Module, start: int) -> nn.Module:
    blocks = block_sequence(model)
    if start < len(blocks):
        return blocks[start][1]
    if _is_efficientnet(model):
        return model._conv_head
    raise ValueError(f"a tail of {type(model).__name__} starts at one of its {len(blocks)} blocks, "
                     f"but got start={start}")


def prefix_features(model: nn.Module, start: int, images: Tensor) -> Tensor:
    """The input of block ``start`` (the frozen prefix's output), without grad; the rest is not run."""
    captured = {}

    def hook(module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = _block_input_module(model, start).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"].contiguous()


def layer_inputs(run: nn.Module, layers: Mapping[str, nn.Module], x: Tensor) -> dict[str, Tensor]:
    """What each of ``layers`` packs when ``run(x)`` runs (no grad): its input, after any padding it applies itself."""
    inputs = {}

    def capture(name):
        def hook(module, args):
            pre_padding = getattr(module, "pre_padding", None)
            value = args[0] if pre_padding is None else pre_padding(args[0])
            inputs[name] = value.detach().contiguous()

        return hook

    handles = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            run(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


@dataclass(frozen=True)
class Cached:
    """Features entering the fine-tuned tail, one row per image, with the labels."""

    features: Tensor
    labels: Tensor
    seconds: float

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, index: Tensor) -> Cached:
        return Cached(self.features[index], self.labels[index], self.seconds)


def cache_features(model: nn.Module, start: int, data: ImageData, *, image_size: int,
                   batch_size: int = CACHE_BATCH) -> Cached:
    """Run the frozen prefix once per image; check on the first batch that the tail gives the model's logits."""
    model.eval()
    features, started = [], time.perf_counter()
    for x, _ in batches(data, batch_size=batch_size, image_size=image_size):
        cut = prefix_features(model, start, x)
        if not features:
            with torch.no_grad():
                want, got = model(x), run_from(model, start, cut)
            error = ((got - want).norm() / want.norm()).item()
            if error > EQUIVALENCE_TOLERANCE:
                raise RuntimeError(f"the tail from block {start} of {type(model).__name__} does not reproduce the "
                                   f"model's logits (relative error {error:.2e}); cached features would be wrong")
        features.append(cut)
    return Cached(torch.cat(features), data.labels.clone(), time.perf_counter() - started)
