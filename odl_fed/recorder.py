"""One record of a federated run: JSON lines, one per round, that the dashboard reads.

The file holds, in order:

- ``{"event": "run", ...}``: the fleet, the job and the strategy;
- ``{"event": "round", "round": r, ...}`` for r = 0 (the starting model, evaluated) to the last:
  the global accuracy and loss, what was sent and received, and one entry per client that was
  asked to train: its device, status (``ok``, ``refused``, ``memory-exceeded``, ``rejected``,
  ``error``), budget, plan, activation bytes, peak memory, FLOPs, bytes up/down, time, loss,
  examples, the number of ``attempts`` and their ``attempt-log`` (a breach retreats and trains
  again within the round), and the reason when it was not aggregated (status ``lost``: asked, no
  reply by the round's timeout); ``skipped`` says why a round asked no one;
- ``{"event": "end", ...}``: wall time and the final accuracy.

Each line is flushed when written, so a run that stops midway keeps every finished round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["RoundRecorder", "read_rounds"]

log = logging.getLogger("flwr.odl_fed")


class RoundRecorder:
    """Collects client entries during a round and writes the round's line when it is evaluated.

    Each line written is also handed to every one of ``listeners`` (the console view, the
    TensorBoard log): a listener that fails is logged and dropped, never the run.
    """

    def __init__(self, path: str | Path, *, listeners: Sequence[Callable[[dict], None]] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w")
        self._clients: dict[int, list[dict]] = {}
        self._traffic: dict[int, dict[str, int]] = {}
        self._skipped: dict[int, str] = {}
        self._started = time.time()
        self.listeners = list(listeners)
        self.rounds: list[dict] = []

    def _write(self, line: dict) -> None:
        text = json.dumps(line, default=_jsonable)
        self._file.write(text + "\n")
        self._file.flush()
        event = json.loads(text)  # listeners see what the file holds, as a reader of it would
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as error:  # a view must never stop the run
                log.warning("%s failed on a %s line and is dropped: %s: %s", type(listener).__name__,
                            event.get("event"), type(error).__name__, error)
                self.listeners.remove(listener)

    def start_run(self, **info) -> None:
        self._write({"event": "run", "time": self._started, **info})

    def sent(self, server_round: int, nodes: int, nbytes: int, record_bytes: int | None = None) -> None:
        """The server sent ``nbytes`` of parameters (``record_bytes`` with Flower's headers) to each of ``nodes``."""
        self._traffic[server_round] = {"clients-asked": nodes, "bytes-down": nodes * nbytes,
                                       "record-bytes-down": nodes * (record_bytes or nbytes)}

    def skipped(self, server_round: int, reason: str) -> None:
        """The round trains no one (too few clients connected); its line says why."""
        self._skipped[server_round] = reason

    def client(self, server_round: int, entry: dict) -> None:
        self._clients.setdefault(server_round, []).append(entry)

    def end_round(self, server_round: int, global_metrics: dict) -> dict:
        clients = self._clients.pop(server_round, [])
        aggregated = [c for c in clients if c.get("status") == "ok"]
        line = {
            "event": "round",
            "round": server_round,
            "time": time.time(),
            "elapsed": time.time() - self._started,
            "global": global_metrics,
            **self._traffic.pop(server_round, {"clients-asked": 0, "bytes-down": 0, "record-bytes-down": 0}),
            "bytes-up": sum(c.get("bytes-up", 0) for c in aggregated),
            "record-bytes-up": sum(c.get("record-bytes-up", 0) for c in aggregated),
            "aggregated": len(aggregated),
            "failed": len(clients) - len(aggregated),
            "clients": sorted(clients, key=lambda c: str(c.get("client"))),
        }
        if server_round in self._skipped:
            line["skipped"] = self._skipped.pop(server_round)
        self._write(line)
        self.rounds.append(line)
        return line

    def end_run(self, **info) -> None:
        self._write({"event": "end", "time": time.time(), "elapsed": time.time() - self._started, **info})
        self._file.close()


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def read_rounds(path: str | Path) -> list[dict]:
    """The round lines of a run's record (what a dashboard plots)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "round"]
