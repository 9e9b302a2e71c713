"""Flower strategies that check every reply first and record every client, whatever happened to it.

A reply reaches Flower's aggregation only when its client trained (``status`` ``ok``) and its
update passes :func:`~odl_fed.federation.validation.check_update`; it is then reduced to the arrays and the
fixed set of metrics every valid reply has, so one odd reply can never end the run with Flower's
``InconsistentMessageReplies``. Everything else (a refused plan, a breached memory budget, a NaN,
a wrong shape, a missing count, a client that crashed) is logged with the client's name and
recorded, and the round aggregates the rest.

The valid replies are aggregated in the order of their clients' names, not in the order they
arrived, so the same updates always give the same global model to the bit (float sums depend on
their order). A resumed run (:mod:`odl_fed.federation.checkpoint`) sets ``round_offset`` to the rounds done:
Flower's ``start`` counts its rounds from 1, the strategy and the clients see the run's own numbers
(FedAdam's bias correction depends on them), and :func:`strategy_state` / :func:`load_strategy_state`
carry FedAdam's moments across.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from odl_fed.config import names
from odl_fed.config.job import JobSpec
from odl_fed.config.names import check_registry
from odl_fed.federation.recorder import RoundRecorder
from odl_fed.federation.validation import UpdateRejected, check_update
from odl_fed.schema import ClientKey, Metric, Record, Status

__all__ = ["make_strategy", "parameter_bytes", "strategy_state", "load_strategy_state", "STRATEGY_CLASSES",
           "AGGREGATED_METRICS", "STATE_ATTRIBUTES", "log"]

# A child of Flower's logger: printed by its handler, in its format, beside its own lines.
log = logging.getLogger("flwr.odl_fed")

STRATEGY_CLASSES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}
check_registry("strategy", names.STRATEGIES, STRATEGY_CLASSES)
# What every valid reply carries, and all that is averaged across clients.
AGGREGATED_METRICS = (Metric.NUM_EXAMPLES, Metric.TRAIN_LOSS, Metric.TRAIN_TIME, Metric.ACTIVATION_BYTES,
                      Metric.PEAK_MEMORY, Metric.TRAIN_FLOPS)
# What a strategy carries from round to round (Flower's FedOpt family: first and second moments);
# ``current_arrays`` is not among them: ``configure_train`` sets it from the arrays it sends.
STATE_ATTRIBUTES = ("m_t", "v_t")


class ValidatedUpdates:
    """Mixin before a Flower strategy: validate, record, then aggregate only the valid replies.

    Who is asked: a round waits (up to ``node_wait`` s) until the clients it wants are connected
    (round 1: the whole fleet, as it starts up; later: ``clients-per-round``), then samples among
    those connected; with fewer than
    ``min_clients`` it is skipped (logged, recorded) and the run goes on. A client asked that does
    not answer by the round's timeout is recorded as ``lost``, by name when it answered before.
    """

    def __init__(self, *args, recorder: RoundRecorder, expected: dict, min_clients: int = 1,
                 node_wait: float = 60.0, max_examples: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.expected = expected
        self.min_clients = min_clients
        self.node_wait = node_wait
        self.max_examples = max_examples
        self._bytes_down = 0
        self._asked: set[int] = set()
        self._instructions: list[Message] = []
        self._names: dict[int, str] = {}  # node id -> client name, from its greeting and its replies
        self._devices: dict[int, str] = {}  # node id -> device, from its greeting
        self.instruction: dict = {}  # what every train instruction carries besides Flower's keys (the job)
        # called with (grid, node ids) before their instructions go out; returns {node: (client, device)}
        # (odl_fed.federation.backbone.NodeGreeter.greet: the nodes' names, and the backbone they lack)
        self.before_train = None
        self.round_offset = 0  # rounds done before this process started (a resumed run)

    def _connected(self, grid: Grid, wanted: int) -> list[int]:
        deadline = time.monotonic() + self.node_wait
        while len(nodes := list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(1)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._bytes_down = parameter_bytes(arrays)
        fleet = self.min_available_nodes  # every client of the fleet
        # the first round (of a run, or of a resumed run) waits for the whole fleet to start up; later
        # rounds for the clients they sample
        first = server_round == self.round_offset + 1
        connected = len(self._connected(grid, fleet if first else max(self.min_train_nodes, self.min_clients)))
        if connected < self.min_clients:
            reason = (f"{connected} client(s) connected, the job needs at least {self.min_clients} "
                      f"(min-clients; waited {self.node_wait:.0f} s)")
            log.warning("round %d skipped: %s; the global model is unchanged", server_round, reason)
            self.recorder.skipped(server_round, reason)
            self._asked, self._instructions = set(), []
            self.recorder.sent(server_round, 0, self._bytes_down, arrays.count_bytes())
            return []
        # Flower samples among the connected clients and would wait for the whole fleet: ask it for
        # what is connected now (its fraction of them, at least what the job wants when it can).
        wanted_nodes = self.min_train_nodes
        self.min_available_nodes, self.min_train_nodes = connected, min(wanted_nodes, connected)
        for key, value in self.instruction.items():
            config[key] = value
        try:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        finally:
            self.min_available_nodes, self.min_train_nodes = fleet, wanted_nodes
        if self.before_train is not None:
            for node, (client, device) in self.before_train(grid, [m.metadata.dst_node_id for m in messages]).items():
                self._names.setdefault(node, client)
                self._devices[node] = device
        self._asked = {m.metadata.dst_node_id for m in messages}
        self._instructions = messages  # the grid gives each its message id as it sends it
        self.recorder.sent(server_round, len(messages), self._bytes_down, arrays.count_bytes())
        return messages

    def _device(self, node: int) -> dict:
        """The node's device, as its greeting said (nothing when it never answered one)."""
        return {ClientKey.DEVICE: self._devices[node]} if node in self._devices else {}

    def _node(self, message: Message) -> int:
        """The node a reply is about: the SuperLink answers for a node it lost (src = the SuperLink)."""
        if message.metadata.src_node_id in self._asked:
            return message.metadata.src_node_id
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._instructions}
        return sent_to.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        valid = []
        replies = list(replies)
        for message in replies:
            entry = self._inspect(message, self._node(message))
            self.recorder.client(server_round, entry)
            if entry[ClientKey.STATUS] == Status.OK:
                valid.append((entry[ClientKey.CLIENT], message))
            else:
                log.warning("round %d: %s (%s) not aggregated: %s: %s", server_round, entry[ClientKey.CLIENT],
                            entry.get(ClientKey.DEVICE, "?"), entry[ClientKey.STATUS], entry.get(ClientKey.REASON, ""))
        for node in sorted(self._asked - {self._node(m) for m in replies}):
            name = self._names.get(node, f"node-{node}")
            self.recorder.client(server_round, {ClientKey.CLIENT: name, ClientKey.NODE: node,
                                                **self._device(node),
                                                ClientKey.STATUS: Status.LOST, ClientKey.BYTES_DOWN: self._bytes_down,
                                                ClientKey.REASON: "no reply within the round's timeout"})
            log.warning("round %d: %s lost: no reply within the round's timeout", server_round, name)
        if not valid:
            log.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, [m for _, m in sorted(valid, key=lambda v: v[0])])
        for message in replies:  # aggregated: Flower keeps the replies until the next round's arrive, not their updates
            if not message.has_error():
                message.content = RecordDict()
        return (None if arrays is None else _as_sent(arrays, self.expected)), metrics

    def _inspect(self, message: Message, node: int) -> dict:
        """The client's entry for the record; a valid message's content is reduced to what aggregation needs."""
        if message.has_error():
            return {ClientKey.CLIENT: self._names.get(node, f"node-{node}"), ClientKey.NODE: node,
                    **self._device(node), ClientKey.STATUS: Status.ERROR, ClientKey.REASON: message.error.reason,
                    ClientKey.BYTES_DOWN: self._bytes_down}
        content = message.content
        info = dict(content.config_records.get(Record.CLIENT, ConfigRecord()))
        client = str(info.get(ClientKey.CLIENT, f"node-{node}"))
        self._names[node] = client
        metrics_record = content.metric_records.get(Record.METRICS)
        metrics = dict(metrics_record) if metrics_record is not None else {}
        entry = {ClientKey.CLIENT: client, ClientKey.NODE: node, ClientKey.DEVICE: info.get(ClientKey.DEVICE),
                 ClientKey.STATUS: info.get(ClientKey.STATUS, Status.OK), ClientKey.BYTES_DOWN: self._bytes_down,
                 **metrics}
        for key in (ClientKey.PLAN, ClientKey.ATTEMPT_LOG):
            if key in info:
                try:
                    entry[key] = json.loads(str(info[key]))
                except json.JSONDecodeError:
                    entry[key] = None
        if entry[ClientKey.STATUS] != Status.OK:
            entry[ClientKey.REASON] = str(info.get(ClientKey.ERROR, ""))
            return entry
        arrays = content.array_records.get(Record.ARRAYS)
        try:
            if set(content.array_records) - {Record.ARRAYS} or set(content.metric_records) - {Record.METRICS}:
                raise UpdateRejected(f"client {client}: unexpected records "
                                     f"{sorted(set(content.array_records) | set(content.metric_records))}")
            check_update(client, None if arrays is None else _numpy(arrays), metrics, self.expected,
                         max_examples=self.max_examples)
            lacking = [k for k in AGGREGATED_METRICS if not isinstance(metrics.get(k), (int, float))]
            if lacking:
                raise UpdateRejected(f"client {client}: its metrics lack {lacking}")
        except UpdateRejected as error:
            return entry | {ClientKey.STATUS: Status.REJECTED, ClientKey.REASON: str(error)}
        entry[ClientKey.BYTES_UP] = parameter_bytes(arrays)
        entry[ClientKey.RECORD_BYTES_UP] = arrays.count_bytes()
        message.content = RecordDict({Record.ARRAYS: arrays,
                                      Record.METRICS: MetricRecord({k: metrics[k] for k in AGGREGATED_METRICS})})
        return entry


def parameter_bytes(arrays: ArrayRecord) -> int:
    """The arrays' data bytes (what the trained layers weigh); Flower's ``count_bytes`` adds headers."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())


def _as_sent(arrays: ArrayRecord, expected: dict) -> ArrayRecord:
    """The aggregate in the dtypes the server sent: FedAdam computes in float64 (NumPy's promotion),
    which would double the bytes every client downloads and change the dtype they are checked against."""
    if all(np.dtype(a.dtype) == expected[name][1] for name, a in arrays.items() if name in expected):
        return arrays
    return ArrayRecord({name: Array(a.numpy().astype(expected[name][1]) if name in expected else a.numpy())
                        for name, a in arrays.items()})


def _numpy(arrays: ArrayRecord) -> dict:
    return {name: array.numpy() for name, array in arrays.items()}


def strategy_state(strategy) -> dict[str, dict[str, np.ndarray]]:
    """The state a strategy carries between rounds (:data:`STATE_ATTRIBUTES` it has and has set)."""
    return {name: {k: np.array(v) for k, v in getattr(strategy, name).items()}
            for name in STATE_ATTRIBUTES if getattr(strategy, name, None)}


def load_strategy_state(strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put back what :func:`strategy_state` took; a state the strategy has no place for is an error."""
    for name, arrays in state.items():
        if name not in STATE_ATTRIBUTES or not hasattr(strategy, name):
            raise ValueError(f"{type(strategy).__name__} keeps no {name!r}; the saved state has {sorted(state)}")
        setattr(strategy, name, {k: np.array(v) for k, v in arrays.items()})


def make_strategy(job: JobSpec, *, num_clients: int, recorder: RoundRecorder, expected: dict,
                  node_wait: float = 60.0, max_examples: int | None = None):
    """The job's strategy (FedAvg, FedProx or FedAdam), weighted by examples, validating every reply.

    ``clients-per-round`` of the ``num_clients`` nodes train each round; no Flower evaluate round is
    configured: the server evaluates the global model itself, and clients that evaluate do so inside
    their train reply (before and after their fine-tuning: no extra message per round).
    """
    base = STRATEGY_CLASSES[job.strategy]
    kwargs = dict(fraction_train=job.clients_per_round / num_clients, fraction_evaluate=0.0,
                  min_train_nodes=job.clients_per_round, min_available_nodes=num_clients,
                  weighted_by_key=Metric.NUM_EXAMPLES)
    if job.strategy == "fedprox":
        kwargs["proximal_mu"] = job.proximal_mu
    if job.strategy == "fedadam":
        kwargs["eta"] = job.server_lr
    cls = type(f"Validated{base.__name__}", (ValidatedUpdates, base), {})
    return cls(recorder=recorder, expected=expected, min_clients=job.min_clients, node_wait=node_wait,
               max_examples=max_examples, **kwargs)
