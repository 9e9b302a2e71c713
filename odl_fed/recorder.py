"""One record of a federated run: JSON lines, one per round, that the dashboard reads.

The file holds, in order:

- ``{"event": "run", ...}``: the fleet, the job and the strategy;
- ``{"event": "round", "round": r, ...}`` for r = 0 (the starting model, evaluated) to the last:
  the global accuracy and loss, what was sent and received, and one entry per client that was
  asked to train: its device, status (``ok``, ``refused``, ``memory-exceeded``, ``rejected``,
  ``error``), budget, plan, activation bytes, peak memory, FLOPs, bytes up/down, time, loss,
  examples, the number of ``attempts`` and their ``attempt-log`` (a breach retreats and trains
  again within the round), and the reason when it was not aggregated;
- ``{"event": "end", ...}``: wall time and the final accuracy.

Each line is flushed when written, so a run that stops midway keeps every finished round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["RoundRecorder", "read_rounds"]


class RoundRecorder:
    """Collects client entries during a round and writes the round's line when it is evaluated."""

    def __init__(self, path: str | Path, *, on_round: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w")
        self._clients: dict[int, list[dict]] = {}
        self._traffic: dict[int, dict[str, int]] = {}
        self._started = time.time()
        self.on_round = on_round
        self.rounds: list[dict] = []

    def _write(self, line: dict) -> None:
        self._file.write(json.dumps(line, default=_jsonable) + "\n")
        self._file.flush()

    def start_run(self, **info) -> None:
        self._write({"event": "run", "time": self._started, **info})

    def sent(self, server_round: int, nodes: int, nbytes: int, record_bytes: int | None = None) -> None:
        """The server sent ``nbytes`` of parameters (``record_bytes`` with Flower's headers) to each of ``nodes``."""
        self._traffic[server_round] = {"clients-asked": nodes, "bytes-down": nodes * nbytes,
                                       "record-bytes-down": nodes * (record_bytes or nbytes)}

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
        self._write(line)
        self.rounds.append(line)
        if self.on_round is not None:
            self.on_round(line)
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
