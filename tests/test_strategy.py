"""Every reply is checked before aggregation; bad ones are logged and recorded, the rest aggregate."""

import json
import logging
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from odl_fed.config.job import JobSpec
from odl_fed.federation.recorder import RoundRecorder, read_rounds
from odl_fed.federation.strategy import AGGREGATED_METRICS, make_strategy
from odl_fed.federation.validation import UpdateRejected, check_update, expected_layout

GLOBAL = {"layer.weight": np.zeros((4, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}
EXPECTED = expected_layout(GLOBAL)


def _job(strategy="fedavg", **extra) -> JobSpec:
    return JobSpec(model="resnet18", layers=2, method="asi", rounds=1, clients_per_round=4, local_epochs=1,
                   batch_size=8, lr=1e-3, image_size=32, dataset="digits", dirichlet_alpha=None, seed=0,
                   strategy=strategy, **extra)


def _metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="i",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")


def _reply(node: int, *, value: float = 1.0, examples=10, arrays=None, status="ok", drop_metric=None,
           extra_records=None, loss: float = 1000.0) -> Message:
    arrays = {k: np.full_like(v, value) for k, v in GLOBAL.items()} if arrays is None else arrays
    metrics = {k: loss for k in AGGREGATED_METRICS} | {"num-examples": examples, "planned-activation-bytes": 99}
    if drop_metric:
        metrics.pop(drop_metric)
    content = RecordDict({"client": ConfigRecord({"client": f"rpi4-{node}", "device": "rpi4", "status": status,
                                                  "error": "" if status == "ok" else "why not",
                                                  "plan": json.dumps({"batch_size": 8})}),
                          "metrics": MetricRecord(metrics)})
    if status == "ok":
        content["arrays"] = _record(arrays)
    for key, record in (extra_records or {}).items():
        content[key] = record
    return Message(content=content, metadata=_metadata(node))


def _record(arrays: dict) -> ArrayRecord:
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = Array(array)
    return record


@pytest.mark.parametrize("arrays, metrics, match", [
    ({"layer.weight": np.full((4, 3), np.nan, np.float32), "fc.bias": np.zeros(2, np.float32)},
     {"num-examples": 5}, "layer.weight holds NaN"),
    ({"layer.weight": np.zeros((3, 4), np.float32), "fc.bias": np.zeros(2, np.float32)},
     {"num-examples": 5}, r"layer.weight has shape \(3, 4\), expected \(4, 3\)"),
    ({"layer.weight": np.zeros((4, 3), np.float64), "fc.bias": np.zeros(2, np.float32)},
     {"num-examples": 5}, "dtype float64"),
    ({"layer.weight": np.zeros((4, 3), np.float32)}, {"num-examples": 5}, r"missing \['fc.bias'\]"),
    ({**GLOBAL, "extra": np.zeros(1, np.float32)}, {"num-examples": 5}, r"unexpected \['extra'\]"),
    (GLOBAL, {}, "lack 'num-examples'"),
    (GLOBAL, {"num-examples": 0}, "positive whole number"),
    (GLOBAL, {"num-examples": 2.5}, "positive whole number"),
    (GLOBAL, {"num-examples": float("nan")}, "positive whole number"),
    (None, {"num-examples": 5}, "no arrays"),
    (GLOBAL, {"num-examples": 5, "eval-acc-before": 1.5, "eval-acc-after": 0.5, "eval-examples": 8},
     r"eval-acc-before must be an accuracy in \[0, 1\], but got 1.5"),
    (GLOBAL, {"num-examples": 5, "eval-acc-before": 0.5, "eval-acc-after": float("nan"), "eval-examples": 8},
     "eval-acc-after must be an accuracy"),
    (GLOBAL, {"num-examples": 5, "eval-acc-before": 0.5, "eval-acc-after": 0.5, "eval-examples": 0},
     "eval-examples must be a positive whole number"),
    (GLOBAL, {"num-examples": 5, "eval-acc-before": 0.5}, "its evaluation has"),
])
def test_malformed_updates_are_rejected_naming_the_client(arrays, metrics, match):
    with pytest.raises(UpdateRejected, match=f"client phone-3: .*{match}"):
        check_update("phone-3", arrays, metrics, EXPECTED)


def test_an_absurd_example_count_is_rejected_before_it_can_outweigh_the_fleet():
    with pytest.raises(UpdateRejected, match="client phone-3: num-examples is 1000000000000, more than the 600"):
        check_update("phone-3", GLOBAL, {"num-examples": 10**12}, EXPECTED, max_examples=600)
    check_update("phone-3", GLOBAL, {"num-examples": 600}, EXPECTED, max_examples=600)


def test_a_good_update_passes():
    check_update("rpi4-0", {k: v + 1 for k, v in GLOBAL.items()}, {"num-examples": 12}, EXPECTED)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_bad_replies_are_recorded_and_the_round_aggregates_the_rest(tmp_path, caplog, name):
    recorder = RoundRecorder(tmp_path / "rounds.jsonl")
    strategy = make_strategy(_job(name), num_clients=8, recorder=recorder, expected=EXPECTED)
    assert type(strategy).__name__ == (
        f"Validated{ {'fedavg': 'FedAvg', 'fedprox': 'FedProx', 'fedadam': 'FedAdam'}[name]}")
    if name == "fedadam":  # FedOpt keeps the arrays it sent; configure_train sets them
        strategy.current_arrays = {k: v.copy() for k, v in GLOBAL.items()}
    nan = {"layer.weight": np.full((4, 3), np.nan, np.float32), "fc.bias": np.zeros(2, np.float32)}
    replies = [
        _reply(1, value=1.0, examples=10, loss=1.0),
        _reply(2, value=4.0, examples=30, loss=3.0),
        _reply(3, arrays=nan),
        _reply(4, arrays={"layer.weight": np.zeros((2, 2), np.float32), "fc.bias": np.zeros(2, np.float32)}),
        _reply(5, drop_metric="num-examples"),
        _reply(6, status="refused"),
        _reply(7, extra_records={"more": MetricRecord({"x": 1})}),
        Message(Error(code=3, reason="client crashed: out of memory"), metadata=_metadata(8)),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr.odl_fed"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # the aggregate goes down in the dtype the server sent (FedAdam computes in float64)
    assert {name: arrays[name].dtype for name in GLOBAL} == {name: "float32" for name in GLOBAL}
    if name in ("fedavg", "fedprox"):  # weighted by examples: (1*10 + 4*30) / 40
        np.testing.assert_allclose(arrays["layer.weight"].numpy(), np.full((4, 3), 3.25, np.float32))
    # only the valid replies' metrics are averaged, by examples (the bad ones carry a loss of 1000)
    assert metrics["train-loss"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)
    recorder.end_round(1, {"accuracy": 0.5})
    (line,) = read_rounds(recorder.path)
    status = {c["client"]: c["status"] for c in line["clients"]}
    assert status == {"rpi4-1": "ok", "rpi4-2": "ok", "rpi4-3": "rejected", "rpi4-4": "rejected",
                      "rpi4-5": "rejected", "rpi4-6": "refused", "rpi4-7": "rejected", "node-8": "error"}
    assert line["aggregated"] == 2 and line["failed"] == 6
    reasons = {c["client"]: c.get("reason", "") for c in line["clients"]}
    assert "NaN" in reasons["rpi4-3"] and "shape" in reasons["rpi4-4"] and "num-examples" in reasons["rpi4-5"]
    assert reasons["rpi4-6"] == "why not" and "out of memory" in reasons["node-8"]
    assert line["bytes-up"] == 2 * (12 + 2) * 4
    for client in ("rpi4-3", "rpi4-4", "rpi4-5", "rpi4-6", "node-8"):
        assert any(client in r.getMessage() for r in caplog.records), client


def test_no_valid_reply_leaves_the_global_model_unchanged(tmp_path):
    recorder = RoundRecorder(tmp_path / "rounds.jsonl")
    strategy = make_strategy(_job(), num_clients=2, recorder=recorder, expected=EXPECTED)
    assert strategy.aggregate_train(1, [_reply(1, status="memory-exceeded")]) == (None, None)
