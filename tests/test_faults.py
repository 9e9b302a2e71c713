"""Faults on a real deployed fleet (server entry + client entries on loopback, separate processes):
a round with too few clients is skipped, clients join late, bad replies (NaN, inf, wrong names,
wrong shapes, absurd counts) are rejected, a ClientApp killed by SIGILL is reported with its device and
signal (and its node trains again), a straggler is lost and the round closes on time, a crash is an error
reply, a squeezed budget is a real breach, and a client SIGKILLed mid-round is
lost while the others go on. The global model never takes a bad update.

The deployed run takes about 8 minutes here: `make test-slow` (and CI) runs it; the fault drills'
parsing and the validation are in the default suite.
"""

import json
import subprocess
import time

import psutil
import pytest
import torch
import yaml

from odl_fed.deploy.processes import free_port
from odl_fed.federation.faults import FaultError, parse_fault
from odl_fed.federation.recorder import read_rounds
from processes import is_clientapp, stop_all, tree
from test_deploy import JOB, _start

# The round timeout, also how long a round waits for its clients to connect. A deployed client's
# round here is 20-50 s (a fresh ClientApp process imports torch each round); the straggler's
# delay is past it.
TIMEOUT = 90


def _clientapps(process: subprocess.Popen) -> list[psutil.Process]:
    """The ClientApp processes under a client entry (see :func:`processes.is_clientapp`)."""
    found = []
    for pid in tree(process):
        try:
            child = psutil.Process(pid)
            if is_clientapp(child):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_a_deployed_fleet_survives_its_faults(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 3}],
                                     "job": JOB | {"rounds": 5, "clients-per-round": 3, "min-clients": 2}}))
    port, out = free_port(), tmp_path / "out"
    log = out / "rounds.jsonl"
    link = ["--superlink", f"127.0.0.1:{port}", "--insecure", "--num-partitions", "3", "--reconnect-timeout", "5",
            "--connect-timeout", "300"]
    started: list[subprocess.Popen] = []
    pids: set[int] = set()
    killed_at = None
    try:
        server = _start(["odl_fed.server", "--insecure", "--fleet", str(fleet), "--out-dir", str(out), "--listen",
                         f"127.0.0.1:{port}", "--plan-cache", str(tmp_path / "plans"), "--round-timeout",
                         str(TIMEOUT)], tmp_path / "server.log")
        first = _start(["odl_fed.client", "--device", "rpi4", "--partition-id", "0", "--fault", "squeeze:0.01@4",
                        *link], tmp_path / "c0.log")
        started += [server, first]
        late = [(["--partition-id", "1", "--fault", "nan@2+wrong-name@3+absurd-examples@4+wrong-shape@5"], "c1"),
                (["--partition-id", "2", "--fault", f"signal:4@2+slow:{TIMEOUT + 10}@3+crash@5"], "c2")]
        deadline = time.monotonic() + 900
        while server.poll() is None and time.monotonic() < deadline:
            for process in started:
                pids |= tree(process)
            done = read_rounds(log) if log.exists() else []
            if len(started) == 2 and len(done) >= 2:  # round 1 was skipped: the others join late
                for extra, name in late:
                    started.append(_start(["odl_fed.client", "--device", "rpi4", *extra, *link],
                                          tmp_path / f"{name}.log"))
            if killed_at is None and len(done) == 5 and _clientapps(first):  # round 5 has begun for c0
                killed_at = time.monotonic()
                for pid in tree(first):
                    try:
                        psutil.Process(pid).kill()  # SIGKILL, the SuperNode and its ClientApp
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.5)
        text = (tmp_path / "server.log").read_text()
        assert server.returncode == 0, text[-4000:]
    finally:
        stop_all(started, pids)

    rounds = read_rounds(log)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5]  # no finished round lost
    status = [{c["client"]: c["status"] for c in r["clients"]} for r in rounds]
    reason = [{c["client"]: c.get("reason", "") for c in r["clients"]} for r in rounds]

    # 1: one client connected, the job needs two: skipped, said so, the run went on
    assert "1 client(s) connected, the job needs at least 2" in rounds[1]["skipped"]
    assert rounds[1]["clients-asked"] == 0 and status[1] == {}
    assert "round 1/5 | SKIPPED" in text
    # 2: a late joiner trains; the NaN is rejected before aggregation; a ClientApp that dies by SIGILL (what a
    # Pi 4 meets in a torch built for a newer core) is reported by its launcher: its client, device and signal
    assert status[2] == {"rpi4-0": "ok", "rpi4-1": "rejected", "rpi4-2": "error"}
    assert "NaN or infinite" in reason[2]["rpi4-1"]
    died = next(c for c in rounds[2]["clients"] if c["client"] == "rpi4-2")
    assert died["device"] == "rpi4" and "the ClientApp of rpi4-2 (device rpi4) died by SIGILL" in died["reason"], died
    # 3: wrong layer names rejected; the straggler is lost, by name, and the round closed on time
    assert status[3] == {"rpi4-0": "ok", "rpi4-1": "rejected", "rpi4-2": "lost"}
    assert "unexpected" in reason[3]["rpi4-1"] and "timeout" in reason[3]["rpi4-2"]
    assert rounds[3]["elapsed"] - rounds[2]["elapsed"] < TIMEOUT + 30
    assert "rpi4-2 lost" in (out / "flwr-run.log").read_text()
    # 4: an absurd example count rejected; a budget squeezed after planning is a real breach (psutil),
    # reported with its retreats; the straggler's node may still be busy with round 3's reply
    assert status[4]["rpi4-1"] == "rejected" and "more than the" in reason[4]["rpi4-1"]
    breached = next(c for c in rounds[4]["clients"] if c["client"] == "rpi4-0")
    assert breached["status"] == "memory-exceeded" and breached["peak-memory"] > breached["memory-budget"]
    assert status[4]["rpi4-2"] in ("ok", "lost")
    # 5: c0 killed mid-round (lost, or unavailable); a wrong shape rejected; a crash is an error reply
    assert killed_at is not None
    assert status[5]["rpi4-1"] == "rejected" and "shape" in reason[5]["rpi4-1"]
    assert status[5]["rpi4-2"] == "error" and "fault drill crash@5" in reason[5]["rpi4-2"]  # named, though it crashed
    assert set(status[5]) == {"rpi4-0", "rpi4-1", "rpi4-2"}  # each client once, by name
    assert status[5]["rpi4-0"] in ("lost", "error")  # no reply by the timeout, or the SuperLink's "Node Unavailable"
    assert rounds[5]["aggregated"] == 0
    assert rounds[5]["global"]["accuracy"] == rounds[4]["global"]["accuracy"]  # the global model did not move
    assert [r["aggregated"] for r in rounds[1:4]] == [0, 1, 1] and rounds[4]["aggregated"] <= 1
    final = torch.load(out / "trained_layers.pt")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "end"


@pytest.mark.parametrize("text, expected", [
    ("boom", "KIND one of nan, inf"), ("slow", "slow needs :ARG (seconds)"), ("nan:3", "nan takes no :ARG"),
    ("squeeze:2", "squeeze needs a fraction in (0, 1]"), ("nan@x", "but got 'nan@x'"),
])
def test_a_bad_fault_drill_is_one_clear_error(text, expected):
    with pytest.raises(FaultError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        parse_fault(text)


def test_fault_drills_damage_only_their_rounds():
    drills = parse_fault("nan@1+wrong-name@2+absurd-examples@3+slow:2@2+squeeze:0.5@4")
    assert str(drills) == "nan@1+wrong-name@2+absurd-examples@3+slow:2@2+squeeze:0.5@4"
    assert [drills.budget_scale(r) for r in (1, 4)] == [1.0, 0.5] and drills.delay(2) == 2.0
    arrays, metrics = {"w": torch.ones(2, 2)}, {"num-examples": 5}
    drills.damage(arrays, metrics, 1)
    assert torch.isnan(arrays["w"][0, 0]) and torch.isfinite(arrays["w"]).sum() == 3
    arrays = {"w": torch.ones(2, 2)}
    drills.damage(arrays, metrics, 2)
    assert list(arrays) == ["w.renamed"]
    drills.damage(arrays, metrics, 3)
    assert metrics["num-examples"] == 10**12
    clean = {"w": torch.ones(2, 2)}
    drills.damage(clean, metrics, 4)
    assert torch.equal(clean["w"], torch.ones(2, 2))
