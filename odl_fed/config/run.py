"""The run config both apps read (``[tool.flwr.app.config]`` in pyproject, ``--run-config``, or
``odl-fed simulate``), with kebab-case keys as Flower's apps use them.

==============  =====================================================================
fleet           the fleet file (devices and job), e.g. ``configs/fleets/demo.yaml``
devices-file    extra device profiles (YAML), or ``""``
out-dir         where the server writes ``rounds.jsonl`` and the final trained layers
plan-cache      where clients keep their plans, or ``""`` for memory only
round-timeout   seconds the server waits for a round's replies
resume          go on from ``out-dir``'s checkpoint (:mod:`odl_fed.federation.checkpoint`) instead of starting anew
data-dirs       simulation of a ``dataset: local`` fleet: each client's own image folder, by partition id,
                joined by ``os.pathsep`` (``odl-fed simulate --data DIR ...``); ``""`` otherwise
==============  =====================================================================

Relative paths are taken from the directory the command runs in.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from odl_fed.config.fleet import FleetSpec, load_fleet
from odl_fed.config.suggest import did_you_mean

__all__ = ["RunSettings", "DEFAULTS"]

DEFAULTS = {
    "fleet": "configs/fleets/demo.yaml",
    "devices-file": "",
    "out-dir": "runs/latest",
    "plan-cache": ".odl-fed/plans",
    "round-timeout": 600,
    "resume": False,
    "data-dirs": "",
}


@dataclass(frozen=True)
class RunSettings:
    fleet_path: Path
    devices_file: Path | None
    out_dir: Path
    plan_cache: Path | None
    round_timeout: float
    resume: bool = False
    data_dirs: tuple[Path, ...] = ()  # a simulated dataset: local fleet's folders, by partition id

    @classmethod
    def from_config(cls, config: Mapping) -> RunSettings:
        for key in config:
            if key not in DEFAULTS:
                raise ValueError(f"run config: unknown key {key!r}{did_you_mean(key, DEFAULTS)}; "
                                 f"known: {list(DEFAULTS)}")
        merged = DEFAULTS | dict(config)

        def path(key: str) -> Path | None:
            value = str(merged[key]).strip()
            return Path(value).expanduser().absolute() if value else None

        fleet = path("fleet")
        if fleet is None:
            raise ValueError("run config: 'fleet' must name a fleet file")
        timeout = merged["round-timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"run config: 'round-timeout' must be a positive number, but got {timeout!r}")
        resume = merged["resume"]
        if not isinstance(resume, bool):
            raise ValueError(f"run config: 'resume' must be true or false, but got {resume!r}")
        folders = tuple(Path(part).expanduser().absolute() for part in str(merged["data-dirs"]).split(os.pathsep)
                        if part.strip())
        return cls(fleet_path=fleet, devices_file=path("devices-file"), out_dir=path("out-dir") or Path.cwd(),
                   plan_cache=path("plan-cache"), round_timeout=float(timeout), resume=resume, data_dirs=folders)

    def fleet(self) -> FleetSpec:
        return _load_fleet(str(self.fleet_path), None if self.devices_file is None else str(self.devices_file),
                           _mtime(self.fleet_path), _mtime(self.devices_file))

    def as_config(self) -> dict:
        return {"fleet": str(self.fleet_path), "devices-file": str(self.devices_file or ""),
                "out-dir": str(self.out_dir), "plan-cache": str(self.plan_cache or ""),
                "round-timeout": self.round_timeout, "resume": self.resume,
                "data-dirs": os.pathsep.join(map(str, self.data_dirs))}


def _mtime(path: Path | None) -> int:
    return path.stat().st_mtime_ns if path is not None and path.exists() else 0


@functools.lru_cache(maxsize=8)
def _load_fleet(fleet: str, devices: str | None, _fleet_mtime: int, _devices_mtime: int) -> FleetSpec:
    """Simulated clients share processes: read each fleet file once per change, not once per message."""
    return load_fleet(fleet, device_files=() if devices is None else (devices,))

