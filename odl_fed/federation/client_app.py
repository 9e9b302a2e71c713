"""The Flower ClientApp: a device's side of a round, as messages.

Which device a node is: its node config's ``device`` (and the profile's fields, which
``python -m odl_fed.client`` puts there) when it has one, else the fleet's device for its
``partition-id`` (simulation, where the node config holds only the partition); see
:mod:`odl_fed.config.node`. What it trains on: its share of a named dataset, or, for ``dataset: local``,
its own images (the node config's ``data-dir``, from ``--data DIR``); a board whose images cannot train
refuses the round, saying why, and the others go on. The work itself is
:func:`odl_fed.federation.client_round.run_client_round`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from odl_fed.config.job import JobSpec, parse_job
from odl_fed.config.machine import cgroup_memory_limit, cgroup_memory_usage, fit_to_memory_limit
from odl_fed.config.names import LOCAL_DATASET
from odl_fed.config.node import NodeConfigError, data_dir, node_profile, partition
from odl_fed.config.profile import DeviceProfile
from odl_fed.config.run import RunSettings
from odl_fed.federation.backbone import BackboneError, backbone_answer, cache_dir, local_backbone
from odl_fed.federation.client_round import REFUSED, ClientOutcome, PlanCache, run_client_round
from odl_fed.federation.faults import drill_hook
from odl_fed.federation.job_assets import (
    board_data,
    client_data,
    client_held_out,
    client_model,
    output_classes,
    split_held_out,
)
from odl_fed.schema import (
    IN_HAND_FILE_ENV,
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
from odl_fed.training.data import ImageData
from odl_fed.training.local_data import LocalDataError

__all__ = ["app", "handle_train", "handle_end", "handle_join", "node_identity", "instructed_job", "round_data",
           "warm_client", "BASES_KEY"]

handled: list[str] = []  # the message types this process handled, in order (a warm launcher's record reads it)


def _note_message_type(msg: Message, context: Context, call_next):
    """A mod around every handler: notes the message's type in ``handled`` before handling it."""
    handled.append(msg.metadata.message_type)
    return call_next(msg, context)


app = ClientApp(mods=[_note_message_type])
BASES_KEY = "asi-bases"  # where a node keeps its ASI bases between rounds (context.state)
log = logging.getLogger("flwr.odl_fed")


@functools.lru_cache(maxsize=4)
def _plan_cache(directory: str | None) -> PlanCache:
    return PlanCache(directory)


def node_identity(settings: RunSettings, node_config: Mapping, *,
                  num_clients: int | None = None) -> tuple[str, DeviceProfile, int, int]:
    """The client's name, device profile, partition id and number of partitions.

    A deployed node's config carries its device (and the profile's fields) and its partitions: no fleet
    file is read. A simulated node's holds only its partition, whose device the fleet says
    (:mod:`odl_fed.config.node`); ``num_clients`` (the server's instruction) stands in for the fleet's count.
    """
    profile = node_profile(node_config, devices_file=settings.devices_file)
    fleet = settings.fleet() if profile is None or num_clients is None else None
    partition_id, num_partitions = partition(node_config, default_partitions=num_clients or fleet.num_clients)
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


def instructed_job(settings: RunSettings, config: Mapping) -> JobSpec:
    """The job the server sent with its instruction (the fleet file's only when it sent none), its backbone
    read from where this node holds it (the job's own path with the same bytes, or the cached copy)."""
    if ConfigKey.JOB not in config:
        return settings.fleet().job
    job = parse_job(json.loads(str(config[ConfigKey.JOB])), "the server's job")
    sha256 = str(config.get(ConfigKey.WEIGHTS_SHA256, ""))
    if job.weights is None or not sha256:
        return job
    path = local_backbone(job.weights, sha256)
    if path is None:
        raise BackboneError(f"this node does not hold the job's backbone {job.weights} (sha256 {sha256[:12]}...), "
                            f"nor a copy in {cache_dir()}; the server sends it before a node's first round")
    return dataclasses.replace(job, weights=str(path))


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context, context.run_config)


@app.query("end")
def end(msg: Message, context: Context) -> Message:
    return handle_end(msg, context)


@app.query("join")
def join(msg: Message, context: Context) -> Message:
    return handle_join(msg, context, context.run_config)


def handle_join(msg: Message, context: Context, run_config: Mapping) -> Message:
    """The server's greeting before this node's first round: who this node is, and whether it holds the job's
    backbone (kept here when the greeting brings its bytes); see :mod:`odl_fed.federation.backbone`."""
    answer = backbone_answer(msg.content)
    try:
        config = msg.content.config_records.get(Record.CONFIG, ConfigRecord())
        num_clients = config.get(ConfigKey.NUM_CLIENTS)
        client, profile, _, _ = node_identity(RunSettings.from_config(run_config), context.node_config,
                                              num_clients=None if num_clients is None else int(num_clients))
        answer |= {ClientKey.CLIENT: client, ClientKey.DEVICE: profile.name}
    except (NodeConfigError, ValueError, OSError) as error:  # its first round says so in full
        log.warning("this node cannot say who it is: %s", error)
    return Message(content=RecordDict({Record.CONFIG: ConfigRecord(answer)}), reply_to=msg)


# What the client entry prints of a round (odl_fed.deploy.supernode), taken from the round's metrics.
NOTED_METRICS = (Metric.NUM_EXAMPLES, Metric.TRAIN_TIME, Metric.CLIENT_TIME, Metric.PEAK_MEMORY, Metric.MEMORY_BUDGET,
                 Metric.BATCH_SIZE, Metric.LAYERS_TRAINED, Metric.TRAIN_LOSS, Metric.EVAL_ACC_BEFORE,
                 Metric.EVAL_ACC_AFTER, Metric.EVAL_EXAMPLES)


def _note_round(server_round: int, outcome) -> None:
    """One JSON line for the client entry (``ODL_FED_ROUND_NOTES_FILE``), when it asked for them."""
    path = os.environ.get(ROUND_NOTES_FILE_ENV)
    if not path:
        return
    note = {"round": server_round, ClientKey.STATUS: outcome.status, ClientKey.ERROR: outcome.error,
            **{key: outcome.metrics[key] for key in NOTED_METRICS if key in outcome.metrics}}
    with open(path, "a", encoding="utf-8") as notes:
        notes.write(json.dumps(note) + "\n")


def round_data(job, node_config: Mapping, partition_id: int, num_partitions: int, *,
               data_dirs: Sequence[Path] = ()) -> tuple[ImageData, ImageData | None]:
    """What this node trains on and what it holds out to evaluate on (None when clients do not evaluate):
    its own images (``dataset: local``: the node config's ``data-dir``, or in simulation the run config's
    folder for its partition), else its share of the job's dataset. Raises
    :class:`~odl_fed.training.local_data.LocalDataError` for a board's folder that cannot train; what it
    skipped is logged when the folder is decoded."""
    folder = data_dir(node_config)
    if folder is None and 0 <= partition_id < len(data_dirs):
        folder = data_dirs[partition_id]
    if job.dataset != LOCAL_DATASET:
        if folder is not None:
            log.warning("--data %s is not used: the job trains on shares of %s (dataset: local would use it)",
                        folder, job.dataset)
        return client_data(job, partition_id, num_partitions), client_held_out(job, partition_id, num_partitions)
    local = board_data(job, folder)
    if local.decoded:  # once per change of the folder, not every round
        for warning in local.warnings:
            log.warning(warning)
        log.info(local.summary)
    return split_held_out(local.data, job, salt=partition_id)


def _write_warm_hint(run_config: Mapping, node_config: Mapping, instruction: Mapping) -> None:
    """The job and node of this message, for a warm launcher (``ODL_FED_WARM_HINT_FILE``), when one asked."""
    path = os.environ.get(WARM_HINT_FILE_ENV)
    if not path:
        return
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps({WarmHint.RUN_CONFIG: dict(run_config), WarmHint.NODE_CONFIG: dict(node_config),
                                   WarmHint.INSTRUCTION: {k: v for k, v in instruction.items()
                                                          if k != ConfigKey.SERVER_ROUND}}, sort_keys=True))
    partial.replace(path)


def warm_client(hint: Mapping) -> dict[str, float]:
    """Build what a node's rounds share, ahead of its next message: the client's share of the data and the
    job's model (cached in this process, :mod:`odl_fed.federation.job_assets`). A long-lived launcher calls
    this with what :func:`handle_train` noted (:data:`~odl_fed.schema.WARM_HINT_FILE_ENV`); its forked
    ClientApps then find both built. Returns the seconds each took."""
    settings = RunSettings.from_config(hint[WarmHint.RUN_CONFIG])
    instruction = hint.get(WarmHint.INSTRUCTION, {})
    num_clients = instruction.get(ConfigKey.NUM_CLIENTS)
    _, _, partition_id, num_partitions = node_identity(settings, hint[WarmHint.NODE_CONFIG],
                                                       num_clients=None if num_clients is None else int(num_clients))
    job = instructed_job(settings, instruction)
    started = time.perf_counter()
    round_data(job, hint[WarmHint.NODE_CONFIG], partition_id, num_partitions, data_dirs=settings.data_dirs)
    loaded = time.perf_counter()
    client_model(job, num_classes=output_classes(job))
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


def note_in_hand(msg: Message, context: Context, **who: str) -> None:
    """The message this process handles, for a warm launcher to answer for it should the process die by a
    signal (``ODL_FED_IN_HAND_FILE``; :mod:`odl_fed.deploy.launcher`): the message without its content, the
    context without its state, and ``who`` (the client and device, once known)."""
    path = os.environ.get(IN_HAND_FILE_ENV)
    if not path:
        return
    light = Message(metadata=msg.metadata, content=RecordDict())
    bare = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(context.node_config),
                   state=RecordDict(), run_config=dict(context.run_config))
    partial = Path(f"{path}.partial")
    partial.write_bytes(pickle.dumps({"message": light, "context": bare, **who}))
    partial.replace(path)


def handle_train(msg: Message, context: Context, run_config: Mapping) -> Message:
    """Train on this node's data and reply with the trained layers, or with why it could not.

    The node keeps its ASI bases in ``context.state`` (``asi-bases``), so its next round starts warm.
    """
    note_in_hand(msg, context)
    settings = RunSettings.from_config(run_config)
    config = msg.content.config_records.get(Record.CONFIG, ConfigRecord())
    num_clients = config.get(ConfigKey.NUM_CLIENTS)
    client, profile, partition_id, num_partitions = node_identity(
        settings, context.node_config, num_clients=None if num_clients is None else int(num_clients))
    note_in_hand(msg, context, client=client, device=profile.name)
    drill_hook(context.node_config).before_round(int(config.get(ConfigKey.SERVER_ROUND, 0)))  # `signal` drills
    job = instructed_job(settings, config)
    _write_warm_hint(run_config, context.node_config, config)
    server_round = int(config.get(ConfigKey.SERVER_ROUND, 0))
    drills = drill_hook(context.node_config)  # fault drills (python -m odl_fed.client --fault); none on a real node
    kept = context.state.array_records.get(BASES_KEY)
    try:
        data, eval_data = round_data(job, context.node_config, partition_id, num_partitions,
                                     data_dirs=settings.data_dirs)
    except LocalDataError as error:  # this board's images cannot train: it sits the round out, saying why
        log.error("%s: its images cannot train: %s", client, error)
        outcome = ClientOutcome(client, profile.name, REFUSED,
                                {Metric.TRAIN_MEMORY: profile.train_memory, Metric.SERVER_ROUND: server_round},
                                error=f"its images cannot train: {error}")
    else:
        outcome = run_client_round(
            job, profile, msg.content[Record.ARRAYS].to_torch_state_dict(), client=client, data=data,
            cache=_plan_cache(None if settings.plan_cache is None else str(settings.plan_cache)),
            proximal_mu=float(config.get(ConfigKey.PROXIMAL_MU, 0.0)), server_round=server_round,
            bases=None if kept is None else kept.to_torch_state_dict(), deadline=settings.round_timeout,
            budget_scale=drills.budget_scale(server_round), eval_data=eval_data)
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
