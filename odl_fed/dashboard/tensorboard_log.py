"""TensorBoard event files of a run, written as its rounds land: ``tensorboard --logdir runs/``.

Fed the round log's events (like the console view), it writes at step = round number:

- ``global/accuracy``, ``global/loss`` (where the server evaluates); ``round/seconds``;
- where clients evaluate: ``clients-eval/accuracy-before``, ``clients-eval/accuracy-after``,
  ``clients-eval/gain`` (weighted by held-out examples), and per device type D
  ``clients-eval/accuracy-before/D``, ``clients-eval/accuracy-after/D``, ``clients-eval/gain/D``;
- ``clients/trained``, ``clients/refused``, ``clients/failed``, ``clients/lost``;
- ``traffic/bytes-down``, ``traffic/bytes-up``, ``traffic/whole-model-bytes``;
- per device type D: ``memory/peak-over-budget-max/D``, ``memory/peak-over-budget-mean/D``,
  ``memory/peak-bytes/D``, ``activations/bytes/D``, ``flops/train/D``;
- text: ``run/fleet`` (the fleet and job as given), ``plan/D`` (the plan D trained with),
  ``failures`` (who did not count, and why).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from odl_fed import schema
from odl_fed.dashboard.round_summary import summarise_round
from odl_fed.schema import EVENT, Event, RunKey

__all__ = ["TensorBoardLog", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = schema.TENSORBOARD_DIR  # under the run directory
log = logging.getLogger("flwr.odl_fed")


class TensorBoardLog:
    """Writes a run's events to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.run: dict = {}
        self._previous: dict | None = None
        self._writer = None
        self._unavailable = False

    def _open(self):
        if self._writer is None and not self._unavailable:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # the server extra brings tensorboard
                self._unavailable = True
                log.warning("no TensorBoard event files: %s (pip install tensorboard)", error)
                return None
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def __call__(self, event: dict) -> None:
        kind = event.get(EVENT)
        if kind == Event.RUN:
            self.run, self._previous = event, None
            writer = self._open()
            if writer is not None:
                given = {k: event.get(k) for k in (RunKey.FLEET, RunKey.CLIENTS, RunKey.DEVICES, RunKey.TRAINED_CONVS,
                                                   RunKey.JOB)}
                writer.add_text("run/fleet", "```\n" + json.dumps(given, indent=2, default=str) + "\n```", 0)
                writer.flush()
        elif kind == Event.ROUND:
            writer = self._open()
            if writer is not None:
                self._round(writer, event)
            self._previous = event
        elif kind == Event.END:
            self.close()

    def _round(self, writer, line: dict) -> None:
        s = summarise_round(line, previous=self._previous, run=self.run)
        step = s.round
        scalars = {"global/accuracy": s.accuracy, "global/loss": s.loss} if s.server_evaluated else {}
        scalars |= {"round/seconds": s.seconds, "clients/trained": s.trained, "clients/refused": s.refused,
                    "clients/failed": s.failed, "clients/lost": s.lost, "traffic/bytes-down": s.bytes_down,
                    "traffic/bytes-up": s.bytes_up, "traffic/whole-model-bytes": s.whole_model_bytes}
        if s.client_gain is not None:
            scalars |= {"clients-eval/accuracy-before": s.client_before, "clients-eval/accuracy-after": s.client_after,
                        "clients-eval/gain": s.client_gain}
        for device in s.devices:
            if device.eval_gain is not None:
                scalars[f"clients-eval/accuracy-before/{device.device}"] = device.eval_before
                scalars[f"clients-eval/accuracy-after/{device.device}"] = device.eval_after
                scalars[f"clients-eval/gain/{device.device}"] = device.eval_gain
            if device.peak_ratio:
                scalars[f"memory/peak-over-budget-max/{device.device}"] = device.peak_ratio[2]
                scalars[f"memory/peak-over-budget-mean/{device.device}"] = device.peak_ratio[1]
                scalars[f"memory/peak-bytes/{device.device}"] = device.peak_bytes
            if device.trained:
                scalars[f"activations/bytes/{device.device}"] = device.activation_bytes
                scalars[f"flops/train/{device.device}"] = device.train_flops
                writer.add_text(f"plan/{device.device}", device.plan, step)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        if s.skipped:
            writer.add_text("failures", f"round skipped: {s.skipped}", step)
        if s.reasons:
            writer.add_text("failures", "\n".join(f"- {status} ({', '.join(clients)}): {reason}"
                                                  for (status, reason), clients in sorted(s.reasons.items())), step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
