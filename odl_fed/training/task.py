"""Fine-tuning in plain torch: put a method in place, train an epoch, evaluate.

What a federated client and the centralised ``finetune`` command both run. The activation
memory of a step is measured, not estimated: the bytes the trained part saves for backward on
the first step, with :class:`~odl_fed.training.saved_memory.SavedTensorMeter`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from odl_fed.asi.layers import Ranks
from odl_fed.training.data import ImageData, batches
from odl_fed.training.flops import count_flops
from odl_fed.training.memory_guard import MemoryGuard
from odl_fed.training.methods import METHODS, Method, get_method
from odl_fed.training.saved_memory import SavedTensorMeter

__all__ = ["METHODS", "apply_method", "make_optimizer", "warm_up", "train_step", "train_steps", "train_epoch",
           "evaluate", "eval_mode"]


def apply_method(model: nn.Module, method: str | Method, ranks: Mapping[str, Ranks | None], *,
                 radius: int = 2) -> list[str]:
    """Put ``method``'s layers in place for the trained convs of ``ranks``; return what was swapped.

    ``ranks`` maps each trained conv to its ranks (None: kept exact, or a method without ranks);
    ``gradfilt`` pools in ``radius x radius`` patches. See :mod:`odl_fed.training.methods`.
    """
    return get_method(method).apply(model, ranks, radius=radius)


def make_optimizer(params, *, lr: float) -> torch.optim.Optimizer:
    """The clients' optimizer: Adam, per parameter (``foreach=False``): the multi-tensor step's
    temporaries are as large as all trained parameters together, which a small device pays for at
    every step."""
    return torch.optim.Adam(params, lr=lr, foreach=False)


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, count: bool = True) -> int:
    """One forward and backward before training (the kernels' first-use set-up happens here, not
    under the memory guard); returns its FLOPs when ``count`` (else 0) and leaves no gradients."""
    def step():
        F.cross_entropy(model(x), y).backward()

    flops = count_flops(step)[0] if count else step() or 0
    for p in model.parameters():
        p.grad = None
    # An optimizer's first step imports and sets up what every later step shares (MBs, once per process).
    probe = torch.zeros(1, requires_grad=True)
    probe.grad = torch.zeros(1)
    make_optimizer([probe], lr=0.0).step()
    return flops


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, optimizer: torch.optim.Optimizer,
               meter: SavedTensorMeter | None = None, guard: MemoryGuard | None = None,
               regularizer: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One optimizer step on batch ``(x, y)``; returns its loss (detached, without the regularizer).

    With a ``meter``, what the forward saves for backward is counted; with a ``guard``, its budget
    is checked after the forward (activations are at their peak there) and after the step.
    """
    with meter or contextlib.nullcontext():
        loss = F.cross_entropy(model(x), y)
    if guard is not None:
        guard.check()
    optimizer.zero_grad(set_to_none=True)
    (loss if regularizer is None else loss + regularizer()).backward()
    optimizer.step()
    if guard is not None:
        guard.end_step()
    return loss.detach()


def train_steps(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                optimizer: torch.optim.Optimizer, measured_layers: Sequence[str] = (),
                guard: MemoryGuard | None = None,
                regularizer: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """One optimizer step per ``(x, y)`` batch of ``batches``: the training loop every caller shares.

    Returns the mean loss per example (``loss``), ``examples``, ``seconds`` and the first step's
    saved bytes: ``activation_bytes``, what ``measured_layers`` (the trained convs) save for
    backward, and ``step_saved_bytes``, everything the step saves except the trainable
    parameters (frozen ones a step saves, such as a frozen BatchNorm's weight, are counted).
    With a ``guard``, its budget is checked after each forward and each step (it raises
    MemoryBudgetExceeded). ``regularizer()`` is added to each batch's loss (FedProx's proximal
    term); the reported loss excludes it. Raises ValueError when ``batches`` is empty.
    """
    params = _trainable(model)
    modules = {name: model.get_submodule(name) for name in measured_layers}
    total_loss, examples, first = 0.0, 0, None
    start = time.perf_counter()
    for x, y in batches:
        if first is None:
            meter = SavedTensorMeter(exclude=params, modules=modules)
            loss = train_step(model, x, y, optimizer=optimizer, meter=meter, guard=guard, regularizer=regularizer)
            first = {"activation_bytes": meter.nbytes_of(modules), "step_saved_bytes": meter.nbytes}
        else:
            loss = train_step(model, x, y, optimizer=optimizer, guard=guard, regularizer=regularizer)
        total_loss += loss.item() * y.numel()
        examples += y.numel()
    if first is None:
        raise ValueError("no batches to train on")
    return {"loss": total_loss / examples, "examples": examples, "seconds": time.perf_counter() - start, **first}


def train_epoch(model: nn.Module, data: ImageData, *, optimizer: torch.optim.Optimizer, batch_size: int,
                image_size: int, measured_layers: Sequence[str] = (), seed: int = 0,
                guard: MemoryGuard | None = None,
                regularizer: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """One shuffled pass over ``data`` (order from ``seed``) through :func:`train_steps`; its keys."""
    if len(data) == 0:
        raise ValueError(f"{data.name}: no examples to train on")
    return train_steps(model, batches(data, batch_size=batch_size, image_size=image_size, shuffle=True, seed=seed),
                       optimizer=optimizer, measured_layers=measured_layers, guard=guard, regularizer=regularizer)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode (dropout off, BatchNorm on its running statistics), every module put back in
    the mode it was in afterwards (a client's BatchNorm is frozen in eval, its trained part in train)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, *, batch_size: int, image_size: int,
             in_eval_mode: bool = False) -> dict[str, float]:
    """Loss and top-1 accuracy on ``data`` (no compression happens under no_grad); with ``in_eval_mode``
    the model runs in eval mode (:func:`eval_mode`), else in the modes it is in."""
    if len(data) == 0:
        raise ValueError(f"{data.name}: no examples to evaluate on")
    total_loss, correct, examples = 0.0, 0, 0
    with eval_mode(model) if in_eval_mode else contextlib.nullcontext():
        for x, y in batches(data, batch_size=batch_size, image_size=image_size):
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            examples += y.numel()
    return {"loss": total_loss / examples, "accuracy": correct / examples, "examples": examples}
