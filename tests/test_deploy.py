"""The deployed fleet on loopback: the server entry and client entries as separate processes
(a real SuperLink, real SuperNodes, a fresh ClientApp process per message), and their bad input.

Every process a test starts is stopped by its PID at the end, and the test checks from outside
(psutil) that none of them, nor anything they started, is left.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from odl_fed.deploy.processes import free_port
from odl_fed.federation.recorder import read_rounds
from processes import ROOT, env, start, stop_all, tree

pytestmark = pytest.mark.process  # every test here starts the entries as processes

JOB = {"model": "mobilenet_v2", "layers": 1, "method": "asi", "rounds": 2, "clients-per-round": 3,
       "local-epochs": 1, "batch-size": 16, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits",
       "partition": "iid", "seed": 0, "examples-per-client": 64, "eval-examples": 200}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", *args], log)


def _run_quick(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.slow  # minutes of real processes: make test-slow (its own CI stage)
def test_a_deployed_fleet_runs_to_the_end_on_loopback(tmp_path):
    """Server entry + 3 client entries (2 devices, one from a user file, one with a hard cap), 2 rounds."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}, {"device": "phone", "count": 1}],
                                     "job": JOB}))
    devices = tmp_path / "my-devices.yaml"
    devices.write_text(yaml.safe_dump({"desk-pi": {"description": "a Pi 4 on a desk", "ram": "4GiB",
                                                   "train-memory": "384MiB", "runtime-memory": "400MiB", "cores": 4,
                                                   "relative-speed": 1.0}}))
    port = free_port()
    out = tmp_path / "out"
    started: list[subprocess.Popen] = []
    pids: set[int] = set()
    try:
        server = _start(["odl_fed.server", "--insecure", "--fleet", str(fleet), "--out-dir", str(out), "--listen",
                         f"127.0.0.1:{port}", "--plan-cache", str(tmp_path / "plans")], tmp_path / "server.log")
        started.append(server)
        # The first two clients run the warm launcher (the default); the phone runs Flower's own
        # SuperExec (--cold): a fresh flwr-clientapp per message. The round log is the same for both.
        clients = [
            (["--device", "rpi4", "--hard-limit", "--state-dir", str(tmp_path / "state-0")], 0),
            (["--device", "desk-pi", "--devices", str(devices), "--state-dir", str(tmp_path / "state-1")], 1),
            (["--device", "phone", "--cold"], 2),
        ]
        for extra, partition in clients:
            # --connect-timeout: under load the server's SuperLink took 37 s to answer here (default 30 s)
            started.append(_start(["odl_fed.client", "--insecure", *extra, "--superlink", f"127.0.0.1:{port}",
                                   "--partition-id", str(partition), "--num-partitions", "3",
                                   "--reconnect-timeout", "5",
                                   "--connect-timeout", "300"], tmp_path / f"client-{partition}.log"))
        capped = None
        deadline = time.monotonic() + 900
        while server.poll() is None and time.monotonic() < deadline:
            for process in started:
                pids |= tree(process)
            for pid in tree(started[1]):  # the hard-capped client: read its launcher's limit (its forked
                try:                          # ClientApps inherit it) from outside
                    child = psutil.Process(pid)
                    if "odl_fed.deploy.launcher" in " ".join(child.cmdline()):
                        capped = child.rlimit(psutil.RLIMIT_AS)
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.5)
        log = (tmp_path / "server.log").read_text()
        assert server.returncode == 0, log[-4000:]
        assert f"round log: {out / 'rounds.jsonl'}" in log
        # The console view, followed from the round log: one plain line per round off a terminal,
        # Flower's own lines in the run directory; the ServerApp wrote the report and TensorBoard's files.
        assert "\x1b[" not in log
        assert [line.split(" |")[0] for line in log.splitlines() if line.startswith("round ") and " | " in line] == \
            ["round 0/2", "round 1/2", "round 2/2"], log[-4000:]
        assert "trained 3/3 refused 0 failed 0 lost 0" in log
        assert "INFO" not in log and "[RUN" not in (tmp_path / "server.log").read_text()
        assert (out / "superlink.log").stat().st_size > 0 and (out / "flwr-run.log").stat().st_size > 0
        assert (out / "report.html").stat().st_size > 0 and list((out / "tensorboard").glob("events.out.*"))

        rounds = read_rounds(out / "rounds.jsonl")
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert all(0.0 <= r["global"]["accuracy"] <= 1.0 for r in rounds)
        for r in rounds[1:]:
            clients_seen = {c["client"]: c for c in r["clients"]}
            assert set(clients_seen) == {"rpi4-0", "desk-pi-1", "phone-2"}, clients_seen.keys()
            for name, entry in clients_seen.items():
                assert entry["status"] == "ok", entry
                assert entry["device"] == name.rsplit("-", 1)[0]
                assert entry["plan"]["layers"] and entry["plan"]["batch_size"] >= 1
                assert 0 < entry["peak-memory"] <= entry["memory-budget"]
            # the user file's profile travelled in the node config, not through a file on the server
            assert clients_seen["desk-pi-1"]["train-memory"] == 384 * 2**20
            assert clients_seen["rpi4-0"]["train-memory"] == 512 * 2**20
        _check_warm_launcher(tmp_path / "state-0")
        _check_warm_launcher(tmp_path / "state-1")
        # RLIMIT_AS = runtime-memory + train-memory + torch's floor, read from the running launcher
        from odl_fed.deploy.processes import TORCH_ADDRESS_FLOOR
        assert capped == (912 * 2**20 + TORCH_ADDRESS_FLOOR,) * 2

        # The run is over: the server told every node, so each client says so in one line and exits 0
        # (a SuperLink lost mid-run stays status 1: test_a_superlink_lost_mid_run_ends_the_client_with_status_1).
        for process, partition in zip(started[1:], (0, 1, 2)):
            process.wait(timeout=60)
            text = (tmp_path / f"client-{partition}.log").read_text()
            ends = [line for line in text.splitlines() if "the run is over" in line]
            assert process.returncode == 0 and len(ends) == 1 and "lost the SuperLink" not in text, text[-2000:]
            assert ends[0].startswith("odl-fed client: the run is over: 2 rounds, global accuracy ")
            # one plain line per round, from what its ClientApp noted
            rounds_said = [line for line in text.splitlines() if line.startswith("odl-fed client: round ")]
            assert [line.split(",")[0] for line in rounds_said] == ["odl-fed client: round 1: ok",
                                                                    "odl-fed client: round 2: ok"], text[-2000:]
            assert all(" examples, batch " in line and " MiB" in line for line in rounds_said)
    finally:
        stop_all(started, pids)
    assert not any(f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))


def _check_warm_launcher(state_dir: Path) -> None:
    """The launcher imported torch once; the first train message's child built the model and the data,
    the launcher then built them once for itself, and no later child (round 2, the end notice) imported
    torch or built either (odl_fed.schema.LauncherKey). Each child names the message it handled: the
    server's greeting, round 1, round 2, the end notice, in that order."""
    from odl_fed.schema import END_QUERY, JOIN_QUERY, TRAIN_MESSAGE, LauncherKey

    lines = [json.loads(line) for line in (state_dir / "launcher.jsonl").read_text().splitlines()]
    events = [line[LauncherKey.EVENT] for line in lines]
    assert events.count("start") == 1 and events.count("warm") == 1, events
    assert lines[0][LauncherKey.IMPORTS_S] > 0 and lines[0][LauncherKey.MODULES] > 1000
    children = [line for line in lines if line[LauncherKey.EVENT] == "child"]
    assert [child[LauncherKey.MESSAGE_TYPE] for child in children] == \
        [JOIN_QUERY, TRAIN_MESSAGE, TRAIN_MESSAGE, END_QUERY], children
    assert all(child[LauncherKey.STATUS] == 0 and not child[LauncherKey.TORCH_IMPORTED] for child in children)
    # no child starts a process of its own (Flower's telemetry ran `uname -p` and `file -b` in each; a
    # fork from its thread outlived the child under qemu): odl_fed.deploy.launcher._answer_disabled_telemetry
    assert all(child[LauncherKey.SPAWNED] == [] for child in children), children
    greeting, first, later = children[0], children[1], children[2:]
    assert set(greeting[LauncherKey.BUILDS].values()) <= {0}, greeting  # a greeting builds nothing
    assert first[LauncherKey.BUILDS]["model"] == 1 and first[LauncherKey.BUILDS]["data"] == 1, first
    for child in later:
        assert set(child[LauncherKey.BUILDS].values()) == {0}, child
        assert child[LauncherKey.MODULES_IMPORTED] < 50, child
    assert events.index("warm") < lines.index(later[0])


def test_a_forked_clientapp_that_never_starts_is_killed_and_forked_again():
    """The warm launcher's fork (odl_fed.deploy.launcher.fork_child): a child that has not said it runs
    within the timeout (here made to hang before it does) is killed by PID and another is forked; when
    none starts in the allowed tries, none is left running and the launcher is told (None)."""
    import os

    from odl_fed.deploy.launcher import fork_child

    hung: list[tuple[int, int]] = []

    def hang_first(attempt: int) -> None:
        if attempt == 1:
            time.sleep(120)

    pid = fork_child(lambda: 7, start_timeout=2.0, on_hung=lambda p, a: hung.append((p, a)), before_ready=hang_first)
    assert pid is not None and [attempt for _, attempt in hung] == [1]
    assert not psutil.pid_exists(hung[0][0])  # killed and reaped
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7  # the second child ran its body

    hung.clear()
    pid = fork_child(lambda: 0, start_timeout=1.0, attempts=2, on_hung=lambda p, a: hung.append((p, a)),
                     before_ready=lambda attempt: time.sleep(120))
    assert pid is None and [attempt for _, attempt in hung] == [1, 2]
    assert not any(psutil.pid_exists(p) for p, _ in hung)


@pytest.mark.parametrize("args, expected", [
    (["--device", "rpi9", "--superlink", "127.0.0.1:9092"], "unknown device 'rpi9' (did you mean"),
    (["--device", "rpi4", "--superlink", "localhost"], "--superlink must be HOST:PORT"),
    (["--device", "rpi4", "--superlink", "127.0.0.1:99999"], "--superlink must be HOST:PORT"),
    (["--device", "rpi4", "--devices", "/nonexistent/devices.yaml", "--superlink", "127.0.0.1:9092"],
     "/nonexistent/devices.yaml is not a readable file"),
    (["--device", "rpi4", "--superlink", "127.0.0.1:9092", "--partition-id", "4", "--num-partitions", "4"],
     "partition-id must be in [0, num-partitions=4), but got 4"),
])
def test_client_bad_input_is_one_clear_error(args, expected):
    done = _run_quick(["odl_fed.client", "--insecure", *args])
    assert done.returncode == 2
    assert expected in _one_error_line(done)


def test_client_bad_profile_file_names_the_field(tmp_path):
    bad = tmp_path / "devices.yaml"
    bad.write_text("board:\n  ram: 4GiB\n  train-memroy: 1GiB\n")
    done = _run_quick(["odl_fed.client", "--insecure", "--device", "board", "--devices", str(bad), "--superlink",
                       "127.0.0.1:9"])
    assert done.returncode == 2
    assert "train-memroy" in _one_error_line(done) and str(bad) in done.stderr


def test_client_says_when_the_superlink_does_not_answer_and_exits_in_bounded_time():
    port = free_port()
    before = time.monotonic()
    done = _run_quick(["odl_fed.client", "--insecure", "--device", "rpi4", "--superlink", f"127.0.0.1:{port}",
                       "--connect-timeout", "3"])
    assert done.returncode == 1
    assert f"the SuperLink at 127.0.0.1:{port} does not answer (tried for 3 s)" in _one_error_line(done)
    assert time.monotonic() - before < 30


def test_a_superlink_lost_mid_run_ends_the_client_with_status_1(tmp_path):
    """A bare SuperLink (no run, so no end notice ever comes): the client joins, then the SuperLink is
    killed; the client says it lost it, in one line, and exits 1 within its reconnect timeout."""
    from odl_fed.deploy.processes import flower_command

    port = free_port()
    started: list[subprocess.Popen] = []
    pids: set[int] = set()
    try:
        superlink = start([flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                           str(port), "--database", str(tmp_path / "superlink.db"),
                           "--disable-runtime-dependency-installation"], tmp_path / "superlink.log")
        started.append(superlink)
        client = _start(["odl_fed.client", "--insecure", "--device", "rpi4", "--superlink", f"127.0.0.1:{port}",
                         "--connect-timeout", "120", "--reconnect-timeout", "5"], tmp_path / "client.log")
        started.append(client)
        deadline = time.monotonic() + 120
        while "SuperNode " not in (tmp_path / "client.log").read_text() and time.monotonic() < deadline:
            assert client.poll() is None, (tmp_path / "client.log").read_text()
            time.sleep(0.5)
        time.sleep(3)  # the SuperNode has connected
        pids |= tree(superlink) | tree(client)
        superlink.kill()
        superlink.wait(timeout=30)
        client.wait(timeout=90)
        text = (tmp_path / "client.log").read_text()
        assert client.returncode == 1, text[-2000:]
        lost = [line for line in text.splitlines() if "error:" in line]
        assert len(lost) == 1 and f"lost the SuperLink at 127.0.0.1:{port}" in lost[0], text[-2000:]
        assert "the run is over" not in text
    finally:
        stop_all(started, pids)


def test_device_auto_says_which_profile_and_why():
    port = free_port()
    done = _run_quick(["odl_fed.client", "--insecure", "--device", "auto", "--superlink", f"127.0.0.1:{port}",
                       "--connect-timeout", "1"])
    assert "--device auto: picked " in done.stderr and "this machine has" in done.stderr
    assert f"{psutil.cpu_count()} core(s)" in done.stderr or "core(s)" in done.stderr


@pytest.mark.parametrize("args, expected", [
    (["--fleet", "configs/fleets/nope.yaml"], "fleet file configs/fleets/nope.yaml does not exist"),
    (["--fleet", "configs/fleets/mixed.yaml", "--listen", "0.0.0.0"], "--listen must be HOST:PORT"),
])
def test_server_bad_input_is_one_clear_error_and_starts_nothing(args, expected):
    done = _run_quick(["odl_fed.server", "--insecure", *args, "--out-dir", "/tmp/odl-fed-never-made"])
    assert done.returncode == 2
    assert expected in _one_error_line(done)
    assert not Path("/tmp/odl-fed-never-made").exists()
