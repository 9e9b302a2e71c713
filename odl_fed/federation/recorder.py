"""One record of a federated run: JSON lines, one per round, that the dashboard reads.

The file holds, in order:

- ``{"event": "run", ...}``: the fleet, the job and the strategy;
- ``{"event": "round", "round": r, ...}`` for r = 0 (the starting model, evaluated) to the last:
  the global accuracy and loss, what was sent and received, and one entry per client that was
  asked to train: its device, status (``ok``, ``refused``, ``memory-exceeded``, ``rejected``,
  ``error``), budget, plan, activation bytes, peak memory, FLOPs, bytes up/down, time, loss,
  examples, the number of ``attempts`` and their ``attempt-log`` (a breach retreats and trains
  again within the round), and the reason when it was not aggregated (status ``lost``: asked, no
  reply by the round's timeout); ``skipped`` says why a round asked no one; when clients evaluate,
  each aggregated client's top-1 on its held-out part before and after its fine-tuning, and
  ``client-eval``: their means weighted by held-out examples, and the gain; ``global`` is empty
  when the server does not evaluate;
- ``{"event": "end", ...}``: wall time and the final accuracy.

A resumed run (:mod:`odl_fed.federation.checkpoint`) adds ``{"event": "resume", "from-round": k}`` after
round k, its last checkpointed round, and goes on with round k + 1: a round that was logged but not
checkpointed before the server stopped is dropped (and run again), so every round is there once.
``elapsed`` goes on from the last checkpointed round's: the time the server was down is left out.

Each line is flushed when written, so a run that stops midway keeps every finished round.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from odl_fed.schema import (
    EVENT,
    ClientEvalKey,
    ClientKey,
    EndKey,
    Event,
    Metric,
    ResumeKey,
    RoundKey,
    RunKey,
    Status,
    to_json_value,
)

__all__ = ["RoundRecorder", "read_rounds", "cut_back", "client_evaluation"]

log = logging.getLogger("flwr.odl_fed")


class RoundRecorder:
    """Collects client entries during a round and writes the round's line when it is evaluated.

    Each line written is also handed to every one of ``listeners`` (the console view, the
    TensorBoard log): a listener that fails is logged and dropped, never the run.
    """

    def __init__(self, path: str | Path, *, listeners: Sequence[Callable[[dict], None]] = (),
                 resume: tuple[dict, Sequence[dict]] | None = None):
        """A new round log at ``path``, or, with ``resume=(run line, round lines 0..k)`` from a
        checkpoint, the log of that run cut back to round k, to go on with round k + 1."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clients: dict[int, list[dict]] = {}
        self._traffic: dict[int, dict[str, int]] = {}
        self._skipped: dict[int, str] = {}
        self._started = time.time()
        self.listeners = list(listeners)
        self.rounds: list[dict] = []
        self.run_line: dict = {}
        if resume is None:
            self._file = self.path.open("w")
        else:
            self.run_line, rounds = resume[0], list(resume[1])
            self.rounds = rounds
            self._started -= float(rounds[-1].get(RoundKey.ELAPSED, 0.0))  # the time the server was down is left out
            cut_back(self.path, self.run_line, rounds)
            for line in (self.run_line, *rounds):  # the views start with what the log already holds
                self._tell(json.loads(json.dumps(line, default=to_json_value)))
            self._file = self.path.open("a")
            self._write({EVENT: Event.RESUME, ResumeKey.TIME: time.time(),
                         ResumeKey.FROM_ROUND: rounds[-1][RoundKey.ROUND]})

    def _write(self, line: dict) -> None:
        text = json.dumps(line, default=to_json_value)
        self._file.write(text + "\n")
        self._file.flush()
        self._tell(json.loads(text))  # listeners see what the file holds, as a reader of it would

    def _tell(self, event: dict) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as error:  # a view must never stop the run
                log.warning("%s failed on a %s line and is dropped: %s: %s", type(listener).__name__,
                            event.get(EVENT), type(error).__name__, error)
                self.listeners.remove(listener)

    def start_run(self, **info) -> None:
        self.run_line = {EVENT: Event.RUN, RunKey.TIME: self._started, **info}
        self._write(self.run_line)

    def sent(self, server_round: int, nodes: int, nbytes: int, record_bytes: int | None = None) -> None:
        """The server sent ``nbytes`` of parameters (``record_bytes`` with Flower's headers) to each of ``nodes``."""
        self._traffic[server_round] = {RoundKey.CLIENTS_ASKED: nodes, RoundKey.BYTES_DOWN: nodes * nbytes,
                                       RoundKey.RECORD_BYTES_DOWN: nodes * (record_bytes or nbytes)}

    def skipped(self, server_round: int, reason: str) -> None:
        """The round trains no one (too few clients connected); its line says why."""
        self._skipped[server_round] = reason

    def client(self, server_round: int, entry: dict) -> None:
        self._clients.setdefault(server_round, []).append(entry)

    def end_round(self, server_round: int, global_metrics: dict) -> dict:
        clients = self._clients.pop(server_round, [])
        aggregated = [c for c in clients if c.get(ClientKey.STATUS) == Status.OK]
        line = {
            EVENT: Event.ROUND,
            RoundKey.ROUND: server_round,
            RoundKey.TIME: time.time(),
            RoundKey.ELAPSED: time.time() - self._started,
            RoundKey.GLOBAL: global_metrics,
            **self._traffic.pop(server_round, {RoundKey.CLIENTS_ASKED: 0, RoundKey.BYTES_DOWN: 0,
                                               RoundKey.RECORD_BYTES_DOWN: 0}),
            RoundKey.BYTES_UP: sum(c.get(ClientKey.BYTES_UP, 0) for c in aggregated),
            RoundKey.RECORD_BYTES_UP: sum(c.get(ClientKey.RECORD_BYTES_UP, 0) for c in aggregated),
            RoundKey.AGGREGATED: len(aggregated),
            RoundKey.FAILED: len(clients) - len(aggregated),
            RoundKey.CLIENTS: sorted(clients, key=lambda c: str(c.get(ClientKey.CLIENT))),
        }
        if server_round in self._skipped:
            line[RoundKey.SKIPPED] = self._skipped.pop(server_round)
        evaluation = client_evaluation(aggregated)
        if evaluation is not None:
            line[RoundKey.CLIENT_EVAL] = evaluation
        self._write(line)
        self.rounds.append(line)
        return line

    def end_run(self, **info) -> None:
        self._write({EVENT: Event.END, EndKey.TIME: time.time(), EndKey.ELAPSED: time.time() - self._started, **info})
        self._file.close()


def client_evaluation(clients: Sequence[dict]) -> dict | None:
    """The clients' evaluations of a round (``client-eval``): accuracy before and after their
    fine-tuning, each a mean weighted by held-out examples, and the gain; None when none evaluated."""
    scored = [c for c in clients if all(isinstance(c.get(k), (int, float)) for k in
                                        (Metric.EVAL_ACC_BEFORE, Metric.EVAL_ACC_AFTER, Metric.EVAL_EXAMPLES))]
    examples = sum(c[Metric.EVAL_EXAMPLES] for c in scored)
    if not scored or examples <= 0:
        return None
    before = sum(c[Metric.EVAL_ACC_BEFORE] * c[Metric.EVAL_EXAMPLES] for c in scored) / examples
    after = sum(c[Metric.EVAL_ACC_AFTER] * c[Metric.EVAL_EXAMPLES] for c in scored) / examples
    return {ClientEvalKey.ACCURACY_BEFORE: before, ClientEvalKey.ACCURACY_AFTER: after,
            ClientEvalKey.GAIN: after - before, ClientEvalKey.EXAMPLES: int(examples),
            ClientEvalKey.CLIENTS: len(scored)}


def cut_back(path: Path, run_line: dict, rounds: Sequence[dict]) -> None:
    """Rewrite the log at ``path`` (atomically) to end with ``rounds``' last round: a partial last line and
    rounds logged after it go; the run line and the rounds come from the checkpoint when the log lacks them."""
    last = rounds[-1][RoundKey.ROUND]
    kept, seen = [], set()
    for text in (path.read_text().splitlines() if path.exists() else []):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            break  # the line the server was writing when it stopped
        if line.get(EVENT) == Event.ROUND:
            if line.get(RoundKey.ROUND) in seen or line.get(RoundKey.ROUND, last + 1) > last:
                continue
            seen.add(line[RoundKey.ROUND])
        elif line.get(EVENT) == Event.END:
            continue
        kept.append(line)
    if seen != set(range(last + 1)) or not kept or kept[0].get(EVENT) != Event.RUN:
        others = [line for line in kept if line.get(EVENT) not in (Event.RUN, Event.ROUND)]
        kept = [dict(run_line), *rounds, *others]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as file:
        file.writelines(json.dumps(line, default=to_json_value) + "\n" for line in kept)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def read_rounds(path: str | Path) -> list[dict]:
    """The round lines of a run's record (what a dashboard plots)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get(EVENT) == Event.ROUND]
