"""The Flower ClientApp: a device's side of a round, as messages.

Which device a node is: its node config's ``device`` (and the profile's fields, which
``python -m odl_fed.client`` puts there) when it has one, else the fleet's device for its
``partition-id`` (simulation, where the node config holds only the partition); see
:mod:`odl_fed.config.node`. The work itself is
:func:`odl_fed.federation.client_round.run_client_round`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from odl_fed.config.machine import cgroup_memory_limit, cgroup_memory_usage, fit_to_memory_limit
from odl_fed.config.node import NodeConfigError, node_profile, partition
from odl_fed.config.profile import DeviceProfile
from odl_fed.config.run import RunSettings
from odl_fed.federation.client_round import PlanCache, run_client_round
from odl_fed.federation.faults import drill_hook
from odl_fed.federation.job_assets import client_data, client_model
from odl_fed.schema import (
    ROUND_NOTES_FILE_ENV,
    RUN_END_FILE_ENV,
    WARM_HINT_FILE_ENV,
    ClientKey,
    ConfigKey,
    EndNotice,
    LauncherKey,
    Metric,
    Record,
    WarmHint,
    names,
)

__all__ = ["app", "handle_train", "handle_end", "node_identity", "warm_client", "BASES_KEY"]

app = ClientApp()
BASES_KEY = "asi-bases"  # where a node keeps its ASI bases between rounds (context.state)
log = logging.getLogger("flwr.odl_fed")


@functools.lru_cache(maxsize=4)
def _plan_cache(directory: str | None) -> PlanCache:
    return PlanCache(directory)


def node_identity(settings: RunSettings, node_config: Mapping) -> tuple[str, DeviceProfile, int, int]:
    """The client's name, device profile, partition id and number of partitions.

    A deployed node's config carries its device (and the profile's fields); a simulated node's only
    its partition, whose device the fleet says (:mod:`odl_fed.config.node`).
    """
    fleet = settings.fleet()
    partition_id, num_partitions = partition(node_config, default_partitions=fleet.num_clients)
    profile = node_profile(node_config, devices_file=settings.devices_file)
    if profile is None:
        profiles = fleet.client_profiles()
        if not 0 <= partition_id < len(profiles):
            raise NodeConfigError(f"partition-id {partition_id} is outside the fleet {fleet.path} "
                                  f"({len(profiles)} clients), and the node config names no device")
        profile = profiles[partition_id]
    profile, note = fit_to_memory_limit(profile, limit=cgroup_memory_limit()[0], usage=cgroup_memory_usage())
    if note:
        log.warning(note)
    return f"{profile.name}-{partition_id}", profile, partition_id, num_partitions


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context, context.run_config)


@app.query("end")
def end(msg: Message, context: Context) -> Message:
    return handle_end(msg, context)


# What the client entry prints of a round (odl_fed.deploy.supernode), taken from the round's metrics.
NOTED_METRICS = (Metric.NUM_EXAMPLES, Metric.TRAIN_TIME, Metric.CLIENT_TIME, Metric.PEAK_MEMORY, Metric.MEMORY_BUDGET,
                 Metric.BATCH_SIZE, Metric.LAYERS_TRAINED, Metric.TRAIN_LOSS)


def _note_round(server_round: int, outcome) -> None:
    """One JSON line for the client entry (``ODL_FED_ROUND_NOTES_FILE``), when it asked for them."""
    path = os.environ.get(ROUND_NOTES_FILE_ENV)
    if not path:
        return
    note = {"round": server_round, ClientKey.STATUS: outcome.status, ClientKey.ERROR: outcome.error,
            **{key: outcome.metrics[key] for key in NOTED_METRICS if key in outcome.metrics}}
    with open(path, "a", encoding="utf-8") as notes:
        notes.write(json.dumps(note) + "\n")


def _write_warm_hint(run_config: Mapping, node_config: Mapping) -> None:
    """The job and node of this message, for a warm launcher (``ODL_FED_WARM_HINT_FILE``), when one asked."""
    path = os.environ.get(WARM_HINT_FILE_ENV)
    if not path:
        return
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps({WarmHint.RUN_CONFIG: dict(run_config), WarmHint.NODE_CONFIG: dict(node_config)},
                                  sort_keys=True))
    partial.replace(path)


def warm_client(hint: Mapping) -> dict[str, float]:
    """Build what a node's rounds share, ahead of its next message: the client's share of the data and the
    job's model (cached in this process, :mod:`odl_fed.federation.job_assets`). A long-lived launcher calls
    this with what :func:`handle_train` noted (:data:`~odl_fed.schema.WARM_HINT_FILE_ENV`); its forked
    ClientApps then find both built. Returns the seconds each took."""
    settings = RunSettings.from_config(hint[WarmHint.RUN_CONFIG])
    _, _, partition_id, num_partitions = node_identity(settings, hint[WarmHint.NODE_CONFIG])
    job = settings.fleet().job
    started = time.perf_counter()
    data = client_data(job, partition_id, num_partitions)
    loaded = time.perf_counter()
    client_model(job, num_classes=data.num_classes)
    _plan_cache(None if settings.plan_cache is None else str(settings.plan_cache))
    return {LauncherKey.DATA_S: loaded - started, LauncherKey.MODEL_S: time.perf_counter() - loaded}


def handle_end(msg: Message, context: Context) -> Message:
    """The server's end notice: written to the file the client entry named (``ODL_FED_RUN_END_FILE``), so
    it exits 0 once the SuperLink goes; in simulation, where no entry waits, nothing is written."""
    path = os.environ.get(RUN_END_FILE_ENV)
    if path:
        notice = msg.content.config_records.get(Record.CONFIG, ConfigRecord())
        partial = Path(f"{path}.partial")
        partial.write_text(json.dumps({key: notice.get(key) for key in names(EndNotice)}))
        partial.replace(path)  # whole or not at all: the entry polls for it
    return Message(content=RecordDict(), reply_to=msg)


def handle_train(msg: Message, context: Context, run_config: Mapping) -> Message:
    """Train on this node's data and reply with the trained layers, or with why it could not.

    The node keeps its ASI bases in ``context.state`` (``asi-bases``), so its next round starts warm.
    """
    settings = RunSettings.from_config(run_config)
    client, profile, partition_id, num_partitions = node_identity(settings, context.node_config)
    _write_warm_hint(run_config, context.node_config)
    job = settings.fleet().job
    config = msg.content.config_records.get(Record.CONFIG, ConfigRecord())
    server_round = int(config.get(ConfigKey.SERVER_ROUND, 0))
    drills = drill_hook(context.node_config)  # fault drills (python -m odl_fed.client --fault); none on a real node
    kept = context.state.array_records.get(BASES_KEY)
    outcome = run_client_round(
        job, profile, msg.content[Record.ARRAYS].to_torch_state_dict(), client=client,
        data=client_data(job, partition_id, num_partitions),
        cache=_plan_cache(None if settings.plan_cache is None else str(settings.plan_cache)),
        proximal_mu=float(config.get(ConfigKey.PROXIMAL_MU, 0.0)), server_round=server_round,
        bases=None if kept is None else kept.to_torch_state_dict(), deadline=settings.round_timeout,
        budget_scale=drills.budget_scale(server_round))
    drills.after_round(client, outcome.arrays, outcome.metrics, server_round)
    _note_round(server_round, outcome)
    if outcome.bases:
        context.state[BASES_KEY] = ArrayRecord(torch_state_dict=outcome.bases)
    content = RecordDict({
        Record.CLIENT: ConfigRecord({ClientKey.CLIENT: outcome.client, ClientKey.DEVICE: outcome.device,
                                     ClientKey.STATUS: outcome.status, ClientKey.ERROR: outcome.error,
                                     ClientKey.PLAN: json.dumps(outcome.plan),
                                     ClientKey.ATTEMPT_LOG: json.dumps(outcome.attempts)}),
        Record.METRICS: MetricRecord(outcome.metrics),
    })
    if outcome.arrays is not None:
        content[Record.ARRAYS] = ArrayRecord(torch_state_dict=outcome.arrays)
    return Message(content=content, reply_to=msg)
