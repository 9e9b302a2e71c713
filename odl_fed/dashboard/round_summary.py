"""What a round of the round log says, in the terms a dashboard shows (pure: dicts in, numbers out).

The console view, the TensorBoard log and the report all summarise a round with
:func:`summarise_round`, so the three agree with each other and with the log: nothing is measured
twice, only counted and grouped here.

A client the server asked is, in a round: ``trained`` (status ``ok``: its update was aggregated),
``refused`` (its plan found no setting that fits its budget), ``failed`` (it trained but broke its
budget, errored, or its reply was rejected) or ``lost`` (no reply by the round's timeout). A round
with too few clients connected is ``skipped``: it asks no one.

Where clients evaluate (the job's ``evaluation``: clients or both), a round also says how the global
model it started from scored on their held-out parts (``client_before``) and how their fine-tuned
models scored there (``client_after``), overall and per device type, each a mean weighted by
held-out examples. Where the server does not evaluate, ``accuracy`` and ``loss`` are NaN.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import fmean

from odl_fed.schema import ClientEvalKey, ClientKey, GlobalKey, Metric, Outcome, RoundKey, RunKey, Status

__all__ = ["DeviceRound", "RoundSummary", "summarise_round", "summarise_rounds", "plan_text", "format_bytes",
           "FAILED_STATUSES"]

FAILED_STATUSES = Status.FAILED


@dataclass(frozen=True)
class DeviceRound:
    """One device type's clients in one round."""

    device: str
    asked: int
    trained: int
    plan: str  # the plan(s) its clients trained with; "" when none trained
    peak_ratio: tuple[float, float, float] | None  # min / mean / max of peak memory over budget
    peak_bytes: int  # the largest peak among its clients
    budget_bytes: int  # the smallest budget among its clients
    activation_bytes: int  # largest saved activation bytes of a step
    train_flops: float  # summed over its clients
    bytes_down: int
    bytes_up: int
    # its clients' evaluations (weighted by held-out examples); None where none evaluated
    eval_before: float | None = None
    eval_after: float | None = None
    eval_examples: int = 0

    @property
    def eval_gain(self) -> float | None:
        return None if self.eval_before is None or self.eval_after is None else self.eval_after - self.eval_before


@dataclass(frozen=True)
class RoundSummary:
    """One round of the log."""

    round: int
    accuracy: float
    loss: float
    accuracy_change: float | None  # against the previous round
    asked: int
    trained: int
    refused: int
    failed: int
    lost: int
    seconds: float  # since the previous round's line (round 0: the starting model's evaluation)
    bytes_down: int
    bytes_up: int
    whole_model_bytes: int  # what sending the whole model down to each asked client and back would cost
    activation_bytes: int
    train_flops: float
    devices: list[DeviceRound] = field(default_factory=list)
    reasons: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (status, reason) -> clients
    skipped: str = ""  # why the round asked no one, when it did not
    # the clients' evaluations (client-eval): the global model before their fine-tuning, theirs after it
    client_before: float | None = None
    client_after: float | None = None
    client_eval_examples: int = 0
    client_eval_clients: int = 0

    @property
    def server_evaluated(self) -> bool:
        return not math.isnan(self.accuracy)

    @property
    def client_gain(self) -> float | None:
        return None if self.client_before is None or self.client_after is None else \
            self.client_after - self.client_before

    @property
    def statuses(self) -> Counter:
        return Counter({Outcome.TRAINED: self.trained, Outcome.REFUSED: self.refused, Outcome.FAILED: self.failed,
                        Outcome.LOST: self.lost})


def format_bytes(value: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the device profiles write them)."""
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _rank_text(ranks) -> str:
    if ranks is None:
        return "exact"
    if isinstance(ranks, (list, tuple)):
        return "x".join(str(r) for r in ranks)
    return str(ranks)


def plan_text(plan: dict | None) -> str:
    """A plan in one short line: ``2 layers, batch 32, exact x2`` or ``... ranks 32x8x3x3, exact``."""
    if not plan:
        return ""
    ranks = [_rank_text(r) for r in (plan.get("ranks") or {}).values()]
    grouped = []
    for text in ranks:  # consecutive equal ranks collapse: "exact x2"
        if grouped and grouped[-1][0] == text:
            grouped[-1][1] += 1
        else:
            grouped.append([text, 1])
    rank_part = ", ".join(t if n == 1 else f"{t} x{n}" for t, n in grouped)
    text = f"{len(plan.get('layers') or ranks)} layers, batch {plan.get('batch_size')}"
    if rank_part:
        text += f", ranks {rank_part}"
    scale = plan.get("activation_scale")
    if isinstance(scale, (int, float)) and scale != 1.0:
        text += f", activation budget x{scale:g}"
    return text


def _number(value, default=0):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _device_round(device: str, clients: list[dict]) -> DeviceRound:
    trained = [c for c in clients if c.get(ClientKey.STATUS) == Status.OK]
    ratios = [c[Metric.PEAK_MEMORY] / c[Metric.MEMORY_BUDGET] for c in clients
              if _number(c.get(Metric.PEAK_MEMORY)) > 0 and _number(c.get(Metric.MEMORY_BUDGET)) > 0]
    plans = list(dict.fromkeys(plan_text(c.get(ClientKey.PLAN)) for c in trained if c.get(ClientKey.PLAN)))
    budgets = [_number(c.get(Metric.MEMORY_BUDGET)) for c in clients if _number(c.get(Metric.MEMORY_BUDGET)) > 0]
    scored = [c for c in trained if _number(c.get(Metric.EVAL_EXAMPLES)) > 0
              and _number(c.get(Metric.EVAL_ACC_BEFORE), None) is not None
              and _number(c.get(Metric.EVAL_ACC_AFTER), None) is not None]
    held_out = sum(c[Metric.EVAL_EXAMPLES] for c in scored)

    def weighted(key: str) -> float | None:
        return sum(c[key] * c[Metric.EVAL_EXAMPLES] for c in scored) / held_out if scored else None

    return DeviceRound(
        device=device, asked=len(clients), trained=len(trained), plan=" / ".join(plans),
        peak_ratio=(min(ratios), fmean(ratios), max(ratios)) if ratios else None,
        peak_bytes=int(max((_number(c.get(Metric.PEAK_MEMORY)) for c in clients), default=0)),
        budget_bytes=int(min(budgets, default=0)),
        activation_bytes=int(max((_number(c.get(Metric.ACTIVATION_BYTES)) for c in trained), default=0)),
        train_flops=float(sum(_number(c.get(Metric.TRAIN_FLOPS)) for c in trained)),
        bytes_down=int(sum(_number(c.get(ClientKey.BYTES_DOWN)) for c in clients)),
        bytes_up=int(sum(_number(c.get(ClientKey.BYTES_UP)) for c in trained)),
        eval_before=weighted(Metric.EVAL_ACC_BEFORE), eval_after=weighted(Metric.EVAL_ACC_AFTER),
        eval_examples=int(held_out))


def summarise_round(line: dict, *, previous: dict | None = None, run: dict | None = None) -> RoundSummary:
    """The summary of one round line (``previous``: the round line before it; ``run``: the run line)."""
    clients = [c for c in line.get(RoundKey.CLIENTS, []) if isinstance(c, dict)]
    statuses = Counter(str(c.get(ClientKey.STATUS)) for c in clients)
    by_device: dict[str, list[dict]] = defaultdict(list)
    for client in clients:
        by_device[str(client.get(ClientKey.DEVICE) or "unknown")].append(client)
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    for client in clients:
        if client.get(ClientKey.STATUS) != Status.OK:
            reasons[(str(client.get(ClientKey.STATUS)), str(client.get(ClientKey.REASON) or ""))].append(
                str(client.get(ClientKey.CLIENT)))
    asked = int(_number(line.get(RoundKey.CLIENTS_ASKED), len(clients)))
    accuracy = float(_number(line.get(RoundKey.GLOBAL, {}).get(GlobalKey.ACCURACY), float("nan")))
    before = previous.get(RoundKey.GLOBAL, {}).get(GlobalKey.ACCURACY) if previous else None
    evaluation = line.get(RoundKey.CLIENT_EVAL) or {}
    model_bytes = int(_number((run or {}).get(RunKey.MODEL_BYTES)))
    devices = [_device_round(name, members) for name, members in sorted(by_device.items())]
    return RoundSummary(
        round=int(line[RoundKey.ROUND]), accuracy=accuracy,
        loss=float(_number(line.get(RoundKey.GLOBAL, {}).get(GlobalKey.LOSS), float("nan"))),
        accuracy_change=accuracy - before if isinstance(before, (int, float)) and not math.isnan(accuracy) else None,
        asked=asked, trained=statuses[Status.OK], refused=statuses[Status.REFUSED],
        failed=sum(n for status, n in statuses.items() if status not in (Status.OK, Status.REFUSED, Status.LOST)),
        lost=statuses[Status.LOST] + max(asked - len(clients), 0),
        seconds=float(_number(line.get(RoundKey.ELAPSED))
                      - (_number(previous.get(RoundKey.ELAPSED)) if previous else 0.0)),
        bytes_down=int(_number(line.get(RoundKey.BYTES_DOWN))), bytes_up=int(_number(line.get(RoundKey.BYTES_UP))),
        whole_model_bytes=model_bytes * (asked + statuses[Status.OK]),
        activation_bytes=max((d.activation_bytes for d in devices), default=0),
        train_flops=sum(d.train_flops for d in devices), devices=devices, reasons=dict(reasons),
        skipped=str(line.get(RoundKey.SKIPPED) or ""),
        client_before=_number(evaluation.get(ClientEvalKey.ACCURACY_BEFORE), None),
        client_after=_number(evaluation.get(ClientEvalKey.ACCURACY_AFTER), None),
        client_eval_examples=int(_number(evaluation.get(ClientEvalKey.EXAMPLES))),
        client_eval_clients=int(_number(evaluation.get(ClientEvalKey.CLIENTS))))


def summarise_rounds(rounds: list[dict], run: dict | None = None) -> list[RoundSummary]:
    """Every round of a log, each against the one before it."""
    return [summarise_round(line, previous=rounds[i - 1] if i else None, run=run) for i, line in enumerate(rounds)]
