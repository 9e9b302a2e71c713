"""One client's round in plain torch: plan within the device's memory, train under both budgets, report.

The Flower ClientApp (:mod:`odl_fed.client_app`) only converts messages to and from this. A round:

1. builds the job's model and loads the global trained layers (only those travel);
2. plans the layers, batch and ranks that fit the device (:func:`~odl_fed.client_plan.plan_client`),
   cached per (model, weights, layers, method, batch, image size, device profile);
3. puts the method's layers in place and trains ``local-epochs`` epochs with a
   :class:`~odl_fed.memory_guard.MemoryGuard` on the process budget: the device's ``train-memory``
   less the model's weights, which are resident before training starts;
4. returns the trained layers and what the dashboard needs: activation bytes (measured with
   ``saved_tensors_hooks``), the guard's peak, FLOPs, time, loss, examples.

A plan that cannot fit or a breached budget is an outcome, not an exception: the server logs it
and aggregates the others.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odl_fed.client_plan import ClientPlan, PlanRefused, plan_client
from odl_fed.data import ImageData, batches
from odl_fed.fleet import JobSpec
from odl_fed.flops import count_flops
from odl_fed.memory_guard import MemoryBudgetExceeded, MemoryGuard
from odl_fed.job import global_model
from odl_fed.models import prepare_finetune
from odl_fed.profile import DeviceProfile
from odl_fed.task import apply_method, train_epoch

__all__ = ["ClientOutcome", "PlanCache", "run_client_round", "OK", "REFUSED", "MEMORY_EXCEEDED"]

OK, REFUSED, MEMORY_EXCEEDED = "ok", "refused", "memory-exceeded"


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


PLANNER_VERSION = 2  # 2: the rank planner's batch-whole grid; a plan cached by another version is made again


class PlanCache:
    """Client plans by (model, weights, layers, method, batch, image size, profile, planner version): in
    memory, and in ``directory`` as JSON files when one is given (so a board plans once, not every round)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = None if directory is None else Path(directory)
        self._plans: dict[str, ClientPlan] = {}
        self.hits = 0

    @staticmethod
    def key(job: JobSpec, profile: DeviceProfile) -> str:
        weights = job.weights
        if weights is not None and Path(weights).is_file():
            stat = Path(weights).stat()
            weights = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        what = {"model": job.model, "weights": weights, "layers": job.layers, "method": job.method,
                "batch": job.batch_size, "image": job.image_size, "dataset": job.dataset, "profile": asdict(profile),
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


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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


def _step_flops(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """FLOPs of one training step, forward + backward (gradients discarded)."""
    flops, _ = count_flops(lambda: F.cross_entropy(model(x), y).backward())
    for p in model.parameters():
        p.grad = None
    return flops


def run_client_round(job: JobSpec, profile: DeviceProfile, global_arrays: Mapping[str, Tensor], *, client: str,
                     data: ImageData, cache: PlanCache | None = None, proximal_mu: float = 0.0,
                     server_round: int = 1) -> ClientOutcome:
    """Fine-tune the global trained layers on ``data`` within ``profile``'s memory; see the module doc."""
    started = time.perf_counter()
    model, _ = global_model(job, num_classes=data.num_classes)
    params = _load_global(model, global_arrays, client)
    base = {"train-memory": profile.train_memory, "server-round": server_round}

    cache = cache if cache is not None else PlanCache()
    key = PlanCache.key(job, profile)
    plan, cached = cache.get(key), True
    if plan is None:
        cached = False
        try:
            plan = plan_client(model, model_name=job.model, profile=profile, method=job.method, layers=job.layers,
                               batch_size=job.batch_size, data=data, image_size=job.image_size)
        except PlanRefused as error:
            return ClientOutcome(client, profile.name, REFUSED, base, error=str(error))
        cache.put(key, plan)
    plan_seconds = time.perf_counter() - started

    if len(plan.layers) < job.layers:  # the plan dropped layers: those stay at the global values
        prepare_finetune(model, layers=len(plan.layers))
    apply_method(model, job.method, plan.ranks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Per parameter, not foreach: the multi-tensor step's temporaries are as large as all trained
    # parameters together, which a small device pays for at every step.
    optimizer = torch.optim.Adam(trainable, lr=job.lr, foreach=False)
    anchor = {name: p.detach().clone() for name, p in params.items()} if proximal_mu > 0 else None

    def proximal() -> Tensor:
        return proximal_mu / 2 * sum((params[n] - anchor[n]).pow(2).sum() for n in anchor)

    x, y = next(batches(data, batch_size=plan.batch_size, image_size=job.image_size))
    flops_per_step = _step_flops(model, x, y)
    resident = _nbytes(model.parameters()) + _nbytes(model.buffers())
    guard = MemoryGuard(max(profile.train_memory - resident, 1), client=client)
    stats = {"loss": 0.0, "examples": 0, "seconds": 0.0, "activation_bytes": 0, "step_saved_bytes": 0}
    try:
        with guard:
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
    except MemoryBudgetExceeded as error:
        return ClientOutcome(client, profile.name, MEMORY_EXCEEDED,
                             base | {"peak-memory": guard.peak, "memory-budget": guard.budget},
                             plan=plan.to_dict(), error=str(error))
    steps = -(-len(data) // plan.batch_size) * job.local_epochs
    metrics = base | {
        "num-examples": stats["examples"],
        "train-loss": stats["loss"],
        "train-time": stats["seconds"],
        "plan-time": plan_seconds,
        "plan-cached": int(cached),
        "batch-size": plan.batch_size,
        "layers-trained": len(plan.layers),
        "activation-bytes": stats["activation_bytes"],
        "planned-activation-bytes": plan.predicted_activation_bytes,
        "step-saved-bytes": stats["step_saved_bytes"],
        "peak-memory": guard.peak,
        "memory-budget": guard.budget,
        "guard-samples": guard.samples,
        "flops-per-step": flops_per_step,
        "train-flops": flops_per_step * steps,
    }
    arrays = {name: p.detach().clone() for name, p in params.items()}
    return ClientOutcome(client, profile.name, OK, metrics, plan=plan.to_dict(), arrays=arrays)

