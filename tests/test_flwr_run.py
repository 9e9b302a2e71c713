"""`flwr run .` on loopback: the apps declared in pyproject run a small fleet to the end, offline,
and the local SuperLink that `flwr run` starts is stopped afterwards."""

import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from odl_fed.deploy.flwr_local import FLOWER_PROCESSES
from odl_fed.federation.recorder import read_rounds

JOB = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 2, "clients-per-round": 4, "local-epochs": 1,
       "batch-size": 32, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits", "partition": "iid", "seed": 0,
       "examples-per-client": 100, "eval-examples": 300}


def _flower_processes(home: Path) -> list:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(n in " ".join(process.info["cmdline"] or []) for n in FLOWER_PROCESSES) and \
                    process.environ().get("FLWR_HOME") == str(home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# About a minute here: a local SuperLink and a second Ray simulation of the apps that conftest's shared
# run (`odl-fed simulate`) checks in the default stage; only `flwr run`'s wiring is new here.
@pytest.mark.slow
def test_flwr_run_local_runs_the_fleet_to_the_end(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}, {"device": "phone", "count": 1},
                                                 {"device": "tiny", "count": 1}], "job": JOB}))
    home = tmp_path / "flwr-home"
    plans = tmp_path / "plans"  # not the run config's default, .odl-fed/plans in the project
    done = subprocess.run([sys.executable, "-m", "odl_fed.deploy.flwr_local", "--fleet", str(fleet), "--out-dir",
                           str(tmp_path / "out"), "--flwr-home", str(home), "--plan-cache", str(plans)],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"round log: {tmp_path / 'out' / 'rounds.jsonl'}" in done.stdout
    rounds = read_rounds(tmp_path / "out" / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["aggregated"] == 3 and r["failed"] == 1
        assert {c["client"]: c["status"] for c in r["clients"]}["tiny-3"] == "refused"
    assert (home / "config.toml").exists()
    assert len(list(plans.glob("*.json"))) == 2  # rpi4 and phone planned; tiny was refused
    assert _flower_processes(home) == []


@pytest.mark.process
def test_a_bad_fleet_is_one_clear_error_before_flower_starts(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi9", "count": 2}], "job": JOB}))
    done = subprocess.run([sys.executable, "-m", "odl_fed.deploy.flwr_local", "--fleet", str(fleet), "--flwr-home",
                           str(tmp_path / "home")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert str(fleet) in done.stderr and "devices[0].device" in done.stderr and "rpi9" in done.stderr
