"""`docker compose up` of the committed compose file, as a user runs it (`make test-compose`; not in the
default run: `-m compose`).

The test starts a dockerd of its own (:mod:`tools.docker_engine`), makes the base image locally when
the engine has no ``python:3.11-slim`` (nothing is pulled) and fills ``build/wheelhouse/`` (what `make
wheelhouse` does): the only preparation a machine with no network needs. Then, in a clean copy of the
project (its tracked files: no ``certs/``, no backbone, an empty ``runs/``), with ``ODL_FED_BASE``
naming the base, it runs ``docker compose up`` and nothing else, and checks:

- Compose builds both role images, the one-shot services make the TLS material (into volumes) and the
  demo's backbone (into ``runs/``), and the demo fleet runs its 3 rounds to the end; every container
  exits 0 (the clients after the server's end notice), and the round log and report are on the host;
- each client's memory limit, read back inside its container, is its profile's; ``tiny`` (2 MiB of
  RAM, given the 2 GiB floor to start at all) is refused by its plan every round, and the rest go on;
- the clients print one plain line per round and no Flower log line (those go to files under
  ``runs/clients/``); the server's console lines have no colour codes;
- a second ``docker compose up`` builds nothing and keeps the certificates and the backbone;
- everything is torn down: containers, volumes, network, and the daemon, by its PID.

It skips (with the reason) only where no engine can start.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from odl_fed.deploy.compose import CLIENT_IMAGE, SERVER_IMAGE
from odl_fed.federation.recorder import read_rounds
from tools.docker_engine import EngineUnavailable, base_image, start_engine, wheelhouse

pytestmark = pytest.mark.compose
ROOT = Path(__file__).resolve().parent.parent
PROJECT = "odlfedtest"  # the copy's directory name: Compose's project name, as a user's clone gets its own
CACHE = Path(os.environ.get("ODL_FED_CACHE", "/var/cache/odl-fed"))
UP_TIMEOUT = 2700  # seconds for one `docker compose up` (the first builds both images and pretrains the backbone)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        # Image layers are kept in the cache between runs (a first run builds cold, later ones warm).
        engine = start_engine(tmp_path_factory.mktemp("docker"), data_root=CACHE / "docker-root")
    except EngineUnavailable as error:
        print(f"\nskipped: no Docker engine can start here: {error}")
        pytest.skip(f"no Docker engine can start here: {error}")
    # A stopped CI job (SIGTERM) still takes the fleet down and stops the engine: the test's own finally
    # runs `docker compose down`, and this fixture's stops the engine by PID.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield engine
    finally:
        signal.signal(signal.SIGTERM, previous)
        pid, directory = engine.pid, engine.directory
        engine.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(directory) in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the test's engine still running: {left}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _clean_copy(target: Path) -> Path:
    """The project's tracked files as they are now (what a clone of this commit holds), and the wheelhouse."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    shutil.copytree(wheelhouse(), target / "build" / "wheelhouse", copy_function=os.link)  # `make wheelhouse`
    assert not (target / "certs").exists() and [p.name for p in (target / "runs").iterdir()] == [".gitkeep"]
    return target


def _prune(engine) -> None:
    """Stopped containers, the role images and the untagged layers they leave (6-7 GB each): the engine's
    cache persists between runs, and a disk that fills up fails the next build ("no space left on device")."""
    engine.docker("container", "prune", "-f", check=False)
    engine.docker("volume", "prune", "-f", check=False)  # a stopped run's certificate volumes
    engine.docker("image", "rm", "-f", SERVER_IMAGE, CLIENT_IMAGE, check=False)
    engine.docker("image", "prune", "-f", check=False)


def _up(engine, project: Path, log: Path, watch=None) -> int:
    """``docker compose up`` in ``project``, as a user types it; its output to ``log``; ``watch()`` each second."""
    with log.open("w") as out:
        up = subprocess.Popen([*engine.compose, "up"], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                              env=engine.env | {"ODL_FED_BASE": base_image(engine, cache=CACHE)})
    try:
        deadline = time.monotonic() + UP_TIMEOUT
        while up.poll() is None and time.monotonic() < deadline:
            if watch is not None:
                watch()
            time.sleep(1)
        assert up.poll() is not None, f"docker compose up did not end within {UP_TIMEOUT} s: {log.read_text()[-3000:]}"
        return up.returncode
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def _containers(engine) -> dict[str, dict]:
    """Each service's container state, by service name."""
    ids = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
    states = {}
    for container in ids:
        info = json.loads(engine.docker("inspect", container).stdout)[0]
        states[info["Config"]["Labels"]["com.docker.compose.service"]] = info["State"]
    return states


def _lines(output: str, service: str) -> list[str]:
    """What ``service`` printed, from ``docker compose up``'s output (``service-1  | text``)."""
    colour = r"(?:\x1b\[[0-9;]*m)*"  # around the prefix only, where Compose may colour it
    prefix = re.compile(rf"^{colour}{re.escape(service)}-\d+\s*{colour}\s*\|{colour} ?(.*)$")
    return [m.group(1) for m in map(prefix.match, output.splitlines()) if m]


def test_docker_compose_up_runs_the_committed_fleet_to_the_end(engine, tmp_path):
    started = time.monotonic()
    base_image(engine, cache=CACHE)
    project = _clean_copy(tmp_path / PROJECT)
    compose = yaml.safe_load((project / "docker-compose.yml").read_text())
    _prune(engine)  # leftovers of an earlier run: the build below is a fresh machine's
    limits = {}

    def read_limits() -> None:
        for service in ("rpi4-0", "phone-2", "tiny-3"):
            if service in limits:
                continue
            container = engine.docker("ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                                      "--filter", f"label=com.docker.compose.service={service}").stdout.strip()
            if container:
                read = engine.docker("exec", container, "python", "-c", "from odl_fed.config.machine import "
                                     "cgroup_memory_limit; print(cgroup_memory_limit()[0])", check=False)
                if read.returncode == 0 and read.stdout.strip().isdigit():
                    limits[service] = int(read.stdout.strip())

    try:
        status = _up(engine, project, tmp_path / "up.log", watch=read_limits)
        first_s = time.monotonic() - started
        output = (tmp_path / "up.log").read_text()
        states = _containers(engine)
        assert status == 0, output[-5000:]
        # every service ran, and every container ended with 0: the one-shots, the server, the clients
        assert set(states) == set(compose["services"]), output[-3000:]
        assert {s: st["ExitCode"] for s, st in states.items()} == dict.fromkeys(states, 0), output[-5000:]
        assert not any(st["OOMKilled"] for st in states.values())

        log = project / "runs" / "compose" / "rounds.jsonl"  # on the host, through the volume
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert lines[-1]["event"] == "end", output[-5000:]
        rounds = read_rounds(log)
        assert [r["round"] for r in rounds] == [0, 1, 2, 3]
        assert rounds[-1]["global"]["accuracy"] > rounds[0]["global"]["accuracy"]  # the fleet learned
        assert (log.parent / "report.html").stat().st_size > 0
        assert (project / "runs" / "resnet18-fashion.pt").is_file()  # the backbone service's, on the host
        for r in rounds[1:]:
            by_client = {c["client"]: c for c in r["clients"]}
            assert {by_client[c]["status"] for c in ("rpi4-0", "rpi4-1", "phone-2")} == {"ok"}
            assert by_client["tiny-3"]["status"] == "refused" and by_client["tiny-3"]["reason"]

        # what a user reads: one-shots say what they made, clients one plain line per round, no Flower lines
        assert "made the certificates" in " ".join(_lines(output, "certs"))
        assert "test top-1" in " ".join(_lines(output, "backbone"))
        for client in ("rpi4-0", "rpi4-1", "phone-2", "tiny-3"):
            said = _lines(output, client)
            assert len([s for s in said if re.search(r"round \d+: ", s)]) == 3, "\n".join(said)
            assert any("the run is over: 3 rounds" in s for s in said), "\n".join(said)
            assert not any(re.search(r"\bINFO\b|\x1b\[", s) or not s.strip() for s in said), "\n".join(said)
            flower_log = project / "runs" / "clients" / f"{client}.flower.log"  # DEVICE-PARTITION, the service's name
            assert "INFO" in flower_log.read_text()  # Flower's own lines: in the file, not on the console
        server_lines = _lines(output, "server")
        assert not any("\x1b[" in line for line in server_lines)
        assert [m.group(1) for m in map(re.compile(r"^round (\d+/\d+) \|").match, server_lines) if m] == \
            ["0/3", "1/3", "2/3", "3/3"], "\n".join(server_lines[-40:])
        # limits read back inside the containers: each profile's ram, tiny's floor
        for service in ("rpi4-0", "phone-2", "tiny-3"):
            assert limits[service] == int(compose["services"][service]["mem_limit"].rstrip("m")) * 2**20
        print(f"\nfirst docker compose up (images built, certificates and backbone made, 3 rounds): {first_s:.0f} s")
        for image in (SERVER_IMAGE, CLIENT_IMAGE):  # what docs/deployment.md reports
            print(f"{image}: {engine.docker('image', 'inspect', image, '--format', '{{.Size}}').stdout.strip()} bytes")
        print(engine.docker("system", "df").stdout)

        # A second `docker compose up`: nothing built, the certificates and the backbone kept, the run again.
        images = {image: engine.docker("image", "inspect", image, "--format", "{{.Id}}").stdout.strip()
                  for image in (SERVER_IMAGE, CLIENT_IMAGE)}
        again = time.monotonic()
        status = _up(engine, project, tmp_path / "up-2.log")
        output = (tmp_path / "up-2.log").read_text()
        assert status == 0, output[-5000:]
        assert {s: st["ExitCode"] for s, st in _containers(engine).items()} == dict.fromkeys(compose["services"], 0)
        assert "Step 1/" not in output and images == {
            image: engine.docker("image", "inspect", image, "--format", "{{.Id}}").stdout.strip() for image in images}
        assert "kept the certificates" in " ".join(_lines(output, "certs"))
        assert "kept runs/resnet18-fashion.pt" in " ".join(_lines(output, "backbone"))
        assert read_rounds(log)[-1]["round"] == 3 and json.loads(log.read_text().splitlines()[-1])["event"] == "end"
        print(f"second docker compose up (reused, 3 rounds): {time.monotonic() - again:.0f} s")
    finally:
        down = subprocess.run([*engine.compose, "down", "--volumes", "--remove-orphans", "--timeout", "5"],
                              cwd=project, env=engine.env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.strip() == ""
    assert PROJECT not in engine.docker("network", "ls", "--format", "{{.Name}}").stdout
    assert PROJECT not in engine.docker("volume", "ls", "--format", "{{.Name}}").stdout
    engine.docker("image", "prune", "-f", check=False)  # the build's intermediate layers; the role images stay
    print(f"compose stage: {time.monotonic() - started:.0f} s")
