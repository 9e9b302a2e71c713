"""Training a method's tail over cached features, through the library's own loop
(``odl_fed.training.task.train_steps``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from bench.accuracy.settings import ASI_ONLY, ASI_PAPER, HEAD_ONLY, SCHEDULES
from bench.tail import Cached, Tail, first_block
from odl_fed.training.models import prepare_finetune
from odl_fed.training.task import apply_method, train_steps

__all__ = ["minibatches", "calibration_batches", "prepared_tail", "make_optimizer", "predict", "paired_difference",
           "fine_tune", "validation_split"]

EVAL_BATCH = 256


def minibatches(data: Cached, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled batches of exactly ``batch_size`` (the last short one dropped: ASI keeps warm bases)."""
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield data.features[index], data.labels[index]


def calibration_batches(data: Cached, *, batch_size: int, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` batches of a shuffled pass (what the rank planner sees)."""
    batches_ = minibatches(data, batch_size, torch.Generator().manual_seed(seed))
    return [b for _, b in zip(range(count), batches_)]


def validation_split(data: Cached, fraction: float, *, seed: int) -> tuple[Cached, Cached]:
    """``data`` split at random into (training, validation), the latter ``fraction`` of it: to choose a rate."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(fraction * len(data)))
    return data.subset(order[held:]), data.subset(order[:held])


def prepared_tail(base: nn.Module, *, layers: int, start: int, method: str = "vanilla",
                  ranks: Mapping[str, Sequence[int]] | None = None, radius: int = 2) -> tuple[Tail, list[str]]:
    """A fresh copy of ``base`` with its last ``layers`` convs (and head) trainable, as a Tail, ``method`` in place.

    ``method`` is one of ``odl_fed.training.methods.METHODS``, ``"asi-paper-grid"`` (``asi-only`` at ranks
    planned on the paper's grid) or ``"head-only"`` (the convs stay frozen: the reference that says
    how much training them is worth). ``ranks`` None for a conv keeps it exact (``asi``). Returns the
    tail and the convs' names within it (``model.<name>``).
    """
    model = copy.deepcopy(base)
    convs = prepare_finetune(model, layers=layers)
    if first_block(model, convs) < start:
        raise ValueError(f"the trained convs {convs} start before the cached features (block {start})")
    tail = Tail(model, start)
    names = [f"model.{name}" for name in convs]
    if method == HEAD_ONLY:
        for name in names:
            tail.get_submodule(name).requires_grad_(False)
    else:
        apply_method(tail, ASI_ONLY if method == ASI_PAPER else method,
                     {name: (ranks or {}).get(name) for name in names}, radius=radius)
    return tail, names


def make_optimizer(tail: nn.Module, *, lr: float) -> torch.optim.Optimizer:
    """Adam over the tail's trainable parameters."""
    return torch.optim.Adam([p for p in tail.parameters() if p.requires_grad], lr=lr)


@torch.no_grad()
def predict(tail: nn.Module, data: Cached) -> Tensor:
    """Predicted class of every example (nothing is compressed under no_grad, so training is untouched)."""
    return torch.cat([tail(data.features[start:start + EVAL_BATCH]).argmax(-1)
                      for start in range(0, len(data), EVAL_BATCH)])


def paired_difference(reference: Tensor, other: Tensor, labels: Tensor) -> tuple[float, float]:
    """Top-1 of ``other`` minus ``reference``'s on the same examples, and its standard error.

    Only the examples where exactly one of the two is right move the difference, so its error
    is far smaller than either accuracy's alone.
    """
    ref, oth = reference == labels, other == labels
    gained, lost, n = (oth & ~ref).sum().item(), (ref & ~oth).sum().item(), labels.numel()
    return (gained - lost) / n, max(gained + lost - (gained - lost) ** 2 / n, 0.0) ** 0.5 / n


def fine_tune(tail: nn.Module, train: Cached, test: Cached, *, layer_names: Sequence[str], epochs: int,
              batch_size: int, lr: float, seed: int, schedule: str = "constant",
              after_epoch: Callable[[int], None] | None = None) -> tuple[dict, torch.optim.Optimizer, Tensor]:
    """Adam, ``epochs`` passes of shuffled fixed-size batches through ``odl_fed.training.task.train_steps``.

    ``schedule``: ``"constant"`` trains every epoch at ``lr``; ``"cosine"`` lowers the rate along a
    half cosine, one step per epoch (``CosineAnnealingLR`` with ``T_max=epochs``): epoch ``e``
    trains at ``lr * (1 + cos(pi * e / epochs)) / 2``, so the last of 10 at 2.4% of ``lr``.

    Returns the result (top-1 on ``test`` after each epoch and at the end, the epochs' losses,
    training seconds, and the first step's saved bytes: ``convs_bytes`` by the trained convs,
    ``tail_bytes`` by the whole step, trainable parameters excluded), the optimizer and the final
    test predictions. ``after_epoch(epoch)`` runs after each epoch but the last (e.g. to re-plan
    the ranks), outside the training time.
    """
    if len(train) < batch_size:
        raise ValueError(f"fewer than one batch of {batch_size} training examples ({len(train)})")
    optimizer = make_optimizer(tail, lr=lr)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, but got {schedule!r}")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs) if schedule == "cosine" else None
    generator = torch.Generator().manual_seed(seed)
    saved, losses, epoch_top1, seconds = None, [], [], 0.0
    predictions = None
    for epoch in range(epochs):
        if epoch and after_epoch is not None:
            after_epoch(epoch)
        stats = train_steps(tail, minibatches(train, batch_size, generator), optimizer=optimizer,
                            measured_layers=layer_names)
        if saved is None:
            saved = {"convs_bytes": stats["activation_bytes"], "tail_bytes": stats["step_saved_bytes"]}
        losses.append(stats["loss"])
        seconds += stats["seconds"]
        if scheduler is not None:
            scheduler.step()
        predictions = predict(tail, test)  # evaluation is not counted as training time
        epoch_top1.append((predictions == test.labels).float().mean().item())
    result = {"top1": epoch_top1[-1], "epoch_top1": epoch_top1, "train_losses": losses, "train_seconds": seconds,
              "lr": lr, "schedule": schedule, **saved}
    return result, optimizer, predictions
