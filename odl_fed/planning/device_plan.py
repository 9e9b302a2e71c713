"""What a device can train: a method's layers, batch and ranks that fit its profile's memory.

A device's ``train-memory`` is what fine-tuning may add to the process: the model's weights, then
what training adds on top of them, which the client's :class:`~odl_fed.training.memory_guard.MemoryGuard`
watches. A setting (trained layers, batch) is planned in four steps:

1. **fixed costs**, counted: the weights and buffers, the trained parameters' gradients and the
   optimizer's state (``optimizer_slots`` copies: 2 for Adam) with its step's temporary (one
   largest parameter: the optimizer runs per parameter), and a forward workspace (twice the
   largest activation of a forward at the batch size);
2. **activation bytes**, counted exactly with ``saved_tensors_hooks`` on one batch: what each
   trained conv saves when kept exact, and what the rest of the step saves with the method's
   companions in place. What ``train-memory`` (and the profile's ``activation-memory`` cap)
   leaves for the trained convs goes to them: all exact when it fits, else the rank planner
   (:func:`~odl_fed.planning.ranks.plan_ranks`) compresses the least sensitive first (``asi``; ``asi-only``
   and ``hosvd`` compress every layer);
3. **a measured trial**: the setting trains for real, as the client will (the same data path,
   optimizer, warm-up and guard), for as many steps as the process's memory needs to settle (at
   least ``TRIAL_CHUNK * 2`` steps, a short last batch included, up to ``TRIAL_CHUNK *
   TRIAL_CHUNKS``), with the guard reclaiming free pages at every reading, so that each step's
   peak is what the step really holds. The need is the largest step peak; the margin is what the
   trial saw on top of a typical step (largest minus median step peak), plus any growth still
   seen in its last steps. Need plus margin must fit what ``train-memory`` leaves after the weights;
4. **the order of retreat** when a setting does not fit: a smaller batch (halved, down to
   ``min_batch``), then one trained layer fewer (back at the full batch), then, for methods with
   ranks, a smaller activation budget (lower ranks). If nothing fits, :class:`PlanRefused` says
   what the smallest setting would need.

The model is planned in place (layers swapped and restored, the trained layers' values put back)
rather than copied per candidate.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from odl_fed.asi import restore_model
from odl_fed.asi.surgery import inject_companions
from odl_fed.config.profile import DeviceProfile
from odl_fed.planning.ranks import BudgetTooSmallError, RankPlan, plan_ranks
from odl_fed.training.data import ImageData, batches
from odl_fed.training.memory_guard import MemoryBudgetExceeded, MemoryGuard
from odl_fed.training.methods import Method, get_method
from odl_fed.training.models import prepare_finetune
from odl_fed.training.saved_memory import SavedTensorMeter
from odl_fed.training.task import make_optimizer, train_epoch, warm_up

__all__ = ["ClientPlan", "PlanRefused", "Setting", "plan_client", "measure_training", "next_setting",
           "TrialResult", "nbytes"]

TRIAL_CHUNK = 4  # steps per chunk of the measured trial
TRIAL_CHUNKS = 4  # at most this many chunks; at least two
RANK_RETREAT = (0.5, 0.25)  # after the smallest batch and one layer: these fractions of the activation budget


class PlanRefused(RuntimeError):
    """No setting of the method fits the device; the message names the device, budget and need."""


@dataclass(frozen=True)
class Setting:
    """A point in the order of retreat: trained layers, batch, and the fraction of the activation
    budget the ranks may use."""

    layers: int
    batch_size: int
    activation_scale: float = 1.0


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
    weights_bytes: int = 0
    measured_need: int = 0  # the trial's largest step peak over the process baseline (psutil)
    margin: int = 0  # what the trial saw on top of a typical step
    trial_steps: int = 0
    activation_scale: float = 1.0

    @property
    def exact_layers(self) -> tuple[str, ...]:
        """The trained convs that keep their whole input (plain backprop)."""
        method = get_method(self.method)
        if method.variant is None:
            return self.layers
        return tuple(name for name, r in self.ranks.items() if r is None) if method.plans_ranks else ()

    @property
    def setting(self) -> Setting:
        return Setting(len(self.layers), self.batch_size, self.activation_scale)

    def to_dict(self) -> dict:
        data = asdict(self) | {"layers": list(self.layers)}
        data["ranks"] = {k: None if v is None else list(v) for k, v in self.ranks.items()}
        data["rank_plan"] = None if self.rank_plan is None else self.rank_plan.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ClientPlan:
        """The inverse of :meth:`to_dict` (KeyError/TypeError/ValueError on a malformed dict)."""
        ranks = {k: None if v is None else tuple(int(r) for r in v) for k, v in data["ranks"].items()}
        rank_plan = None if data.get("rank_plan") is None else RankPlan.from_dict(data["rank_plan"])
        ints = ("batch_size", "train_memory", "fixed_bytes", "activation_budget", "predicted_activation_bytes",
                "weights_bytes", "measured_need", "margin", "trial_steps")
        return cls(device=str(data["device"]), method=str(data["method"]), layers=tuple(data["layers"]),
                   ranks=ranks, rank_plan=rank_plan, activation_scale=float(data["activation_scale"]),
                   **{key: int(data[key]) for key in ints})


@dataclass(frozen=True)
class TrialResult:
    """What a setting's measured trial saw: each step's peak over the process baseline (psutil)."""

    step_peaks: tuple[int, ...]
    reclaims: int
    stopped: bool = False  # a step went past ``room``: the trial stopped there

    @property
    def need(self) -> int:
        return max(self.step_peaks, default=0)

    @property
    def margin(self) -> int:
        """Largest minus median step peak, plus the growth between the last chunk and the one before."""
        if len(self.step_peaks) <= TRIAL_CHUNK:
            return 0
        spread = self.need - int(statistics.median(self.step_peaks))
        last, before = self.step_peaks[-TRIAL_CHUNK:], self.step_peaks[:-TRIAL_CHUNK]
        return spread + max(0, max(last) - max(before))


def nbytes(tensors) -> int:
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


def _fixed_costs(model: nn.Module, x: torch.Tensor, optimizer_slots: int) -> int:
    """Step 1: weights and buffers, gradients, optimizer state and its per-parameter temporary, workspace."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer_workspace = max((nbytes([p]) for p in trained), default=0) if optimizer_slots else 0
    return (nbytes(model.parameters()) + nbytes(model.buffers()) + (1 + optimizer_slots) * nbytes(trained)
            + optimizer_workspace + _workspace(model, x))


def _saved_bytes(model: nn.Module, method: Method, convs: list[str], x, y) -> tuple[int, int]:
    """Step 2: what the trained convs save when exact, and what the rest of the step saves with the
    method's companions in place (parameters excluded; a storage two layers share counted once)."""
    if method.companions:
        inject_companions(model, after=convs[0])
    modules = {name: model.get_submodule(name) for name in convs}
    try:
        with SavedTensorMeter(exclude=model.parameters(), modules=modules) as meter:
            loss = F.cross_entropy(model(x), y)
        del loss
        exact = meter.nbytes_of(modules)
        return exact, meter.nbytes - exact
    finally:
        restore_model(model)


def _method_bytes(model: nn.Module, method: Method, ranks, x, y) -> int:
    """Everything a step saves with ``method`` in place (for methods without ranks)."""
    method.apply(model, ranks)
    try:
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = F.cross_entropy(model(x), y)
        del loss
        return meter.nbytes
    finally:
        restore_model(model)


def measure_training(model: nn.Module, method: str | Method, ranks: Mapping, *, data: ImageData, batch_size: int,
                     image_size: int, lr: float = 1e-3, seed: int = 0, proximal: bool = False,
                     room: int | None = None) -> TrialResult:
    """Step 3: train ``model`` with ``method`` at ``ranks`` as a client does, and read each step's peak.

    The same warm-up, optimizer, data path and guard as :func:`odl_fed.federation.client_round.run_client_round`
    (with a FedProx anchor when ``proximal``), on this client's data, in chunks of
    :data:`TRIAL_CHUNK` steps until a chunk's peak is no higher than the peak before it (the first
    chunk ends on a short batch when the data has one), or until a step goes past ``room`` (the
    setting cannot fit: no need to go on). The trained values are put back and the method's layers
    taken out afterwards.
    """
    method = get_method(method)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    remainder = len(data) % batch_size
    method.apply(model, ranks)
    try:
        optimizer = make_optimizer(params, lr=lr)
        warm_up(model, *next(batches(data, batch_size=batch_size, image_size=image_size)), count=False)
        guard = MemoryGuard(room or 2**62, client="plan", reclaim_at=0.0)
        with guard:
            anchor = [p.detach().clone() for p in params] if proximal else None

            def regularizer():
                return sum((p - a).pow(2).sum() for p, a in zip(params, anchor)) if anchor else None

            start = 0
            for chunk in range(TRIAL_CHUNKS):
                count = TRIAL_CHUNK * batch_size + (remainder if chunk == 0 else 0)
                # round the shuffled order, as often as it takes (a board may hold fewer images than a chunk)
                indices = order[(start + torch.arange(count)) % len(data)]
                start = (start + count) % len(data)
                train_epoch(model, data.subset(indices), optimizer=optimizer, batch_size=batch_size,
                            image_size=image_size, seed=seed + chunk, guard=guard,
                            regularizer=regularizer if proximal else None)
                peaks = guard.step_peaks
                if chunk >= 1 and max(peaks[-TRIAL_CHUNK:]) <= max(peaks[:-TRIAL_CHUNK]):
                    break
        return TrialResult(tuple(guard.step_peaks), guard.reclaims)
    except MemoryBudgetExceeded:
        return TrialResult((*guard.step_peaks, guard.peak), guard.reclaims, stopped=True)
    finally:
        restore_model(model)
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
                p.grad = None


def _settings(layers: int, batch_size: int, min_batch: int, ranked: bool) -> Iterator[Setting]:
    """Step 4: the order of retreat."""
    for n_layers in range(layers, 0, -1):
        batch = batch_size
        while True:
            yield Setting(n_layers, batch)
            if batch <= min_batch:
                break
            batch = max(min_batch, batch // 2)
    if ranked:
        for scale in RANK_RETREAT:
            yield Setting(1, min(min_batch, batch_size), scale)


def next_setting(plan: ClientPlan, *, layers: int, batch_size: int, min_batch: int = 4) -> Setting | None:
    """The setting after ``plan``'s in the order of retreat (None: there is none)."""
    order = list(_settings(layers, batch_size, min(min_batch, batch_size), get_method(plan.method).plans_ranks))
    try:
        return order[order.index(plan.setting) + 1]
    except (ValueError, IndexError):
        return None


@dataclass
class _Candidate:
    """What one setting was found to need, on the way to a plan or a refusal."""

    setting: Setting
    convs: list[str]
    fixed: int = 0
    activation_budget: int = 0
    ranks: dict = field(default_factory=dict)
    predicted: int = 0
    rank_plan: RankPlan | None = None
    why: str = ""


def plan_client(model: nn.Module, *, model_name: str, profile: DeviceProfile, method: str, layers: int,
                batch_size: int, data: ImageData, image_size: int, lr: float = 1e-3, optimizer_slots: int = 2,
                calibration_batches: int = 2, min_batch: int = 4, start: Setting | None = None,
                proximal: bool = False, seed: int = 0, relative: bool = False) -> ClientPlan:
    """The first setting of ``method``, in the order of retreat (from ``start`` on, when given), that fits
    ``profile.train_memory``; see the module's docstring.

    ``model`` is the client's vanilla model: planned in place and left as it came (its trained
    values included). ``data`` is the client's own data: calibration batches and the trial come from it.
    ``relative``: the rank planner weighs each layer's gradient error by its gradient's norm
    (:func:`~odl_fed.planning.ranks.plan_ranks`; a fleet's ``rank-weighting: relative``).
    """
    spec = get_method(method)
    min_batch = min(min_batch, batch_size)
    weights = nbytes(model.parameters()) + nbytes(model.buffers())
    trained_before = {name for name, p in model.named_parameters() if p.requires_grad}
    tried: list[_Candidate] = []
    order = list(_settings(layers, batch_size, min_batch, spec.plans_ranks))
    if start is not None:
        order = order[order.index(start):] if start in order else []
    if weights >= profile.train_memory:
        order = []
    try:
        for setting in order:
            candidate = _Candidate(setting, prepare_finetune(model, layers=setting.layers))
            tried.append(candidate)
            calibration = [b for _, b in zip(range(calibration_batches), batches(
                data, batch_size=setting.batch_size, image_size=image_size, shuffle=True, seed=seed,
                drop_last=True))]
            if not calibration:
                candidate.why = f"fewer than {setting.batch_size} local examples"
                continue
            if not _activations_fit(model, spec, candidate, profile, calibration, optimizer_slots, model_name,
                                    relative=relative):
                continue
            room = profile.train_memory - weights
            trial = measure_training(model, spec, candidate.ranks, data=data, batch_size=setting.batch_size,
                                     image_size=image_size, lr=lr, seed=seed, proximal=proximal, room=room)
            if trial.stopped or trial.need + trial.margin > room:
                candidate.why = (f"a measured trial needs {_mib(trial.need)}"
                                 f"{' after ' + str(len(trial.step_peaks)) + ' step(s)' if trial.stopped else ''}"
                                 f" + {_mib(trial.margin)} margin, {_mib(room)} left after the weights")
                continue
            return ClientPlan(device=profile.name, method=spec.name, layers=tuple(candidate.convs),
                              batch_size=setting.batch_size, ranks=candidate.ranks,
                              train_memory=profile.train_memory, fixed_bytes=candidate.fixed,
                              activation_budget=candidate.activation_budget,
                              predicted_activation_bytes=candidate.predicted, rank_plan=candidate.rank_plan,
                              weights_bytes=weights, measured_need=trial.need, margin=trial.margin,
                              trial_steps=len(trial.step_peaks), activation_scale=setting.activation_scale)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained_before)
    raise PlanRefused(_refusal(profile, spec.name, model_name, weights, tried))


def _activations_fit(model: nn.Module, method: Method, candidate: _Candidate, profile: DeviceProfile,
                     calibration, optimizer_slots: int, model_name: str, *, relative: bool = False) -> bool:
    """Steps 1 and 2 for one setting: fill in the candidate's ranks and predicted bytes, or why it cannot fit."""
    x, y = calibration[0]
    candidate.fixed = _fixed_costs(model, x, optimizer_slots)
    budget = profile.train_memory - candidate.fixed
    if profile.activation_memory is not None:
        budget = min(budget, profile.activation_memory)
    budget = int(budget * candidate.setting.activation_scale)
    candidate.activation_budget = budget
    exact, rest = _saved_bytes(model, method, candidate.convs, x, y)
    conv_budget = budget - rest
    if method.plans_ranks:
        if method.keeps_exact and exact <= conv_budget and candidate.setting.activation_scale == 1:
            candidate.ranks = {name: None for name in candidate.convs}
            candidate.predicted = exact + rest
            return True
        if conv_budget <= 0:
            candidate.why = (f"fixed costs {_mib(candidate.fixed)} (weights, gradients, optimizer state, workspace) "
                             f"and other saved {_mib(rest)} leave nothing")
            return False
        try:
            plan = plan_ranks(model, candidate.convs, calibration, conv_budget, model_name=model_name,
                              exact=method.keeps_exact, storage_itemsize=method.storage_itemsize, relative=relative)
        except BudgetTooSmallError as error:
            candidate.why = str(error)
            return False
        candidate.rank_plan, candidate.ranks = plan, plan.targets()
        candidate.predicted = plan.total_bytes + rest
    else:
        candidate.ranks = {name: None for name in candidate.convs}
        candidate.predicted = _method_bytes(model, method, candidate.ranks, x, y) if method.variant else \
            exact + rest
    if candidate.predicted > budget:
        candidate.why = f"needs {_mib(candidate.predicted)} of activations, {_mib(max(budget, 0))} left"
        return False
    return True


def _refusal(profile: DeviceProfile, method: str, model_name: str, weights: int, tried: list[_Candidate]) -> str:
    if weights >= profile.train_memory:
        why = f"the model's weights alone take {_mib(weights)}"
    elif tried:
        last = tried[-1]
        scale = "" if last.setting.activation_scale == 1 else \
            f", {last.setting.activation_scale:g} of the activation budget"
        why = f"the smallest setting tried, {last.setting.layers} layer(s) " \
              f"at batch {last.setting.batch_size}{scale}: " \
              f"{last.why}"
    else:
        why = "no setting to try"
    return f"device {profile.name!r}: no {method} setting of {model_name} fits its train-memory of " \
           f"{_mib(profile.train_memory)} ({why})"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
