"""Fleets: a YAML mix of devices plus the federated job they run (:mod:`odl_fed.config.job`), validated once
at the edge.

::

    devices: [{device: rpi4, count: 2}, {device: tiny, count: 1}]
    job:
      model: resnet18
      weights: runs/r18.pt        # optional
      layers: 2
      method: asi                 # vanilla | asi | asi-only | asi-fp16 | asi-int8 | hosvd | gradfilt
                                  # (odl_fed.training.methods)
      rank-weighting: absolute    # optional: absolute (the paper's) | relative (each layer's error over its gradient's)
      rounds: 3
      clients-per-round: 3
      local-epochs: 1
      batch-size: 32
      lr: 0.001
      image-size: 32
      dataset: mnist-digits       # or local: each board's own images (python -m odl_fed.client --data DIR)
      classes: [cat, dog]         # dataset local only: the class sub-folder names, in label order
      partition: iid              # or {dirichlet: 0.3} (a named dataset's shares)
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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from odl_fed.config.errors import FleetError
from odl_fed.config.job import JobError, JobSpec, parse_job
from odl_fed.config.profile import DeviceProfile, ProfileError, get_profile, load_profiles
from odl_fed.config.suggest import did_you_mean

__all__ = ["FleetSpec", "JobSpec", "DeviceGroup", "FleetError", "load_fleet"]


@dataclass(frozen=True)
class DeviceGroup:
    profile: DeviceProfile
    count: int


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

    def client_profiles(self) -> list[DeviceProfile]:
        """The device profile of each client, by partition id."""
        return [g.profile for g in self.groups for _ in range(g.count)]


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
    try:
        job = parse_job(raw["job"], f"{path}: job")
    except JobError as error:
        raise FleetError(str(error)) from None
    total = sum(g.count for g in groups)
    if job.clients_per_round > total:
        raise FleetError(f"{path}: job.clients-per-round is {job.clients_per_round}, but the fleet has {total} clients")
    if job.min_clients > job.clients_per_round:
        raise FleetError(f"{path}: job.min-clients is {job.min_clients}, more than job.clients-per-round "
                         f"({job.clients_per_round})")
    return FleetSpec(path=str(path), groups=tuple(groups), job=job)
