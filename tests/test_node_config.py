"""Node configs (what a SuperNode tells its ClientApp) and the machine readings --device auto uses."""

import re
from pathlib import Path

import pytest
import yaml

from odl_fed.config.machine import (
    MachineReadings,
    cgroup_memory_limit,
    cgroup_memory_usage,
    closest_profile,
    fit_to_memory_limit,
)
from odl_fed.config.node import build_node_config, format_node_config
from odl_fed.config.profile import get_profile, load_profiles
from odl_fed.config.run import RunSettings
from odl_fed.federation.client_app import node_identity

FLEET = Path(__file__).resolve().parent.parent / "configs" / "fleets" / "demo.yaml"


def _settings():
    return RunSettings.from_config({"fleet": str(FLEET)})


def test_a_deployed_node_carries_its_whole_profile():
    board = get_profile("rpi4").__class__(name="desk-pi", ram=2**31, train_memory=2**28, runtime_memory=2**28,
                                          cores=2, relative_speed=0.7)
    config = build_node_config(board, partition_id=1, num_partitions=3)
    client, profile, partition_id, num_partitions = node_identity(_settings(), config)
    assert (client, partition_id, num_partitions) == ("desk-pi-1", 1, 3)
    assert profile.train_memory == 2**28 and profile.cores == 2 and profile.relative_speed == 0.7
    text = format_node_config(config)
    assert 'device="desk-pi"' in text and "train-memory=268435456" in text and "partition-id=1" in text


def test_a_simulated_node_gets_the_fleets_device_for_its_partition():
    _, profile, _, _ = node_identity(_settings(), {"partition-id": 2, "num-partitions": 4})
    assert profile.name == "phone"


@pytest.mark.parametrize("config, message", [
    ({}, "node config needs an integer partition-id"),
    ({"device": "rpi4"}, "node config needs an integer partition-id"),
    ({"partition-id": "x"}, "node config needs an integer partition-id"),
    ({"ram": 2**30, "partition-id": 0}, "node config has device fields ['ram'] but no device name"),
    ({"device": "rpi9", "partition-id": 0}, "unknown device 'rpi9'"),
    ({"partition-id": 7, "num-partitions": 4}, "partition-id must be in [0, num-partitions=4), but got 7"),
])
def test_a_node_config_without_a_device_or_partition_is_one_clear_error(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        node_identity(_settings(), config)


def test_node_config_profile_fields_are_checked_like_a_files():
    config = {"device": "x", "ram": 100, "train-memory": 200, "runtime-memory": 0, "cores": 1,
              "relative-speed": 1.0, "partition-id": 0}
    with pytest.raises(ValueError, match=re.escape("train-memory (200 B) plus runtime-memory (0 B) exceed its ram")):
        node_identity(_settings(), config)


def _cgroup_v1(root: Path, limit: str, usage: int, inactive: int) -> Path:
    group = root / "memory"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(limit + "\n")
    (group / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (group / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")
    proc = root / "self-cgroup"
    proc.write_text("4:memory:/\n0::/\n")
    return proc


def test_cgroup_v1_limit_and_usage_are_read(tmp_path):
    proc = _cgroup_v1(tmp_path, "1073741824", usage=600 * 2**20, inactive=100 * 2**20)
    assert cgroup_memory_limit(root=tmp_path, proc_self_cgroup=proc) == (2**30, 1)
    assert cgroup_memory_usage(root=tmp_path, proc_self_cgroup=proc) == 500 * 2**20


def test_cgroup_v1_without_a_limit_reads_as_none(tmp_path):
    proc = _cgroup_v1(tmp_path, "9223372036854771712", usage=1, inactive=0)
    assert cgroup_memory_limit(root=tmp_path, proc_self_cgroup=proc) == (None, None)
    assert cgroup_memory_usage(root=tmp_path, proc_self_cgroup=proc) is None


def test_cgroup_v2_limit_of_this_processs_own_group_is_read(tmp_path):
    group = tmp_path / "system.slice" / "board.scope"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("536870912\n")
    (group / "memory.current").write_text("300000000\n")
    (group / "memory.stat").write_text("anon 1\ninactive_file 1000\n")
    (tmp_path / "memory.max").write_text("max\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/system.slice/board.scope\n")
    assert cgroup_memory_limit(root=tmp_path, proc_self_cgroup=proc) == (2**29, 2)
    assert cgroup_memory_usage(root=tmp_path, proc_self_cgroup=proc) == 300000000 - 1000


def test_train_memory_is_cut_to_what_a_container_leaves():
    rpi4 = get_profile("rpi4")
    same, note = fit_to_memory_limit(rpi4, limit=4 * 2**30, usage=2**30)
    assert same == rpi4 and note == ""
    cut, note = fit_to_memory_limit(rpi4, limit=1700 * 2**20, usage=1500 * 2**20, margin=64 * 2**20)
    assert fit_to_memory_limit(rpi4, limit=2200 * 2**20, usage=1200 * 2**20)[0].train_memory == 360 * 2**20
    assert cut.train_memory == 136 * 2**20 and "train-memory cut from 512 MiB" in note
    none_left, _ = fit_to_memory_limit(rpi4, limit=2**30, usage=2**30)
    assert none_left.train_memory == 1  # the plan refuses it, with its reason, instead of the kernel killing it


@pytest.mark.parametrize("ram, cores, limit, expected", [
    (4 * 2**30, 4, None, "rpi4"),
    (8 * 2**30, 4, None, "rpi5"),
    (64 * 2**30, 2, 6 * 2**30, "phone"),     # a container's limit counts, not the host's RAM
    (3 * 2**20, 1, None, "tiny"),
])
def test_device_auto_picks_the_nearest_profile_that_does_not_promise_more(ram, cores, limit, expected):
    profile, reason = closest_profile(MachineReadings(ram=ram, cores=cores, cgroup_limit=limit,
                                                      cgroup_version=1 if limit else None), load_profiles())
    assert profile.name == expected, reason
    assert reason.startswith(f"picked {expected} ") and "this machine has" in reason
    if limit:
        assert "cgroup v1 memory limit" in reason


def test_a_user_devices_file_adds_profiles_auto_can_pick(tmp_path):
    extra = tmp_path / "devices.yaml"
    extra.write_text(yaml.safe_dump({"orin": {"ram": "16GiB", "train-memory": "2GiB", "runtime-memory": "1GiB",
                                              "cores": 8, "relative-speed": 5.0}}))
    profile, _ = closest_profile(MachineReadings(ram=16 * 2**30, cores=8), load_profiles(extra))
    assert profile.name == "orin"
