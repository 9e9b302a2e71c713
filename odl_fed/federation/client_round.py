"""One client's round in plain torch: plan within the device's memory, train under both budgets, report.

The Flower ClientApp (:mod:`odl_fed.federation.client_app`) only converts messages to and from this. A round:

1. builds the job's model and loads the global trained layers (only those travel);
2. plans the layers, batch and ranks that fit the device (:func:`~odl_fed.planning.device_plan.plan_client`),
   cached per (model, weights, layers, method, batch, image size, dataset, strategy, device
   profile, planner version), in memory and on disk;
3. puts the method's layers in place, loads the ASI bases this client kept from its last round
   (warm start across rounds) and trains ``local-epochs`` epochs with a
   :class:`~odl_fed.training.memory_guard.MemoryGuard` on the process budget: the device's ``train-memory``
   less the model's weights, which are resident before training starts;
4. if the guard stops training anyway, retreats to the next setting in the planner's order
   (smaller batch, fewer layers, lower ranks), plans it, and trains again from the global layers,
   while the round's deadline allows; the new plan replaces the cached one;
5. returns the trained layers, the ASI bases to keep, and what the dashboard needs: activation
   bytes (measured with ``saved_tensors_hooks``), the guard's peak, FLOPs, time, loss, examples,
   and every attempt the round made;
6. with held-out data (federated evaluation), the top-1 there of the global model before the
   training and of the trained model after it (eval mode, no gradients, the plan's batch; outside
   the guard, its seconds in ``eval-time``).

A plan that cannot fit or a breached budget is an outcome, not an exception: the server logs it
and aggregates the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from odl_fed.asi import restore_model
from odl_fed.asi.layers import ASIConv2d
from odl_fed.config.job import JobSpec
from odl_fed.config.profile import DeviceProfile
from odl_fed.federation.job_assets import client_model
from odl_fed.planning.device_plan import ClientPlan, PlanRefused, Setting, nbytes, next_setting, plan_client
from odl_fed.schema import AttemptKey, Metric, Status
from odl_fed.training.data import ImageData, batches
from odl_fed.training.memory_guard import MemoryBudgetExceeded, MemoryGuard
from odl_fed.training.models import prepare_finetune
from odl_fed.training.task import apply_method, evaluate, make_optimizer, train_epoch, warm_up

__all__ = ["ClientOutcome", "PlanCache", "run_client_round", "asi_bases", "OK", "REFUSED", "MEMORY_EXCEEDED"]

OK, REFUSED, MEMORY_EXCEEDED = Status.OK, Status.REFUSED, Status.MEMORY_EXCEEDED  # odl_fed.schema.Status


@dataclass
class ClientOutcome:
    """What a client reports: ``arrays`` only when ``status`` is ``ok``."""

    client: str
    device: str
    status: str
    metrics: dict[str, float | int]
    plan: dict | None = None
    arrays: dict[str, Tensor] | None = None
    error: str = ""
    bases: dict[str, Tensor] = field(default_factory=dict)  # the ASI bases to keep for the next round
    attempts: list[dict] = field(default_factory=list)  # each plan tried this round and what became of it


# A plan cached by another version is made again. 2: the rank planner's batch-whole grid;
# 3: exact layers where the budget allows, and a measured trial of the training loop; 4: a mode kept
# whole holds no factor (its bytes no longer counted), padding folded into the conv
PLANNER_VERSION = 4


class PlanCache:
    """Client plans by (model, weights, layers, method, batch, image size, profile, rank weighting,
    planner version): in memory, and in ``directory`` as JSON files when one is given (so a board plans
    once, not every round, and simulated clients of one device type plan once, not once per actor).

    In memory only, it also keeps each plan's FLOPs per training step (counted on the first round a
    process trains that plan): a later round with the same plan skips the counted warm-up step.
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = None if directory is None else Path(directory)
        self._plans: dict[str, ClientPlan] = {}
        self.step_flops: dict[tuple, int] = {}
        self.hits = 0

    @contextlib.contextmanager
    def planning(self, key: str) -> Iterator[None]:
        """Held while a plan for ``key`` is looked up and made: another process that needs the same
        plan waits for it and then reads it, instead of planning it a second time."""
        if self.directory is None:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f".{key}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def key(job: JobSpec, profile: DeviceProfile) -> str:
        weights = job.weights
        if weights is not None and Path(weights).is_file():
            stat = Path(weights).stat()
            weights = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        what = {"model": job.model, "weights": weights, "layers": job.layers, "method": job.method,
                "batch": job.batch_size, "image": job.image_size, "dataset": job.dataset, "profile": asdict(profile),
                "strategy": job.strategy, "weighting": job.rank_weighting,
                "planner": PLANNER_VERSION}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def get(self, key: str) -> ClientPlan | None:
        if key in self._plans:
            self.hits += 1
            return self._plans[key]
        if self.directory is not None and (path := self.directory / f"{key}.json").is_file():
            try:
                plan = ClientPlan.from_dict(json.loads(path.read_text()))
            except (KeyError, TypeError, ValueError):
                return None  # a damaged cache file is planned again and overwritten
            self._plans[key] = plan
            self.hits += 1
            return plan
        return None

    def put(self, key: str, plan: ClientPlan) -> None:
        self._plans[key] = plan
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.json.tmp"
            tmp.write_text(json.dumps(plan.to_dict()) + "\n")
            tmp.replace(self.directory / f"{key}.json")


def _load_global(model: nn.Module, arrays: Mapping[str, Tensor], client: str) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(arrays) != set(params):
        raise ValueError(f"client {client}: the server sent layers {sorted(arrays)}, but this job trains "
                         f"{sorted(params)}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(arrays[name].shape) != tuple(p.shape):
                raise ValueError(f"client {client}: {name} has shape {tuple(arrays[name].shape)} from the server, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(arrays[name])
    return params


def asi_bases(model: nn.Module) -> dict[str, Tensor]:
    """The warm-start bases of the model's compressed convs, by state-dict key (what a client keeps)."""
    return {f"{name}.basis_{mode}": basis.detach().clone() for name, module in model.named_modules()
            if isinstance(module, ASIConv2d) for mode, basis in zip(module.modes, module.bases())
            if basis is not None}


def _load_bases(model: nn.Module, bases: Mapping[str, Tensor]) -> int:
    """Put kept bases back where a compressed conv of the same rank takes them; returns how many."""
    loaded = 0
    for name, module in model.named_modules():
        if not isinstance(module, ASIConv2d):
            continue
        for mode in module.modes:
            basis = bases.get(f"{name}.basis_{mode}")
            if basis is not None and basis.dim() == 2 and basis.shape[1] <= basis.shape[0]:
                setattr(module, f"basis_{mode}", basis.to(module.weight.dtype).clone())
                loaded += 1
    return loaded


class _Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


def run_client_round(job: JobSpec, profile: DeviceProfile, global_arrays: Mapping[str, Tensor], *, client: str,
                     data: ImageData, cache: PlanCache | None = None, proximal_mu: float = 0.0,
                     server_round: int = 1, bases: Mapping[str, Tensor] | None = None,
                     deadline: float | None = None, budget_scale: float = 1.0,
                     eval_data: ImageData | None = None) -> ClientOutcome:
    """Fine-tune the global trained layers on ``data`` within ``profile``'s memory; see the module doc.

    With ``eval_data`` (the part of its data the client holds out), a round that trains also reports the
    global model's top-1 there before the fine-tuning and the trained model's after it.

    ``bases`` are the ASI bases this client kept from its last round (:attr:`ClientOutcome.bases`);
    ``deadline`` the seconds the round may take (a retreat after a breach starts only while at
    least the last attempt's duration is left); ``budget_scale`` cuts the guard's budget after
    planning (the ``squeeze`` fault drill: memory another app took mid-round).
    """
    started = time.perf_counter()
    model, _ = client_model(job, num_classes=data.num_classes)
    try:
        return _client_round(model, job, profile, global_arrays, client=client, data=data, cache=cache,
                             proximal_mu=proximal_mu, server_round=server_round, bases=bases, deadline=deadline,
                             budget_scale=budget_scale, started=started, eval_data=eval_data)
    finally:
        restore_model(model)  # the process's working model goes back as it came (job.client_model)


def _client_round(model: nn.Module, job: JobSpec, profile: DeviceProfile, global_arrays: Mapping[str, Tensor], *,
                  client: str, data: ImageData, cache: PlanCache | None, proximal_mu: float, server_round: int,
                  bases: Mapping[str, Tensor] | None, deadline: float | None, budget_scale: float,
                  started: float, eval_data: ImageData | None = None) -> ClientOutcome:
    clock = _Deadline(deadline)
    _load_global(model, global_arrays, client)
    base = {Metric.TRAIN_MEMORY: profile.train_memory, Metric.SERVER_ROUND: server_round}
    cache = cache if cache is not None else PlanCache()
    key = PlanCache.key(job, profile)

    def make_plan(start: Setting | None = None) -> ClientPlan:
        return plan_client(model, model_name=job.model, profile=profile, method=job.method, layers=job.layers,
                           batch_size=job.batch_size, data=data, image_size=job.image_size, lr=job.lr,
                           start=start, proximal=proximal_mu > 0, seed=job.seed,
                           relative=job.rank_weighting == "relative")

    with cache.planning(key):
        plan, cached = cache.get(key), True
        if plan is None:
            cached = False
            try:
                plan = make_plan()
            except PlanRefused as error:
                return ClientOutcome(client, profile.name, REFUSED, base, error=str(error))
            cache.put(key, plan)
    plan_seconds = time.perf_counter() - started
    scores = {}
    if eval_data is not None and len(eval_data):
        eval_started = time.perf_counter()
        _load_global_subset(model, global_arrays)  # the global model, as the server sent it
        before = _evaluate(model, eval_data, plan, job)
        scores = {Metric.EVAL_ACC_BEFORE: before, Metric.EVAL_EXAMPLES: len(eval_data),
                  Metric.EVAL_TIME: time.perf_counter() - eval_started}

    attempts: list[dict] = []
    while True:
        attempt_started = time.perf_counter()
        try:
            trained = _train(model, job, plan, data, global_arrays, client=client, proximal_mu=proximal_mu,
                             server_round=server_round, bases=bases or {},
                             train_memory=int(profile.train_memory * budget_scale),
                             step_flops=cache.step_flops, plan_key=key)
        except MemoryBudgetExceeded as error:
            attempts.append(_attempt(plan, MEMORY_EXCEEDED, error.peak, error.budget, str(error)))
            restore_model(model)
            after = next_setting(plan, layers=job.layers, batch_size=job.batch_size)
            took = time.perf_counter() - attempt_started
            if after is None or clock.left() < 2 * took:
                why = "no smaller setting to retreat to" if after is None else \
                    f"{clock.left():.0f} s left of the round, the last attempt took {took:.0f} s"
                return ClientOutcome(client, profile.name, MEMORY_EXCEEDED,
                                     base | {Metric.PEAK_MEMORY: error.peak, Metric.MEMORY_BUDGET: error.budget,
                                             Metric.ATTEMPTS: len(attempts)},
                                     plan=plan.to_dict(), error=f"{error}; {why}", attempts=attempts)
            try:
                plan = make_plan(after)
            except PlanRefused as refused:
                return ClientOutcome(client, profile.name, MEMORY_EXCEEDED,
                                     base | {Metric.PEAK_MEMORY: error.peak, Metric.MEMORY_BUDGET: error.budget,
                                             Metric.ATTEMPTS: len(attempts)},
                                     plan=plan.to_dict(), error=f"{error}; retreating: {refused}", attempts=attempts)
            cache.put(key, plan)
            continue
        break
    metrics, arrays, kept = trained
    if scores:  # the model as trained (its method's layers still in place: exact without gradients)
        eval_started = time.perf_counter()
        scores[Metric.EVAL_ACC_AFTER] = _evaluate(model, eval_data, plan, job)
        scores[Metric.EVAL_TIME] += time.perf_counter() - eval_started
        metrics = metrics | scores
    attempts.append(_attempt(plan, OK, metrics[Metric.PEAK_MEMORY], metrics[Metric.MEMORY_BUDGET]))
    metrics = base | metrics | {Metric.PLAN_TIME: plan_seconds, Metric.PLAN_CACHED: int(cached),
                                Metric.ATTEMPTS: len(attempts), Metric.CLIENT_TIME: time.perf_counter() - started}
    return ClientOutcome(client, profile.name, OK, metrics, plan=plan.to_dict(), arrays=arrays, bases=kept,
                         attempts=attempts)


def _evaluate(model: nn.Module, data: ImageData, plan: ClientPlan, job: JobSpec) -> float:
    """Top-1 on ``data`` in eval mode, without gradients, in batches of the plan's size."""
    return evaluate(model, data, batch_size=plan.batch_size, image_size=job.image_size,
                    in_eval_mode=True)["accuracy"]


def _attempt(plan: ClientPlan, status: str, peak: int, budget: int, error: str = "") -> dict:
    return {AttemptKey.STATUS: status, AttemptKey.LAYERS: len(plan.layers), AttemptKey.BATCH_SIZE: plan.batch_size,
            AttemptKey.ACTIVATION_SCALE: plan.activation_scale, AttemptKey.PEAK_MEMORY: peak,
            AttemptKey.MEMORY_BUDGET: budget, AttemptKey.PLANNED_NEED: plan.measured_need + plan.margin,
            AttemptKey.ERROR: error}


def _train(model: nn.Module, job: JobSpec, plan: ClientPlan, data: ImageData, global_arrays, *, client: str,
           proximal_mu: float, server_round: int, bases: Mapping[str, Tensor], train_memory: int,
           step_flops: dict[tuple, int], plan_key: str):
    """One attempt: the plan's layers from the global values, trained under the guard (raises on a breach).

    The warm-up step (FLOPs counted, kernels set up outside the guard) runs once per plan and batch
    shape in a process; ``step_flops`` keeps its count for the rounds after."""
    prepare_finetune(model, layers=len(plan.layers))  # a plan with fewer layers leaves the others at the global values
    travelling, params = _load_global_subset(model, global_arrays)
    apply_method(model, job.method, plan.ranks)
    warm = _load_bases(model, bases)
    optimizer = make_optimizer(list(params.values()), lr=job.lr)
    x, y = next(batches(data, batch_size=plan.batch_size, image_size=job.image_size))
    warmed = (plan_key, json.dumps(plan.to_dict(), sort_keys=True), tuple(x.shape))
    if warmed not in step_flops:
        step_flops[warmed] = warm_up(model, x, y)
    flops_per_step = step_flops[warmed]
    del x, y
    resident = nbytes(model.parameters()) + nbytes(model.buffers())
    guard = MemoryGuard(max(train_memory - resident, 1), client=client)
    stats = {"loss": 0.0, "examples": 0, "seconds": 0.0, "activation_bytes": 0, "step_saved_bytes": 0}
    with guard:
        anchor = {name: p.detach().clone() for name, p in params.items()} if proximal_mu > 0 else None

        def proximal() -> Tensor:
            return proximal_mu / 2 * sum((params[n] - anchor[n]).pow(2).sum() for n in anchor)

        for epoch in range(job.local_epochs):
            epoch_stats = train_epoch(model, data, optimizer=optimizer, batch_size=plan.batch_size,
                                      image_size=job.image_size, measured_layers=plan.layers,
                                      seed=job.seed + 1000 * server_round + epoch, guard=guard,
                                      regularizer=proximal if anchor is not None else None)
            stats["loss"] = epoch_stats["loss"]
            stats["examples"] += epoch_stats["examples"]
            stats["seconds"] += epoch_stats["seconds"]
            stats["activation_bytes"] = max(stats["activation_bytes"], epoch_stats["activation_bytes"])
            stats["step_saved_bytes"] = max(stats["step_saved_bytes"], epoch_stats["step_saved_bytes"])
    steps = -(-len(data) // plan.batch_size) * job.local_epochs
    metrics = {
        Metric.NUM_EXAMPLES: stats["examples"],
        Metric.TRAIN_LOSS: stats["loss"],
        Metric.TRAIN_TIME: stats["seconds"],
        Metric.BATCH_SIZE: plan.batch_size,
        Metric.LAYERS_TRAINED: len(plan.layers),
        Metric.EXACT_LAYERS: len(plan.exact_layers),
        Metric.ACTIVATION_BYTES: stats["activation_bytes"],
        Metric.PLANNED_ACTIVATION_BYTES: plan.predicted_activation_bytes,
        Metric.STEP_SAVED_BYTES: stats["step_saved_bytes"],
        Metric.PEAK_MEMORY: guard.peak,
        Metric.MEMORY_BUDGET: guard.budget,
        Metric.PLANNED_NEED: plan.measured_need + plan.margin,
        Metric.GUARD_SAMPLES: guard.samples,
        Metric.GUARD_RECLAIMS: guard.reclaims,
        Metric.WARM_BASES: warm,
        Metric.FLOPS_PER_STEP: flops_per_step,
        Metric.TRAIN_FLOPS: flops_per_step * steps,
    }
    # every layer that travels (a plan with fewer layers leaves the others at their global values)
    arrays = {name: p.detach().clone() for name, p in travelling.items()}
    return metrics, arrays, asi_bases(model)


def _load_global_subset(model: nn.Module, global_arrays: Mapping[str, Tensor]):
    """Reset every travelling layer to its global value; return them by name, and the ones this plan trains.

    Parameters keep their identity when the method wraps their layers (under other names)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in global_arrays.items():
            named[name].copy_(value)
    return {name: named[name] for name in global_arrays}, {n: p for n, p in named.items() if p.requires_grad}
