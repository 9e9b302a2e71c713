"""A board needs nothing from the server's disk: the job travels with each instruction, and the backbone
file reaches a node that lacks it once, checked by its hash and kept in the node's cache.

The server is the real ``run_server`` (strategy, recorder, :class:`~odl_fed.federation.backbone.BackboneSender`);
each message goes to the real ClientApp handlers of its node in this process (as a SuperLink would deliver
it). Once the server has started, its fleet file and backbone file are moved away, so a node that read
either from the server's paths would fail.
"""

import contextlib
import hashlib
import logging
import shutil

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from odl_fed.config.node import build_node_config
from odl_fed.config.profile import get_profile
from odl_fed.federation.backbone import BackboneError, backbone_answer, keep_backbone, local_backbone
from odl_fed.federation.client_app import handle_end, handle_join, handle_train
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.server_app import run_server
from odl_fed.schema import (
    END_QUERY,
    JOIN_QUERY,
    ROUND_LOG,
    WEIGHTS_ARRAY,
    WEIGHTS_CACHE_ENV,
    WEIGHTS_ERROR,
    WEIGHTS_HAVE,
    WEIGHTS_RECORD,
    ClientKey,
    ConfigKey,
    Record,
)
from odl_fed.training.models import build_model, save_checkpoint

JOB = {"model": "mobilenet_v2", "layers": 1, "method": "asi", "rounds": 1, "clients-per-round": 2,
       "local-epochs": 1, "batch-size": 16, "lr": 0.01, "image-size": 32, "dataset": "digits", "partition": "iid",
       "seed": 0, "examples-per-client": 32, "eval-examples": 64}
DEVICES = ("rpi4", "phone")


class BoardGrid:
    """Two boards in this process, deployed-style (their node config names their device and partitions).
    At the first message the server sends, ``hide`` moves its fleet and backbone files away."""

    def __init__(self, run_config: dict, hide):
        self.run_config, self.hide, self.hidden = run_config, hide, False
        self.contexts = {101 + i: Context(run_id=1, node_id=101 + i, state=RecordDict(), run_config=run_config,
                                          node_config=build_node_config(get_profile(d), partition_id=i,
                                                                        num_partitions=len(DEVICES)))
                         for i, d in enumerate(DEVICES)}
        self.weights_messages: list[tuple[int, bool]] = []  # (node, with the file's bytes)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        if not self.hidden:
            self.hide()
            self.hidden = True
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if kind == END_QUERY:
                replies.append(handle_end(message, self.contexts[node]))
            elif kind == JOIN_QUERY:
                self.weights_messages.append((node, WEIGHTS_RECORD in message.content.array_records))
                replies.append(handle_join(message, self.contexts[node], self.run_config))
            else:
                replies.append(handle_train(message, self.contexts[node], self.run_config))
        for reply, message in zip(replies, messages, strict=True):  # as the SuperLink stamps them
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return replies


@contextlib.contextmanager
def _as_superlink():
    """What Flower's ServerApp runtime sets before the app runs (its messages carry the run and node)."""
    before = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def _serve(root, name: str, backbone_bytes: bytes, messages: list[str]):
    server = root / name
    server.mkdir()
    weights = server / "backbone.pt"
    weights.write_bytes(backbone_bytes)
    fleet = server / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": d, "count": 1} for d in DEVICES],
                                     "job": JOB | {"weights": str(weights)}}))
    config = {"fleet": str(fleet), "out-dir": str(server / "out"), "plan-cache": "", "round-timeout": 60}
    away = root / f"{name}-away"

    def hide():  # the server has read both; a node that reads them from here fails
        away.mkdir()
        shutil.move(weights, away / weights.name)
        shutil.move(fleet, away / fleet.name)

    grid = BoardGrid(config, hide)
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("flwr.odl_fed")
    logger.addHandler(handler)
    try:
        with _as_superlink():
            run_server(grid, config)
    finally:
        logger.removeHandler(handler)
    assert grid.hidden and not fleet.exists() and not weights.exists()
    return grid, read_rounds(server / "out" / ROUND_LOG)


@pytest.fixture()
def backbone_bytes(tmp_path):
    path = save_checkpoint(build_model("mobilenet_v2", num_classes=10), "mobilenet_v2", tmp_path / "made.pt")
    return path.read_bytes()


def test_a_board_trains_with_no_fleet_file_and_gets_the_backbone_once(tmp_path, monkeypatch, backbone_bytes):
    cache = tmp_path / "board-cache"
    monkeypatch.setenv(WEIGHTS_CACHE_ENV, str(cache))
    sha256 = hashlib.sha256(backbone_bytes).hexdigest()
    said: list[str] = []
    grid, rounds = _serve(tmp_path, "first", backbone_bytes, said)
    trained = {c[ClientKey.CLIENT]: c for c in rounds[-1]["clients"]}
    assert {c["status"] for c in trained.values()} == {"ok"}, trained
    # asked once each, then sent the file once each; kept under its hash
    assert sorted(grid.weights_messages) == [(101, False), (101, True), (102, False), (102, True)]
    assert (cache / "backbones" / f"{sha256}.pt").read_bytes() == backbone_bytes
    assert any(f"sent to 2 ({2 * len(backbone_bytes)} bytes" in line for line in said), said

    # the next run (the same file, elsewhere on the server): the boards hold it, nothing is sent
    said.clear()
    grid, rounds = _serve(tmp_path, "second", backbone_bytes, said)
    assert sorted(grid.weights_messages) == [(101, False), (102, False)]
    assert {c["status"] for c in rounds[-1]["clients"]} == {"ok"}
    assert any("2 node(s) held it, sent to 0 (0 bytes" in line for line in said), said


def test_a_backbone_that_does_not_match_its_hash_is_not_kept(tmp_path, monkeypatch, backbone_bytes):
    monkeypatch.setenv(WEIGHTS_CACHE_ENV, str(tmp_path / "cache"))
    sha256 = hashlib.sha256(backbone_bytes).hexdigest()
    for damaged in (backbone_bytes[:-100], backbone_bytes[:-1] + b"x"):  # cut short; changed on the way
        with pytest.raises(BackboneError, match=f"does not match its hash \\(expected sha256 {sha256}"):
            keep_backbone(damaged, sha256)
        with _as_superlink():
            message = Message(RecordDict({
                Record.CONFIG: ConfigRecord({ConfigKey.WEIGHTS_SHA256: sha256, ConfigKey.WEIGHTS_PATH: "/nowhere.pt"}),
                WEIGHTS_RECORD: ArrayRecord({WEIGHTS_ARRAY: Array(np.frombuffer(damaged, dtype=np.uint8))})}),
                dst_node_id=101, message_type=JOIN_QUERY)
            answer = backbone_answer(message.content)
        assert answer[WEIGHTS_HAVE] is False and "does not match its hash" in answer[WEIGHTS_ERROR]
    assert not any((tmp_path / "cache").rglob("*.pt"))
    # a file at the job's own path with other bytes is not taken for the backbone either
    own = tmp_path / "backbone.pt"
    own.write_bytes(backbone_bytes[:-1] + b"x")
    assert local_backbone(str(own), sha256) is None
    own.write_bytes(backbone_bytes)
    assert local_backbone(str(own), sha256) == own
