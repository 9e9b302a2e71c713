"""A Docker Compose file for a fleet: one server service and one service per client.

``odl-fed compose --fleet configs/fleets/demo.yaml > docker-compose.yml``, then ``docker compose up``.

- An image per role (``ARG BASE`` in both): the server service builds ``server/Dockerfile``
  (:data:`SERVER_IMAGE`), the first client service ``clients/Dockerfile`` (:data:`CLIENT_IMAGE`),
  which every other client service runs (``pull_policy: never``: nothing comes from a registry).
- ``server`` runs ``python -m odl_fed.server`` with the SuperLink on the project's own network
  (``fleet``); its healthcheck is the SuperLink's port answering, and the clients start once it is.
- One service per client (``rpi4-0``, ``rpi4-1``, ...: each needs its own ``partition-id``, which
  ``deploy.replicas`` cannot give), running ``python -m odl_fed.client --device NAME``.
- ``mem_limit`` is the device's RAM (``ram`` in its profile): the container stands for the whole
  board, whose Python, torch, Flower and training must all fit in it. What training may use
  (``train-memory``) is the MemoryGuard's budget inside, cut further when the limit leaves less.
  A device whose RAM cannot hold Python, torch and Flower at all (``tiny``: 2 MiB) gets the floor
  (``--memory-floor``, 2 GiB): its client starts, and its plan refuses it every round, as in
  simulation. ``cpus`` is the profile's cores, at most the CPUs of the machine that runs it
  (``--max-cpus``; Docker refuses more).
- The run directory (``./runs``) and the fleet file's directory are volumes: the round log lands
  on the host, and the job's weights (under ``runs/``) reach every container.
- TLS and SuperNode authentication with the files of ``odl-fed certs certs --nodes N --host server``
  (``--certs``, default ``certs``): each file is its own read-only volume, so the server sees
  ``ca.crt``, ``server.crt``, ``server.key`` and every node's ``.pub`` (it registers them), and
  client ``i`` sees ``ca.crt`` and ``node-i.key`` only; no container sees ``ca.key``.
  ``--insecure`` writes a plaintext fleet instead (both entries then warn).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import yaml

from odl_fed.config.fleet import FleetSpec, load_fleet
from odl_fed.deploy.processes import READY, SERVER_HOME
from odl_fed.schema import DEFAULT_PORT

__all__ = ["ComposeError", "compose_file", "render", "certs_command", "MEMORY_FLOOR", "DOCKER_MIN_MEMORY",
           "SERVER_PORT", "SERVER_IMAGE", "CLIENT_IMAGE"]

SERVER_IMAGE = "odl-fed-server:latest"  # server/Dockerfile
CLIENT_IMAGE = "odl-fed-client:latest"  # clients/Dockerfile
SERVER_PORT = DEFAULT_PORT  # the SuperLink's, inside the compose network
APP_DIR = PurePosixPath("/app")
MEMORY_FLOOR = 2 * 2**30          # measured: SuperNode + SuperExec + a ClientApp with torch take ~1.5 GiB
DOCKER_MIN_MEMORY = 6 * 2**20     # the smallest mem_limit Docker accepts
_SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _build(context: str, dockerfile: str) -> dict:
    return {"context": context, "dockerfile": dockerfile, "args": {"BASE": "${ODL_FED_BASE:-python:3.11-slim}"}}


class ComposeError(ValueError):
    """A fleet whose services or limits cannot be written as a compose file; names the group."""


def _relative(path: Path, what: str) -> PurePosixPath:
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            raise ComposeError(f"{what} {path} is outside the compose project directory {Path.cwd()}: the "
                               f"containers see only what is under it (run odl-fed compose from there)") from None
    if ".." in path.parts:
        raise ComposeError(f"{what} {path} leaves the compose project directory")
    return PurePosixPath(path.as_posix())


def _memory(value: int) -> str:
    return f"{value // 2**20}m" if value % 2**20 == 0 else str(value)


def compose_file(fleet_path: Path, *, out_dir: str = "runs/compose", context: str = ".",
                 devices_file: Path | None = None, memory_floor: int = MEMORY_FLOOR,
                 max_cpus: float | None = None, round_timeout: float | None = None, certs: str = "certs",
                 insecure: bool = False) -> dict:
    """The compose file of ``fleet_path`` as a mapping (see the module doc for what it holds)."""
    fleet: FleetSpec = load_fleet(fleet_path, device_files=() if devices_file is None else (devices_file,))
    if memory_floor < DOCKER_MIN_MEMORY:
        raise ComposeError(f"--memory-floor must be at least {DOCKER_MIN_MEMORY // 2**20} MiB (Docker's smallest "
                           f"mem_limit), but got {memory_floor} B")
    max_cpus = float(max_cpus if max_cpus is not None else os.cpu_count() or 1)
    if max_cpus < 0.01:
        raise ComposeError(f"--max-cpus must be at least 0.01 (Docker's smallest cpus), but got {max_cpus}")
    fleet_rel = _relative(Path(fleet_path), "the fleet file")
    mounts = {"runs": "runs", str(fleet_rel.parent): str(fleet_rel.parent)}
    devices_rel = None
    if devices_file is not None:
        devices_rel = _relative(Path(devices_file), "the devices file")
        if devices_rel.parent != fleet_rel.parent:
            raise ComposeError(f"the devices file {devices_rel} must sit beside the fleet file ({fleet_rel.parent}/): "
                               f"that directory is what the containers see")
    if fleet.job.weights is not None:
        weights = _relative(Path(fleet.job.weights), f"{fleet_path}: job.weights")
        if not any(str(weights).startswith(f"{m}/") for m in mounts):
            raise ComposeError(f"{fleet_path}: job.weights {weights} must be under runs/ or {fleet_rel.parent}/, the "
                               f"directories the containers see")
    out = _relative(Path(out_dir), "--out-dir")
    if not str(out).startswith("runs/"):
        raise ComposeError(f"--out-dir must be under runs/ (the run directory's volume), but got {out}")
    volumes = [f"./{source}:{APP_DIR / target}" + ("" if source == "runs" else ":ro")
               for source, target in mounts.items()]

    certs_rel = None if insecure else _relative(Path(certs), "--certs")

    def mount(*names: str) -> list[str]:  # one read-only volume per certificate or key file
        return [] if certs_rel is None else [f"./{certs_rel / n}:{APP_DIR / certs_rel / n}:ro" for n in names]

    server_command = ["python", "-m", "odl_fed.server", "--fleet", str(fleet_rel), "--out-dir", str(out),
                      "--listen", f"0.0.0.0:{SERVER_PORT}"]
    server_command += ["--insecure"] if certs_rel is None else ["--certs", str(certs_rel)]
    if devices_rel is not None:
        server_command += ["--devices", str(devices_rel)]
    if round_timeout is not None:
        server_command += ["--round-timeout", f"{round_timeout:g}"]
    services = {"server": {
        "build": _build(context, "server/Dockerfile"),
        "image": SERVER_IMAGE,
        "command": server_command,
        "volumes": volumes + mount("ca.crt", "server.crt", "server.key",
                                   *(f"node-{i}.pub" for i in range(fleet.num_clients))),
        "networks": ["fleet"],
        # ready: the SuperLink answers and every node key is registered (a node that came earlier is refused)
        "healthcheck": {"test": ["CMD", "python", "-c", f"import os, socket, sys; socket.create_connection(("
                                                        f"'127.0.0.1', {SERVER_PORT}), 2); "
                                                        f"sys.exit(not os.path.exists('{out / SERVER_HOME / READY}'))"],
                        "interval": "3s", "timeout": "5s", "retries": 100, "start_period": "5s"},
        "labels": {"odl-fed.role": "server"},
    }}
    partition_id = 0
    for index, group in enumerate(fleet.groups):
        profile = group.profile
        if not _SERVICE_NAME.match(profile.name):
            raise ComposeError(f"{fleet_path}: devices[{index}]: device name {profile.name!r} cannot name a compose "
                               f"service (lower-case letters, digits, '.', '_' and '-' only)")
        memory = max(profile.ram, memory_floor)
        cpus = min(float(profile.cores), max_cpus)
        for _ in range(group.count):
            command = ["python", "-m", "odl_fed.client", "--device", profile.name, "--superlink",
                       f"server:{SERVER_PORT}", "--partition-id", str(partition_id),
                       "--num-partitions", str(fleet.num_clients)]
            if devices_rel is not None:
                command += ["--devices", str(devices_rel)]
            command += (["--insecure"] if certs_rel is None else
                        ["--root-certificates", str(certs_rel / "ca.crt"),
                         "--auth-key", str(certs_rel / f"node-{partition_id}.key")])
            services[f"{profile.name}-{partition_id}"] = {
                # the first client builds the clients' image; the others run it once built
                **({"build": _build(context, "clients/Dockerfile")} if partition_id == 0 else {"pull_policy": "never"}),
                "image": CLIENT_IMAGE,
                "command": command,
                "depends_on": {"server": {"condition": "service_healthy"}},
                "mem_limit": _memory(memory),
                "cpus": cpus,
                "environment": {"OMP_NUM_THREADS": str(max(1, int(cpus)))},  # torch's threads: its cpus
                "volumes": volumes + mount("ca.crt", f"node-{partition_id}.key"),
                "networks": ["fleet"],
                "healthcheck": {"test": ["CMD", "python", "-c", "import psutil, sys; sys.exit(not any("
                                         "'flower-supernode' in ' '.join(p.cmdline()) "
                                         "for p in psutil.process_iter()))"],
                                "interval": "5s", "timeout": "5s", "retries": 3},
                "labels": {"odl-fed.role": "client", "odl-fed.device": profile.name,
                           "odl-fed.memory": (f"device ram {profile.ram} B" if memory == profile.ram else
                                              f"floor {memory} B: the device's ram ({profile.ram} B) cannot hold "
                                              f"Python, torch and Flower; its plan refuses it")},
            }
            partition_id += 1
    return {"services": services, "networks": {"fleet": {"driver": "bridge"}}}


def certs_command(compose: dict) -> str | None:
    """The ``odl-fed certs`` command that makes the files a compose file mounts (None: plaintext)."""
    server = compose.get("services", {}).get("server", {}).get("command", [])
    if "--certs" not in server:
        return None
    return (f"odl-fed certs {server[server.index('--certs') + 1]} --nodes {len(compose['services']) - 1} "
            f"--host server")


def render(compose: dict, *, command: str) -> str:
    """The compose file's text, with a header saying how it was made."""
    make = certs_command(compose)
    header = (f"# Generated by `{command}`: regenerate it rather than edit it.\n"
              + ("# Plaintext, any node may join (--insecure): a trusted dev network only.\n" if make is None else
                 f"# TLS and node keys: run `{make}` first (throwaway dev certificates).\n") +
              "# `docker compose up` runs the fleet to the end (server + one container per client, each limited\n"
              "# to its device's RAM and cores); the round log lands in ./runs. See docs/deployment.md.\n")
    return header + yaml.dump(compose, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=None)


class _Dumper(yaml.SafeDumper):
    """Writes every service's settings out in full (no ``&id001`` anchors a reader has to follow)."""

    def ignore_aliases(self, data) -> bool:
        return True
