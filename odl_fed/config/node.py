"""A SuperNode's node config: which device this node is, and its share of the data.

A deployed client (``python -m odl_fed.client``) starts its SuperNode with the whole device
profile in its node config, so the ClientApp needs no profile file and the server none of the
client's::

    device="rpi4" ram=4294967296 train-memory=536870912 runtime-memory=419430400 cores=4
    relative-speed=1.0 partition-id=0 num-partitions=4

A board that trains on its own images (``--data DIR``, a job with ``dataset: local``) also carries
``data-dir="/abs/DIR"``; its ``partition-id`` then only names it (``rpi4-0``).

In simulation Flower's node config is only ``partition-id`` and ``num-partitions``: the fleet's
device for that partition is the node's device. Keys are kebab-case, sizes are bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from odl_fed.config.profile import (
    PROFILE_KEYS,
    DeviceProfile,
    get_profile,
    load_profiles,
    profile_fields,
    profile_from_fields,
)

__all__ = ["DEVICE", "PARTITION_ID", "NUM_PARTITIONS", "DATA_DIR", "NodeConfigError", "build_node_config",
           "format_node_config", "node_profile", "partition", "data_dir"]

DEVICE, PARTITION_ID, NUM_PARTITIONS = "device", "partition-id", "num-partitions"
DATA_DIR = "data-dir"  # the board's own image folder (python -m odl_fed.client --data DIR)
EXAMPLE = 'device="rpi4" partition-id=0 num-partitions=4'


class NodeConfigError(ValueError):
    """A node config this project cannot run a client with; the message shows a valid one."""


def build_node_config(profile: DeviceProfile, *, partition_id: int, num_partitions: int,
                      data_dir: Path | None = None) -> dict:
    """The node config of a deployed client: its profile's fields, its share, and its own images' folder."""
    if not 0 <= partition_id < num_partitions:
        raise NodeConfigError(f"partition-id must be in [0, num-partitions={num_partitions}), but got {partition_id}")
    return {DEVICE: profile.name, **profile_fields(profile), PARTITION_ID: partition_id,
            NUM_PARTITIONS: num_partitions, **({} if data_dir is None else {DATA_DIR: str(Path(data_dir).absolute())})}


def data_dir(node_config: Mapping) -> Path | None:
    """The board's own image folder its node config names (``data-dir``), or None."""
    value = str(node_config.get(DATA_DIR, "")).strip()
    return Path(value) if value else None


def format_node_config(config: Mapping) -> str:
    """Flower's ``--node-config`` syntax: ``key="text" key=1 key=0.5`` (TOML values)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())


def node_profile(node_config: Mapping, *, devices_file=None) -> DeviceProfile | None:
    """The device profile a node config names: its own fields when it carries them (a deployed
    client), else the built-in or ``devices_file`` profile of that name; None without ``device``."""
    if DEVICE not in node_config:
        carried = [key for key in PROFILE_KEYS if key in node_config]
        if carried:
            raise NodeConfigError(f"node config has device fields {carried} but no device name; "
                                  f"a node config looks like {EXAMPLE}")
        return None
    name = str(node_config[DEVICE])
    carried = {key: node_config[key] for key in PROFILE_KEYS if key in node_config}
    if carried:
        return profile_from_fields(name, carried, source="node config")
    return get_profile(name, load_profiles(*(() if devices_file is None else (devices_file,))))


def partition(node_config: Mapping, *, default_partitions: int) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from a node config, checked."""
    if PARTITION_ID not in node_config:
        raise NodeConfigError(f"node config needs an integer partition-id (and num-partitions), but got "
                              f"{dict(node_config)}; a node config looks like {EXAMPLE}")
    try:
        partition_id = int(node_config[PARTITION_ID])
        num_partitions = int(node_config.get(NUM_PARTITIONS, default_partitions))
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config needs an integer partition-id (and num-partitions), but got "
                              f"{dict(node_config)}; a node config looks like {EXAMPLE}") from None
    if not 0 <= partition_id < num_partitions:
        raise NodeConfigError(f"node config: partition-id must be in [0, num-partitions={num_partitions}), "
                              f"but got {partition_id}")
    return partition_id, num_partitions
