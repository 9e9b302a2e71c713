"""Checks a client's update before it may touch the global model.

Flower's strategies end the run on inconsistent replies; a fleet must instead drop the one bad
client and go on. So every reply is checked here first, against what the server sent: the same
layer names, shapes and dtypes, finite values, and a positive whole number of examples no larger
than the training set allows; a client's evaluation, when it sends one, holds both accuracies in
[0, 1] and a positive whole number of held-out examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from odl_fed.schema import Metric

__all__ = ["UpdateRejected", "check_update", "expected_layout"]


class UpdateRejected(ValueError):
    """A reply that cannot be aggregated; the message says which client and why."""


def expected_layout(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array the server sends, which each update must match."""
    return {name: (tuple(a.shape), np.dtype(a.dtype)) for name, a in arrays.items()}


def check_update(client: str, arrays: Mapping[str, np.ndarray] | None, metrics: Mapping | None,
                 expected: Mapping[str, tuple[tuple[int, ...], np.dtype]], *, weight_key: str = Metric.NUM_EXAMPLES,
                 max_examples: int | None = None) -> None:
    """Raise :class:`UpdateRejected` naming ``client`` unless the update can be averaged in.

    ``max_examples``: the most examples a client can have trained on (the whole training set
    times the local epochs); a larger count would let one reply outweigh the fleet.
    """
    if arrays is None:
        raise UpdateRejected(f"client {client}: no arrays in its reply")
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"client {client}: layers differ from the global model's "
                             f"(missing {missing}, unexpected {extra})")
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if tuple(array.shape) != shape:
            raise UpdateRejected(f"client {client}: {name} has shape {tuple(array.shape)}, expected {shape}")
        if np.dtype(array.dtype) != dtype:
            raise UpdateRejected(f"client {client}: {name} has dtype {array.dtype}, expected {dtype}")
        if not np.isfinite(array).all():
            raise UpdateRejected(f"client {client}: {name} holds NaN or infinite values")
    if metrics is None or weight_key not in metrics:
        raise UpdateRejected(f"client {client}: its metrics lack {weight_key!r}")
    count = metrics[weight_key]
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) \
            or count <= 0 or count != int(count):
        raise UpdateRejected(f"client {client}: {weight_key} must be a positive whole number, but got {count!r}")
    if max_examples is not None and count > max_examples:
        raise UpdateRejected(f"client {client}: {weight_key} is {int(count)}, more than the {max_examples} "
                             f"a client can train on (the training set times the local epochs)")
    _check_evaluation(client, metrics)


EVALUATION_METRICS = (Metric.EVAL_ACC_BEFORE, Metric.EVAL_ACC_AFTER, Metric.EVAL_EXAMPLES)


def _check_evaluation(client: str, metrics: Mapping) -> None:
    sent = [key for key in EVALUATION_METRICS if key in metrics]
    if not sent:
        return
    if len(sent) != len(EVALUATION_METRICS):
        raise UpdateRejected(f"client {client}: its evaluation has {sent} but not all of {list(EVALUATION_METRICS)}")
    for key in (Metric.EVAL_ACC_BEFORE, Metric.EVAL_ACC_AFTER):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UpdateRejected(f"client {client}: {key} must be an accuracy in [0, 1], but got {value!r}")
    count = metrics[Metric.EVAL_EXAMPLES]
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) \
            or count <= 0 or count != int(count):
        raise UpdateRejected(f"client {client}: {Metric.EVAL_EXAMPLES} must be a positive whole number, "
                             f"but got {count!r}")
