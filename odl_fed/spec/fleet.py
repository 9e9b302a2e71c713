"""Fleets: a YAML mix of devices plus the federated job they run, validated once at the edge.

::

    devices: [{device: rpi4, count: 2}, {device: tiny, count: 1}]
    job:
      model: resnet18
      weights: runs/r18.pt        # optional
      layers: 2
      method: asi                 # vanilla | asi | asi-only | asi-fp16 | asi-int8 | hosvd | gradfilt (odl_fed.training.methods)
      rank-weighting: absolute    # optional: absolute (the paper's) | relative (each layer's error over its gradient's)
      rounds: 3
      clients-per-round: 3
      local-epochs: 1
      batch-size: 32
      lr: 0.001
      image-size: 32
      dataset: mnist-digits
      partition: iid              # or {dirichlet: 0.3}
      seed: 0
      strategy: fedavg            # fedavg | fedprox | fedadam (optional)
      proximal-mu: 0.01           # fedprox only
      server-lr: 0.01             # fedadam only
      examples-per-client: 500    # optional cap on each client's share
      eval-examples: 1000         # optional cap on the server's held-out set
      min-clients: 1              # optional: a round with fewer clients connected is skipped

Every mistake names the file and the field, with the nearest valid name where one is close.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from odl_fed.training.data import DATASETS
from odl_fed.training.methods import METHODS
from odl_fed.planning.ranks import WEIGHTINGS
from odl_fed.training.models import MODELS, check_model_input
from odl_fed.spec.suggest import did_you_mean
from odl_fed.spec.profile import DeviceProfile, ProfileError, get_profile, load_profiles

__all__ = ["FleetSpec", "JobSpec", "DeviceGroup", "FleetError", "load_fleet"]


class FleetError(ValueError):
    """A fleet file that cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class DeviceGroup:
    profile: DeviceProfile
    count: int


@dataclass(frozen=True)
class JobSpec:
    model: str
    layers: int
    method: str
    rounds: int
    clients_per_round: int
    local_epochs: int
    batch_size: int
    lr: float
    image_size: int
    dataset: str
    dirichlet_alpha: float | None
    seed: int
    weights: str | None = None
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 0.0
    examples_per_client: int | None = None
    eval_examples: int | None = None
    min_clients: int = 1  # fewer connected clients than this and a round is skipped
    # how the clients' rank planner sums the layers' gradient errors (odl_fed.planning.ranks.WEIGHTINGS)
    rank_weighting: str = "absolute"


@dataclass(frozen=True)
class FleetSpec:
    path: str
    groups: tuple[DeviceGroup, ...]
    job: JobSpec

    @property
    def num_clients(self) -> int:
        return sum(g.count for g in self.groups)

    def check_files(self) -> None:
        """Raise a clear error for a file the job needs that is not there (before any process starts)."""
        if self.job.weights is not None and not Path(self.job.weights).is_file():
            raise FleetError(f"{self.path}: job.weights: {self.job.weights} does not exist (make it with "
                             f"`odl-fed pretrain --model {self.job.model} ... --out {self.job.weights}`)")

    def check_model(self) -> None:
        """Raise a clear error when the model cannot train ``layers`` convs on ``image-size`` images
        (checked on a model without storage: nothing is computed)."""
        try:
            check_model_input(self.job.model, layers=self.job.layers, image_size=self.job.image_size)
        except ValueError as error:
            field = "layers" if "layers" in str(error).split(":")[0] else "image-size"
            raise FleetError(f"{self.path}: job.{field}: {error}") from None

    def client_profiles(self) -> list[DeviceProfile]:
        """The device profile of each client, by partition id."""
        return [g.profile for g in self.groups for _ in range(g.count)]


STRATEGIES = ("fedavg", "fedprox", "fedadam")
_POSITIVE_INTS = ("layers", "rounds", "clients-per-round", "local-epochs", "batch-size", "image-size")
_OPTIONAL_INTS = ("examples-per-client", "eval-examples", "min-clients")
_CHOICES = {"model": MODELS, "method": METHODS, "dataset": DATASETS}
_STRATEGY_KEYS = {"proximal-mu": ("fedprox", 0.01), "server-lr": ("fedadam", 0.01)}
_JOB_KEYS = (*_POSITIVE_INTS, *_CHOICES, "lr", "partition", "seed", "weights", "strategy", *_STRATEGY_KEYS,
             *_OPTIONAL_INTS, "rank-weighting")
_REQUIRED = (*_POSITIVE_INTS, *_CHOICES, "lr")


def _job(raw, where: str) -> JobSpec:
    if not isinstance(raw, Mapping):
        raise FleetError(f"{where}: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _JOB_KEYS:
            raise FleetError(f"{where}: unknown field {key!r}{did_you_mean(key, _JOB_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise FleetError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in _POSITIVE_INTS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FleetError(f"{where}.{key}: must be a positive integer, but got {value!r}")
    for key, options in _CHOICES.items():
        if raw[key] not in options:
            raise FleetError(f"{where}.{key}: must be one of {list(options)}, but got {raw[key]!r}"
                             f"{did_you_mean(raw[key], options)}")
    _positive_number(raw["lr"], f"{where}.lr")
    for key in _OPTIONAL_INTS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FleetError(f"{where}.{key}: must be a positive integer, but got {value!r}")
    strategy = raw.get("strategy", "fedavg")
    if strategy not in STRATEGIES:
        raise FleetError(f"{where}.strategy: must be one of {list(STRATEGIES)}, but got {strategy!r}"
                         f"{did_you_mean(strategy, STRATEGIES)}")
    knobs = {}
    for key, (owner, default) in _STRATEGY_KEYS.items():
        if key in raw and strategy != owner:
            raise FleetError(f"{where}.{key}: only applies to strategy {owner!r}, but strategy is {strategy!r}")
        knobs[key] = _positive_number(raw.get(key, default), f"{where}.{key}") if strategy == owner else 0.0
    partition = raw.get("partition", "iid")
    if partition == "iid":
        alpha = None
    elif isinstance(partition, Mapping) and set(partition) == {"dirichlet"} and \
            isinstance(partition["dirichlet"], (int, float)) and 0 < partition["dirichlet"] < math.inf:
        alpha = float(partition["dirichlet"])
    else:
        raise FleetError(f"{where}.partition: must be 'iid' or {{dirichlet: ALPHA}} with a finite ALPHA > 0, "
                         f"but got {partition!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FleetError(f"{where}.seed: must be an integer, but got {seed!r}")
    weights = raw.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise FleetError(f"{where}.weights: must be a file path, but got {weights!r}")
    weighting = raw.get("rank-weighting", "absolute")
    if weighting not in WEIGHTINGS:
        raise FleetError(f"{where}.rank-weighting: must be one of {list(WEIGHTINGS)}, but got {weighting!r}"
                         f"{did_you_mean(str(weighting), WEIGHTINGS)}")
    return JobSpec(model=raw["model"], layers=raw["layers"], method=raw["method"], rounds=raw["rounds"],
                   clients_per_round=raw["clients-per-round"], local_epochs=raw["local-epochs"],
                   batch_size=raw["batch-size"], lr=float(raw["lr"]), image_size=raw["image-size"],
                   dataset=raw["dataset"], dirichlet_alpha=alpha, seed=seed, weights=weights, strategy=strategy,
                   proximal_mu=knobs["proximal-mu"], server_lr=knobs["server-lr"],
                   examples_per_client=raw.get("examples-per-client"), eval_examples=raw.get("eval-examples"),
                   min_clients=raw.get("min-clients", 1), rank_weighting=weighting)


def _positive_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise FleetError(f"{where}: must be a positive finite number, but got {value!r}")
    return float(value)


def load_fleet(path: str | Path, *, device_files: tuple[str | Path, ...] = ()) -> FleetSpec:
    """Read and check a fleet file (devices resolved against the built-in and ``device_files`` profiles)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FleetError(f"fleet file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise FleetError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, Mapping):
        raise FleetError(f"{path}: expected a mapping with 'devices' and 'job'")
    for key in raw:
        if key not in ("devices", "job"):
            raise FleetError(f"{path}: unknown field {key!r}{did_you_mean(key, ('devices', 'job'))}")
    if "devices" not in raw or "job" not in raw:
        raise FleetError(f"{path}: missing field(s) {', '.join(k for k in ('devices', 'job') if k not in raw)}")
    try:
        profiles = load_profiles(*device_files)
    except ProfileError as error:
        raise FleetError(str(error)) from None
    if not isinstance(raw["devices"], list) or not raw["devices"]:
        raise FleetError(f"{path}: devices must be a non-empty list of {{device, count}}")
    groups = []
    for i, entry in enumerate(raw["devices"]):
        where = f"{path}: devices[{i}]"
        if not isinstance(entry, Mapping) or set(entry) - {"device", "count"} or "device" not in entry:
            raise FleetError(f"{where}: expected {{device: NAME, count: N}}, but got {entry!r}")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise FleetError(f"{where}.count: must be a positive integer, but got {count!r}")
        try:
            groups.append(DeviceGroup(get_profile(entry["device"], profiles), count))
        except ProfileError as error:
            raise FleetError(f"{where}.device: {error}") from None
    job = _job(raw["job"], f"{path}: job")
    total = sum(g.count for g in groups)
    if job.clients_per_round > total:
        raise FleetError(f"{path}: job.clients-per-round is {job.clients_per_round}, but the fleet has {total} clients")
    if job.min_clients > job.clients_per_round:
        raise FleetError(f"{path}: job.min-clients is {job.min_clients}, more than job.clients-per-round "
                         f"({job.clients_per_round})")
    return FleetSpec(path=str(path), groups=tuple(groups), job=job)
