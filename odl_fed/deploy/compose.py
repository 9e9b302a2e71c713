"""A Docker Compose file for a fleet: one server service, one service per client, and one-shot helpers.

``odl-fed compose --fleet configs/fleets/demo.yaml > docker-compose.yml`` (``make compose-file`` for the
committed one), then ``docker compose up``: that one command builds the images, makes what is missing
and runs the fleet to the end (the layout of Flower's own compose files: the certificates made by a
one-shot service into volumes, the server and the clients as services).

- An image per role (``ARG BASE`` in both): the server service builds ``server/Dockerfile``
  (:data:`SERVER_IMAGE`), the first client service ``clients/Dockerfile`` (:data:`CLIENT_IMAGE`),
  which every other client service runs (``pull_policy: never``: nothing comes from a registry).
- ``certs`` (one-shot, the server's image): ``odl-fed certs /certs --split`` makes the throwaway TLS
  material and node keys when they are missing or not whole, one share per volume (``certs-ca``,
  ``certs-server``, ``certs-node-<i>``), and keeps them otherwise; the server mounts its share, client
  ``i`` only ``ca.crt`` and ``node-i.key``; no container but this one sees ``ca.key``.
  ``--insecure`` writes a plaintext fleet instead (no certs service; both entries then warn).
- ``backbone`` (one-shot, the server's image; with ``--backbone``): the job's pretrained weights, made
  by ``odl-fed pretrain ... --if-missing`` into the run directory's volume when they are not there.
- ``server`` starts once both ended with status 0 and runs ``python -m odl_fed.server`` with the SuperLink
  on the project's own network (``fleet``); its healthcheck is the SuperLink's port answering with
  every node key registered, and the clients start once it is.
- One service per client (``rpi4-0``, ``rpi4-1``, ...: each needs its own ``partition-id``, which
  ``deploy.replicas`` cannot give), running ``python -m odl_fed.client --device NAME``; Flower's own
  lines go to a file under ``runs/clients/``, each round is one plain line.
- ``mem_limit`` is the device's RAM (``ram`` in its profile): the container stands for the whole
  board, whose Python, torch, Flower and training must all fit in it. What training may use
  (``train-memory``) is the MemoryGuard's budget inside, cut further when the limit leaves less.
  A device whose RAM cannot hold Python, torch and Flower at all (``tiny``: 2 MiB) gets the floor
  (``--memory-floor``, 2 GiB): its client starts, and its plan refuses it every round, as in
  simulation. ``cpus`` is the profile's cores, at most the CPUs of the machine that runs it
  (``--max-cpus``; Docker refuses more).
- Bind mounts are only directories a clone always has: ``./runs`` (kept in git by ``runs/.gitkeep``;
  the round log, the report and the backbone land there on the host) and the fleet file's directory.
  Nothing is mounted that may not exist, so Docker never makes a directory where a file belongs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

import yaml

from odl_fed.config.fleet import FleetSpec, load_fleet
from odl_fed.deploy.processes import READY, SERVER_HOME
from odl_fed.schema import DEFAULT_PORT

__all__ = ["ComposeError", "compose_file", "render", "MEMORY_FLOOR", "DOCKER_MIN_MEMORY", "SERVER_PORT",
           "SERVER_IMAGE", "CLIENT_IMAGE", "CERTS_DIR", "ONE_SHOT"]

SERVER_IMAGE = "odl-fed-server:latest"  # server/Dockerfile
CLIENT_IMAGE = "odl-fed-client:latest"  # clients/Dockerfile
SERVER_PORT = DEFAULT_PORT  # the SuperLink's, inside the compose network
APP_DIR = PurePosixPath("/app")
CERTS_DIR = "certs"  # where each container sees its share of the certificates (under APP_DIR)
ONE_SHOT = ("certs", "backbone")  # services that make what is missing, then exit 0
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
                 max_cpus: float | None = None, round_timeout: float | None = None, insecure: bool = False,
                 backbone: list[str] | None = None) -> dict:
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

    secure = not insecure
    certs_dir = APP_DIR / CERTS_DIR

    def share(name: str) -> list[str]:  # one named volume per share of the certificates, read-only
        return [f"certs-{name}:{certs_dir}:ro"] if secure else []

    server_command = ["python", "-m", "odl_fed.server", "--fleet", str(fleet_rel), "--out-dir", str(out),
                      "--listen", f"0.0.0.0:{SERVER_PORT}"]
    server_command += ["--certs", CERTS_DIR] if secure else ["--insecure"]
    if devices_rel is not None:
        server_command += ["--devices", str(devices_rel)]
    if round_timeout is not None:
        server_command += ["--round-timeout", f"{round_timeout:g}"]
    services: dict = {}
    made_first = {}
    if secure:
        nodes = [str(i) for i in range(fleet.num_clients)]
        services["certs"] = {
            "image": SERVER_IMAGE, "pull_policy": "never",
            "command": ["python", "-m", "odl_fed.cli", "certs", "/certs", "--split", "--nodes", str(len(nodes)),
                        "--host", "server"],
            "volumes": [f"certs-{name}:/certs/{name}" for name in ("ca", "server", *(f"node-{n}" for n in nodes))],
            "network_mode": "none",
            "labels": {"odl-fed.role": "one-shot"},
        }
        made_first["certs"] = {"condition": "service_completed_successfully"}
    if backbone is not None:
        if fleet.job.weights is None:
            raise ComposeError(f"--backbone makes the job's weights, but {fleet_path} names no job.weights")
        if not str(_relative(Path(fleet.job.weights), "job.weights")).startswith("runs/"):
            raise ComposeError(f"--backbone writes under runs/ (the run directory's volume), but {fleet_path}: "
                               f"job.weights is {fleet.job.weights}")
        services["backbone"] = {
            "image": SERVER_IMAGE, "pull_policy": "never",
            "command": ["python", "-m", "odl_fed.cli", "pretrain", *backbone, "--out", str(fleet.job.weights),
                        "--if-missing"],
            "volumes": [v for v in volumes if v.startswith("./runs:")],
            "network_mode": "none",
            "labels": {"odl-fed.role": "one-shot"},
        }
        made_first["backbone"] = {"condition": "service_completed_successfully"}
    services["server"] = {
        "build": _build(context, "server/Dockerfile"),
        "image": SERVER_IMAGE,
        "command": server_command,
        **({"depends_on": made_first} if made_first else {}),
        "volumes": volumes + share("server"),
        "networks": ["fleet"],
        # ready: the SuperLink answers and every node key is registered (a node that came earlier is refused)
        "healthcheck": {"test": ["CMD", "python", "-c", f"import os, socket, sys; socket.create_connection(("
                                                        f"'127.0.0.1', {SERVER_PORT}), 2); "
                                                        f"sys.exit(not os.path.exists('{out / SERVER_HOME / READY}'))"],
                        "interval": "3s", "timeout": "5s", "retries": 100, "start_period": "5s"},
        "labels": {"odl-fed.role": "server"},
    }
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
            command += (["--root-certificates", f"{CERTS_DIR}/ca.crt", "--auth-key",
                         f"{CERTS_DIR}/node-{partition_id}.key"] if secure else ["--insecure"])
            services[f"{profile.name}-{partition_id}"] = {
                # the first client builds the clients' image; the others run it once built
                **({"build": _build(context, "clients/Dockerfile")} if partition_id == 0 else {"pull_policy": "never"}),
                "image": CLIENT_IMAGE,
                "command": command,
                "depends_on": {"server": {"condition": "service_healthy"}},
                "mem_limit": _memory(memory),
                "cpus": cpus,
                "environment": {"OMP_NUM_THREADS": str(max(1, int(cpus)))},  # torch's threads: its cpus
                "volumes": volumes + share(f"node-{partition_id}"),
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
    compose = {"services": services, "networks": {"fleet": {"driver": "bridge"}}}
    if secure:
        compose["volumes"] = {f"certs-{name}": {} for name in ("ca", "server", *(f"node-{i}" for i in
                                                                               range(fleet.num_clients)))}
    return compose


def render(compose: dict, *, command: str) -> str:
    """The compose file's text, with a header saying how it was made."""
    services = compose.get("services", {})
    made = [what for service, what in (("certs", "the throwaway TLS material and node keys, in volumes"),
                                       ("backbone", "the backbone")) if service in services]
    header = (f"# Generated by `{command}`: regenerate it rather than edit it.\n"
              "# `docker compose up` is the one command: it builds the server's and the clients' images,\n" +
              (f"# makes what is missing ({'; '.join(made)}),\n" if made else "") +
              "# and runs the fleet to the end, each client limited to its device's RAM and cores; the round\n"
              "# log and the report land in ./runs. See docs/deployment.md.\n" +
              ("" if "certs" in services else
               "# Plaintext, any node may join (--insecure): a trusted dev network only.\n"))
    return header + yaml.dump(compose, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=None)


class _Dumper(yaml.SafeDumper):
    """Writes every service's settings out in full (no ``&id001`` anchors a reader has to follow)."""

    def ignore_aliases(self, data) -> bool:
        return True
