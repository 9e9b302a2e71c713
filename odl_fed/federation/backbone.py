"""A node joins the run: the server greets it once, learns who it is, and sends it the backbone it lacks.

A board needs nothing from the server's disk. The job travels with every instruction
(:data:`~odl_fed.schema.ConfigKey.JOB`); a job's ``weights`` names a file on the server. Before a node's
first round the server greets it (``query.join``): the node answers with its client name and device (so a
node whose ClientApp dies later is still named in the round log) and whether it holds a file with the
backbone's SHA-256; a node that does not gets the file's bytes in a second message, checks their hash and
keeps them in its cache (``ODL_FED_CACHE_DIR``, default ``~/.cache/odl-fed``, as
``backbones/<sha256>.pt``), so the next run sends nothing. A node that finds the file at the job's own path
with the same hash (a simulation, or a board that copied it) uses that.

- :class:`NodeGreeter`: the server's side (reads the file once; remembers the nodes it greeted).
- :func:`local_backbone`, :func:`keep_backbone`: the ClientApp's side
  (:func:`odl_fed.federation.client_app.handle_join`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from odl_fed.schema import (
    JOIN_QUERY,
    WEIGHTS_ARRAY,
    WEIGHTS_CACHE_ENV,
    WEIGHTS_ERROR,
    WEIGHTS_HAVE,
    WEIGHTS_RECORD,
    ClientKey,
    ConfigKey,
    Record,
)

__all__ = ["BackboneError", "NodeGreeter", "file_sha256", "cache_dir", "local_backbone", "keep_backbone",
           "backbone_answer"]

log = logging.getLogger("flwr.odl_fed")


class BackboneError(RuntimeError):
    """A backbone a node does not hold, or bytes that do not match their hash; names the file or hash."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where a board keeps the backbones it was sent (``ODL_FED_CACHE_DIR``, default ``~/.cache/odl-fed``)."""
    return Path(os.environ.get(WEIGHTS_CACHE_ENV) or Path.home() / ".cache" / "odl-fed") / "backbones"


def local_backbone(weights: str | None, sha256: str | None) -> Path | None:
    """The file to load the job's backbone from on this node: the job's own path when it holds the same
    bytes, else the cached copy; None when this node has neither (or the job names no hash)."""
    if weights is None or not sha256:
        return None
    own = Path(weights)
    if own.is_file() and file_sha256(own) == sha256:
        return own
    cached = cache_dir() / f"{sha256}.pt"
    return cached if cached.is_file() else None


def keep_backbone(data: bytes, sha256: str) -> Path:
    """Check ``data`` against ``sha256`` and keep it in the cache (written aside, then renamed)."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise BackboneError(f"the backbone sent by the server does not match its hash (expected sha256 {sha256}, "
                            f"got {got}: {len(data)} bytes, cut short or changed on the way); not kept")
    target = cache_dir() / f"{sha256}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def backbone_answer(content: RecordDict) -> dict:
    """A node's answer about the backbone to the server's greeting (``content``): keeps the bytes it was
    sent (checked), then says whether it holds the file (WEIGHTS_HAVE), or why not (WEIGHTS_ERROR)."""
    config = content.config_records.get(Record.CONFIG, ConfigRecord())
    sha256 = str(config.get(ConfigKey.WEIGHTS_SHA256, ""))
    if not sha256:
        return {WEIGHTS_HAVE: True}  # the job has no backbone file
    try:
        if WEIGHTS_RECORD in content.array_records:
            keep_backbone(content.array_records[WEIGHTS_RECORD][WEIGHTS_ARRAY].numpy().tobytes(), sha256)
        return {WEIGHTS_HAVE: local_backbone(str(config.get(ConfigKey.WEIGHTS_PATH, "")) or None, sha256) is not None}
    except (BackboneError, OSError) as error:
        return {WEIGHTS_HAVE: False, WEIGHTS_ERROR: str(error)}


class NodeGreeter:
    """The server's side of a node joining: greets each node once (its name and device come back), and sends
    the job's backbone file (read once) to each node that lacks it."""

    def __init__(self, weights: str | None, *, num_clients: int | None = None):
        self.num_clients = num_clients  # a node config without num-partitions needs it to name itself
        self.path = None if weights is None else Path(weights)
        self.data = None if self.path is None else self.path.read_bytes()
        self.sha256 = None if self.data is None else hashlib.sha256(self.data).hexdigest()
        self.greeted: dict[int, tuple[str, str]] = {}  # node id -> (client, device)
        self.sent_bytes = 0

    def config(self) -> dict:
        """What every train instruction carries about the backbone."""
        return {} if self.sha256 is None else {ConfigKey.WEIGHTS_SHA256: self.sha256}

    def _send(self, grid: Grid, nodes: Iterable[int], *, with_file: bool, timeout: float) -> dict[int, ConfigRecord]:
        config = ConfigRecord(({} if self.num_clients is None else {ConfigKey.NUM_CLIENTS: self.num_clients}) |
                              ({} if self.sha256 is None else {ConfigKey.WEIGHTS_SHA256: self.sha256,
                                                               ConfigKey.WEIGHTS_PATH: str(self.path)}))
        messages = []
        for node in nodes:
            content = RecordDict({Record.CONFIG: config})
            if with_file:
                content[WEIGHTS_RECORD] = ArrayRecord({WEIGHTS_ARRAY: Array(np.frombuffer(self.data, dtype=np.uint8))})
            messages.append(Message(content, dst_node_id=node, message_type=JOIN_QUERY))
        answers = {}
        for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
            if not reply.has_error():
                answers[reply.metadata.src_node_id] = reply.content.config_records.get(Record.CONFIG, ConfigRecord())
        return answers

    def greet(self, grid: Grid, nodes: Iterable[int], *, timeout: float) -> dict[int, tuple[str, str]]:
        """Greet the nodes not greeted yet; send the backbone to those that lack it. Returns every greeted
        node's (client, device). A node that does not answer is greeted again before its next round."""
        new = [node for node in nodes if node not in self.greeted]
        if not new:
            return self.greeted
        answers = self._send(grid, new, with_file=False, timeout=timeout)
        for node, answer in answers.items():
            self.greeted[node] = (str(answer.get(ClientKey.CLIENT, f"node-{node}")),
                                  str(answer.get(ClientKey.DEVICE, "unknown")))
        lacking = [node for node, answer in answers.items() if not answer.get(WEIGHTS_HAVE, True)]
        if lacking:
            sent = self._send(grid, lacking, with_file=True, timeout=timeout)
            self.sent_bytes += len(self.data) * len(lacking)
            for node in lacking:
                answer = sent.get(node)
                if answer is None or not answer.get(WEIGHTS_HAVE):
                    log.warning("%s did not keep the backbone %s: %s", self.greeted[node][0], self.path,
                                "no answer" if answer is None else answer.get(WEIGHTS_ERROR, "no reason given"))
        if self.sha256 is not None:
            log.info("backbone %s (sha256 %s...): %d node(s) held it, sent to %d (%d bytes so far this run)",
                     self.path, self.sha256[:12], len(answers) - len(lacking), len(lacking), self.sent_bytes)
        return self.greeted
