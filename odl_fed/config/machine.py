"""Which device profile this machine is closest to, from its own readings: RAM and cores (psutil)
and, in a container, the cgroup's memory limit (v2 ``memory.max`` or v1
``memory/memory.limit_in_bytes``; a board or a modern host has v2, Docker on a v1 host has v1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from odl_fed.config.profile import DeviceProfile

__all__ = ["MachineReadings", "read_machine", "cgroup_memory_limit", "cgroup_memory_usage", "closest_profile",
           "fit_to_memory_limit", "LIMIT_MARGIN"]

# Kept free under a container's limit, besides train-memory, when the training budget is cut to fit
# it: what a round adds outside the training budget (the model, the data, planning's copies and its
# measured step, the FLOPs count) and the allocator's slack. Measured in a container (ResNet-18,
# 32 px): a ClientApp at ~680 MiB in the cgroup when it reads its node config reached 751 MiB
# anonymous + 415 MiB file pages before its plan refused it; with 64 and 256 MiB kept free, a
# client left 199 and 13 MiB was OOM-killed by its container.
LIMIT_MARGIN = 640 * 2**20

# cgroup v1 reports "no limit" as a huge page-aligned number (2**63 rounded down to a page).
_NO_LIMIT = 2**62


@dataclass(frozen=True)
class MachineReadings:
    """What this machine (or container) offers: bytes of RAM, cores, and the cgroup limit if any."""

    ram: int
    cores: int
    cgroup_limit: int | None = None
    cgroup_version: int | None = None

    @property
    def memory(self) -> int:
        """The memory a process here can have: the RAM, or the container's limit when lower."""
        return min(self.ram, self.cgroup_limit) if self.cgroup_limit else self.ram

    def describe(self) -> str:
        text = f"{self.ram / 2**30:.1f} GiB of RAM and {self.cores} core(s)"
        if self.cgroup_limit:
            text += f", a cgroup v{self.cgroup_version} memory limit of {self.cgroup_limit / 2**20:.0f} MiB"
        return text


def _own_cgroup_paths(proc_self_cgroup: Path) -> dict[str, str]:
    """Controller -> path of this process's cgroup (``""`` is cgroup v2's unified entry)."""
    paths = {}
    try:
        for line in proc_self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    except (OSError, ValueError):
        pass
    return paths


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max" or not text.isdigit() or int(text) >= _NO_LIMIT:
        return None
    return int(text)


def cgroup_memory_limit(*, root: Path = Path("/sys/fs/cgroup"),
                        proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int | None, int | None]:
    """``(limit bytes, cgroup version)`` of this process's memory cgroup, or ``(None, None)``.

    Looks at this process's own group first (a host's child group), then at the root of the mount
    (what a container sees as its own group).
    """
    for directory, version in _memory_groups(root, proc_self_cgroup):
        limit = _read_limit(directory / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
        if limit is not None:
            return limit, version
    return None, None


def _memory_groups(root: Path, proc_self_cgroup: Path) -> list[tuple[Path, int]]:
    """Directories that may hold this process's memory cgroup files, nearest first."""
    own = _own_cgroup_paths(proc_self_cgroup)
    groups = []
    for mount in (root, root / "unified"):  # v2 alone, or v2 beside v1 (a hybrid host)
        if "" in own:
            groups.append((mount / own[""].lstrip("/"), 2))
        groups.append((mount, 2))
    if "memory" in own:
        groups.append((root / "memory" / own["memory"].lstrip("/"), 1))
    groups += [(root / "memory", 1), (root, 1)]
    return groups


def cgroup_memory_usage(*, root: Path = Path("/sys/fs/cgroup"),
                        proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes the memory cgroup holds now, less the inactive file cache the kernel drops first."""
    for directory, version in _memory_groups(root, proc_self_cgroup):
        usage = _read_limit(directory / ("memory.current" if version == 2 else "memory.usage_in_bytes"))
        if usage is None or _read_limit(directory / ("memory.max" if version == 2 else
                                                      "memory.limit_in_bytes")) is None:
            continue
        inactive = 0
        try:
            for line in (directory / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file") and value.isdigit():
                    inactive = max(inactive, int(value))
        except OSError:
            pass
        return max(usage - inactive, 0)
    return None


def fit_to_memory_limit(profile: DeviceProfile, *, limit: int | None, usage: int | None,
                        margin: int = LIMIT_MARGIN) -> tuple[DeviceProfile, str]:
    """The profile with ``train-memory`` cut to what a memory limit leaves now, and a note saying so.

    Past a cgroup limit the kernel kills the process without a word; the plan and the MemoryGuard
    keep under the budget they are given, so that budget is made to fit what the container has
    left (``limit - usage - margin``, read after Python, torch and Flower are loaded).
    """
    if limit is None or usage is None:
        return profile, ""
    left = limit - usage - margin
    if left >= profile.train_memory:
        return profile, ""
    train = max(left, 1)
    note = (f"{profile.name}: the container's memory limit ({limit / 2**20:.0f} MiB, {usage / 2**20:.0f} MiB in use) "
            f"leaves {max(left, 0) / 2**20:.0f} MiB: train-memory cut from {profile.train_memory / 2**20:.0f} MiB")
    return replace(profile, train_memory=train), note


def read_machine() -> MachineReadings:
    """This machine's readings (psutil and the cgroup files)."""
    limit, version = cgroup_memory_limit()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else psutil.cpu_count() or 1
    return MachineReadings(ram=psutil.virtual_memory().total, cores=cores, cgroup_limit=limit,
                           cgroup_version=version)


def closest_profile(readings: MachineReadings,
                    profiles: Mapping[str, DeviceProfile]) -> tuple[DeviceProfile, str]:
    """The profile nearest this machine (RAM first, on a log scale; cores break near-ties), and why.

    A profile whose RAM is more than this machine can give is only picked when none fits.
    """
    if not profiles:
        raise ValueError("no device profiles to choose from")
    memory = readings.memory

    def distance(profile: DeviceProfile) -> float:
        too_big = profile.ram > memory * 1.05  # a profile promising more than there is
        return (too_big, abs(math.log(profile.ram / memory)) + 0.25 * abs(math.log(profile.cores / readings.cores)))

    ranked = sorted(profiles.values(), key=distance)
    best = ranked[0]
    runner_up = f"; next: {ranked[1].name} ({ranked[1].ram / 2**30:.2f} GiB, {ranked[1].cores} cores)" \
        if len(ranked) > 1 else ""
    why = "the nearest profile that does not promise more" if not distance(best)[0] else \
        "the nearest profile, though every one promises more memory than there is"
    reason = (f"picked {best.name} ({best.ram / 2**30:.2f} GiB, {best.cores} cores): this machine has "
              f"{readings.describe()}, so {memory / 2**30:.2f} GiB for a client; {best.name} is {why}{runner_up}")
    return best, reason
