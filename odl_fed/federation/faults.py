"""Fault drills: a client that misbehaves on purpose, so an operator can see a fleet survive it.

A deployed client takes drills (``python -m odl_fed.client ... --fault KIND[:ARG][@ROUNDS]``,
several joined by ``+``: ``nan@2+slow:60@3``); they travel in the node config (``fault``) and the
ClientApp applies each to the rounds it names (all rounds without ``@``):

- ``nan`` / ``inf``: the reply's first trained tensor holds a NaN / an infinity;
- ``wrong-shape``: the first trained tensor has one row too many;
- ``wrong-name``: the first trained tensor is sent under another layer's name;
- ``absurd-examples``: the reply claims 10^12 training examples;
- ``slow:SECONDS``: the reply waits SECONDS first (a straggler past the round's timeout);
- ``crash``: the ClientApp raises (an error reply);
- ``squeeze:FRACTION``: after planning, the memory guard gets only FRACTION of the device's
  train-memory (another app took the rest mid-round): a real breach, read with psutil;
- ``signal:N``: the ClientApp's process dies by signal N before it trains (4: the illegal instruction a
  Raspberry Pi 4 meets in a torch built for a newer core; 9: the kernel's OOM kill), with no core file.

The server must reject every bad reply before aggregation and close every round on time; these
are the drills the fault tests and the fault table of docs/operations.md run. Pure Python and torch: the
ClientApp turns records into tensors and back.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from odl_fed.schema import Metric

log = logging.getLogger("flwr.odl_fed")

__all__ = ["FAULTS", "FaultDrill", "FaultDrills", "FaultError", "parse_fault", "node_fault", "drill_hook", "NoDrills",
           "FAULT_KEY", "ABSURD_EXAMPLES"]

FAULTS = ("nan", "inf", "wrong-shape", "wrong-name", "absurd-examples", "slow", "crash", "squeeze", "signal")
NEEDS_ARGUMENT = {"slow": "seconds", "squeeze": "a fraction in (0, 1]", "signal": "a signal number, e.g. 4"}
ABSURD_EXAMPLES = 10**12
_SYNTAX = re.compile(r"^(?P<kind>[a-z-]+)(:(?P<arg>[0-9.]+))?(@(?P<rounds>\d+(,\d+)*))?$")


class FaultError(ValueError):
    """A fault drill this project does not know."""


class DrilledCrash(RuntimeError):
    """The ``crash`` drill: the ClientApp fails on purpose."""


@dataclass(frozen=True)
class FaultDrill:
    kind: str
    argument: float | None = None
    rounds: frozenset[int] | None = None  # None: every round

    def active(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def __str__(self) -> str:
        text = self.kind + ("" if self.argument is None else f":{self.argument:g}")
        return text + ("" if self.rounds is None else "@" + ",".join(str(r) for r in sorted(self.rounds)))

    def budget_scale(self, server_round: int) -> float:
        """What the guard keeps of the train-memory this round (``squeeze``), else 1."""
        return self.argument if self.kind == "squeeze" and self.active(server_round) else 1.0

    def delay(self, server_round: int) -> float:
        return self.argument if self.kind == "slow" and self.active(server_round) else 0.0

    def before_round(self, server_round: int) -> None:
        """``signal``: this process dies by the signal now (no core file left behind)."""
        if self.kind == "signal" and self.active(server_round):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            log.warning("fault drill %s: this ClientApp dies by signal %d in round %d", self, int(self.argument),
                        server_round)
            os.kill(os.getpid(), int(self.argument))

    def damage(self, arrays: dict[str, Tensor], metrics: dict, server_round: int) -> None:
        """Apply a reply drill to the trained layers and metrics about to be sent (in place)."""
        if not self.active(server_round):
            return
        if self.kind == "crash":
            raise DrilledCrash(f"fault drill {self}: the client fails on purpose in round {server_round}")
        if not arrays and self.kind in ("nan", "inf", "wrong-shape", "wrong-name"):
            return
        first = next(iter(arrays), None)
        if self.kind in ("nan", "inf"):
            arrays[first] = arrays[first].clone()
            arrays[first].view(-1)[0] = float(self.kind)
        elif self.kind == "wrong-shape":
            arrays[first] = arrays[first].new_zeros((arrays[first].shape[0] + 1, *arrays[first].shape[1:]))
        elif self.kind == "wrong-name":
            arrays[f"{first}.renamed"] = arrays.pop(first)
        elif self.kind == "absurd-examples":
            metrics[Metric.NUM_EXAMPLES] = ABSURD_EXAMPLES


@dataclass(frozen=True)
class FaultDrills:
    """A client's drills, each for its own rounds."""

    drills: tuple[FaultDrill, ...]

    def __str__(self) -> str:
        return "+".join(str(d) for d in self.drills)

    def active(self, server_round: int) -> list[FaultDrill]:
        return [d for d in self.drills if d.active(server_round)]

    def budget_scale(self, server_round: int) -> float:
        return min((d.budget_scale(server_round) for d in self.drills), default=1.0)

    def delay(self, server_round: int) -> float:
        return sum(d.delay(server_round) for d in self.drills)

    def before_round(self, server_round: int) -> None:
        for drill in self.drills:
            drill.before_round(server_round)

    def damage(self, arrays: dict[str, Tensor], metrics: dict, server_round: int) -> None:
        for drill in self.drills:
            drill.damage(arrays, metrics, server_round)

    def after_round(self, client: str, arrays: dict[str, Tensor] | None, metrics: dict, server_round: int) -> None:
        """The round's reply as these drills change it: damaged, and held back for their delay."""
        active = self.active(server_round)
        if not active:
            return
        log.warning("%s: fault drill %s in round %d", client, "+".join(map(str, active)), server_round)
        self.damage(arrays if arrays is not None else {}, metrics, server_round)
        time.sleep(self.delay(server_round))


class NoDrills:
    """A node with no drills: its rounds go as they went (the hook every real node gets)."""

    def budget_scale(self, server_round: int) -> float:
        return 1.0

    def before_round(self, server_round: int) -> None:
        return None

    def after_round(self, client: str, arrays: dict[str, Tensor] | None, metrics: dict, server_round: int) -> None:
        return None


def drill_hook(node_config: Mapping) -> FaultDrills | NoDrills:
    """The one hook the ClientApp calls each round: before training (``budget_scale``) and on its reply
    (``after_round``); a node config with no ``fault`` gets :class:`NoDrills`."""
    return node_fault(node_config) or NoDrills()


def _parse_one(text: str, what: str) -> FaultDrill:
    match = _SYNTAX.match(text.strip())
    if match is None or match["kind"] not in FAULTS:
        raise FaultError(f"{what} must be KIND[:ARG][@ROUNDS] (several joined by +) with KIND one of "
                         f"{', '.join(FAULTS)} (e.g. nan@2, slow:30, squeeze:0.3), but got {text!r}")
    kind, arg = match["kind"], match["arg"]
    if (kind in NEEDS_ARGUMENT) != (arg is not None):
        need = NEEDS_ARGUMENT.get(kind)
        raise FaultError(f"{what} {text!r}: {kind} " + (f"needs :ARG ({need})" if need else "takes no :ARG"))
    argument = None if arg is None else float(arg)
    if kind == "squeeze" and not 0 < argument <= 1:
        raise FaultError(f"{what} {text!r}: squeeze needs a fraction in (0, 1]")
    if kind == "signal" and (argument != int(argument) or int(argument) not in signal.valid_signals()):
        raise FaultError(f"{what} {text!r}: signal needs a signal number (4 for SIGILL, 9 for SIGKILL)")
    rounds = None if match["rounds"] is None else frozenset(int(r) for r in match["rounds"].split(","))
    return FaultDrill(kind, argument, rounds)


def parse_fault(text: str | None, *, what: str = "--fault") -> FaultDrills | None:
    """``"nan@2"``, ``"slow:30"``, ``"nan@2+squeeze:0.3@3"`` -> drills; ``""``/None -> None."""
    if not text:
        return None
    return FaultDrills(tuple(_parse_one(part, what) for part in str(text).split("+")))


def node_fault(node_config: Mapping) -> FaultDrills | None:
    """The drills a node config carries (``fault``), if any."""
    return parse_fault(node_config.get(FAULT_KEY), what=f"node config {FAULT_KEY}")


FAULT_KEY = "fault"
