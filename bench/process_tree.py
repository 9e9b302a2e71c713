"""What a benchmark's run holds: this process and every process it started, sampled with psutil.

Roles: ``server`` (this process: the ServerApp, and in simulation Flower's engine), ``clients``
(Ray's client actors) and ``ray`` (Ray's own services: raylet, GCS, dashboard and log agents).
Shared by the fleet, scale-out and soak benchmarks, with the one way they write their results.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil

__all__ = ["ROLES", "role", "TreeSampler", "write_result"]

ROLES = ("server", "clients", "ray")


def role(process: psutil.Process, me: int) -> str:
    """The role of one process of the tree rooted at ``me``."""
    if process.pid == me:
        return "server"
    try:
        command = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "ray"
    return "clients" if "ClientAppActor" in command else "ray"


class TreeSampler:
    """RSS and open file descriptors of this process tree, by role, every ``interval`` seconds (a thread).

    ``samples``: every reading (time, and per role rss, fds, processes); ``peak``: the largest summed
    RSS seen, and ``peak_roles`` how it split by role at that moment.
    """

    def __init__(self, interval: float = 1.0):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self.peak, self.peak_roles = 0, {}

    def sample(self) -> dict:
        me = psutil.Process()
        totals = {name: {"rss": 0, "fds": 0, "processes": 0} for name in ROLES}
        for process in [me, *me.children(recursive=True)]:
            try:
                totals[role(process, me.pid)]["rss"] += process.memory_info().rss
                totals[role(process, me.pid)]["fds"] += process.num_fds()
                totals[role(process, me.pid)]["processes"] += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        reading = {"time": time.time(), **totals}
        total = sum(totals[name]["rss"] for name in ROLES)
        if total > self.peak:
            self.peak, self.peak_roles = total, {name: totals[name]["rss"] for name in ROLES}
        return reading

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.sample())

    def __enter__(self) -> TreeSampler:
        self.samples.append(self.sample())
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_result(path: Path, result: dict) -> None:
    """The benchmark's result as indented JSON (its directory made), and a line saying where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
