"""What a device can train: a method's layers, batch and ranks that fit its profile's memory.

A device's ``train-memory`` must hold, besides the runtime:

- fixed costs: the model's weights and buffers, the trained parameters' gradients and the
  optimizer's state (``optimizer_slots`` copies: 2 for Adam) with its step's temporary (one
  largest parameter: the optimizer runs per parameter, ``foreach=False``, not over all at once),
  and a forward workspace (twice the largest activation of a forward at the batch size: one
  layer's input and output alive at once);
- the activations saved for backward: those of the trained convs (what the rank planner
  budgets) and the rest of the fine-tuned part (bit masks, scales; measured on one batch),
  within the profile's ``activation-memory`` cap when it has one.

A setting that fits by this count is then tried for real: one training step on a copy, its
increase of the process's memory read with psutil (:class:`~odl_fed.memory_guard.MemoryGuard`).
The weights plus that must fit too; it is what the client's guard will watch while it trains.

The order of retreat when a setting does not fit: the batch is halved first (down to
``min_batch``), then one trained layer fewer, back at the full batch. If nothing fits, the plan
is refused with :class:`PlanRefused`, which says what the smallest setting would need.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from odl_fed.data import ImageData, batches
from odl_fed.memory_guard import MemoryGuard
from odl_fed.models import prepare_finetune
from odl_fed.plan import BudgetTooSmallError, RankPlan, plan_ranks
from odl_fed.profile import DeviceProfile
from odl_fed.saved_memory import SavedTensorMeter
from odl_fed.task import METHODS, apply_method

__all__ = ["ClientPlan", "PlanRefused", "plan_client"]


class PlanRefused(RuntimeError):
    """No setting of the method fits the device; the message names the device, budget and need."""


@dataclass(frozen=True)
class ClientPlan:
    device: str
    method: str
    layers: tuple[str, ...]
    batch_size: int
    ranks: dict[str, tuple[int, ...] | None]
    train_memory: int
    fixed_bytes: int
    activation_budget: int
    predicted_activation_bytes: int
    rank_plan: RankPlan | None = None
    measured_step_bytes: int = 0

    def to_dict(self) -> dict:
        data = asdict(self) | {"layers": list(self.layers)}
        data["ranks"] = {k: None if v is None else list(v) for k, v in self.ranks.items()}
        data["rank_plan"] = None if self.rank_plan is None else self.rank_plan.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ClientPlan:
        """The inverse of :meth:`to_dict`."""
        ranks = {k: None if v is None else tuple(int(r) for r in v) for k, v in data["ranks"].items()}
        rank_plan = None if data.get("rank_plan") is None else RankPlan.from_dict(data["rank_plan"])
        return cls(device=data["device"], method=data["method"], layers=tuple(data["layers"]),
                   batch_size=int(data["batch_size"]), ranks=ranks, train_memory=int(data["train_memory"]),
                   fixed_bytes=int(data["fixed_bytes"]), activation_budget=int(data["activation_budget"]),
                   predicted_activation_bytes=int(data["predicted_activation_bytes"]), rank_plan=rank_plan,
                   measured_step_bytes=int(data.get("measured_step_bytes", 0)))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _workspace(model: nn.Module, x: torch.Tensor) -> int:
    largest = 0

    def hook(module, args, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 2 * largest


def _measured_step(model: nn.Module, method: str, ranks, batch, optimizer_slots: int) -> int:
    """What one real training step adds to the process (psutil), the runtime's one-time set-up excluded.

    The count above misses what the kernels allocate for themselves (weight reorders, per-thread
    scratch, the allocator's slack): on a CPU these are tens of MB, far more than ASI's
    activations, so the plan measures them instead of trusting the count alone.
    """
    trial = copy.deepcopy(model)
    apply_method(trial, method, ranks)
    x, y = batch
    F.cross_entropy(trial(x), y).backward()  # warm-up: kernels' first-use set-up, as a client's FLOPs step does
    for p in trial.parameters():
        p.grad = None
    trained = [p for p in trial.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, foreach=False) if optimizer_slots else torch.optim.SGD(trained, lr=0.0)
    with MemoryGuard(2**62, client="plan") as guard:
        F.cross_entropy(trial(x), y).backward()
        guard.sample()
        optimizer.step()
    return guard.peak


def _optimizer_workspace(trained, slots: int) -> int:
    """A per-parameter optimizer (``foreach=False``) needs one temporary of the largest parameter."""
    return max((p.numel() * p.element_size() for p in trained), default=0) if slots else 0


def _saved(model: nn.Module, convs, x, y) -> tuple[int, int]:
    """Bytes the trained convs save, and everything a step saves (parameters excluded)."""
    modules = {name: model.get_submodule(name) for name in convs}
    with SavedTensorMeter(exclude=model.parameters(), modules=modules) as meter:
        loss = F.cross_entropy(model(x), y)
    del loss
    return meter.nbytes_of(modules), meter.nbytes


def _halvings(batch: int, minimum: int):
    while batch >= minimum:
        yield batch
        if batch == minimum:
            return
        batch = max(minimum, batch // 2)


def plan_client(model: nn.Module, *, model_name: str, profile: DeviceProfile, method: str, layers: int,
                batch_size: int, data: ImageData, image_size: int, optimizer_slots: int = 2,
                calibration_batches: int = 2, min_batch: int = 4) -> ClientPlan:
    """The first setting (layers, batch, ranks) of ``method`` that fits ``profile.train_memory``.

    ``model`` is the vanilla model (not changed here); ``data`` a few local batches to calibrate on.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, but got method={method!r}")
    tried = []
    for n_layers in range(layers, 0, -1):
        for batch in _halvings(batch_size, min(min_batch, batch_size)):
            calibration = [b for _, b in zip(range(calibration_batches), batches(
                data, batch_size=batch, image_size=image_size, shuffle=True, drop_last=True))]
            if not calibration:
                continue
            candidate = copy.deepcopy(model)
            convs = prepare_finetune(candidate, layers=n_layers)
            trained = [p for p in candidate.parameters() if p.requires_grad]
            fixed = (_nbytes(candidate.parameters()) + _nbytes(candidate.buffers())
                     + (1 + optimizer_slots) * _nbytes(trained) + _optimizer_workspace(trained, optimizer_slots)
                     + _workspace(candidate, calibration[0][0]))
            budget = profile.train_memory - fixed
            if profile.activation_memory is not None:
                budget = min(budget, profile.activation_memory)
            # What the rest of the step saves, with the method's companions in place (full ranks: no
            # subspace is computed; the convs' own bytes are subtracted).
            probe = copy.deepcopy(candidate)
            apply_method(probe, method, {name: (None, None, None, None) for name in convs})
            probe_convs, probe_total = _saved(probe, convs, *calibration[0])
            rest = probe_total - probe_convs
            conv_budget = budget - rest
            plan = None
            if method in ("asi", "hosvd"):
                if conv_budget <= 0:
                    tried.append((n_layers, batch, f"fixed costs {_mib(fixed)} (weights, gradients, optimizer state, "
                                                      f"workspace) and other saved {_mib(rest)} leave nothing"))
                    continue
                try:
                    plan = plan_ranks(candidate, convs, calibration, conv_budget, model_name=model_name)
                except BudgetTooSmallError as error:
                    tried.append((n_layers, batch, str(error)))
                    continue
                ranks = dict(plan.targets())
                predicted = plan.total_bytes + rest
            else:
                ranks = {name: None for name in convs}
                measured = copy.deepcopy(candidate)
                apply_method(measured, method, ranks)
                _, predicted = _saved(measured, convs, *calibration[0])
            if predicted > budget:
                tried.append((n_layers, batch, f"needs {_mib(predicted)} of activations, {_mib(max(budget, 0))} left"))
                continue
            weights = _nbytes(candidate.parameters()) + _nbytes(candidate.buffers())
            measured = _measured_step(candidate, method, ranks, calibration[0], optimizer_slots)
            if weights + measured > profile.train_memory:
                tried.append((n_layers, batch, f"a measured step adds {_mib(measured)} to the weights' "
                                               f"{_mib(weights)}"))
                continue
            return ClientPlan(device=profile.name, method=method, layers=tuple(convs), batch_size=batch,
                              ranks=ranks, train_memory=profile.train_memory, fixed_bytes=fixed,
                              activation_budget=budget, predicted_activation_bytes=predicted, rank_plan=plan,
                              measured_step_bytes=measured)
    weights = _nbytes(model.parameters()) + _nbytes(model.buffers())
    if weights >= profile.train_memory:
        why = f"the model's weights alone take {_mib(weights)}"
    elif tried:
        n, b, last = tried[-1]
        why = f"the smallest setting tried, {n} layer(s) at batch {b}: {last}"
    else:
        why = f"fewer than {min(min_batch, batch_size)} local examples to calibrate on"
    raise PlanRefused(f"device {profile.name!r}: no {method} setting of {model_name} fits its train-memory of "
                      f"{_mib(profile.train_memory)} ({why})")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
