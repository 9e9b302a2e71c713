"""What the deployed entries share: addresses, Flower's commands and environment, and processes
started, watched and stopped by their PID.

The client entry (:mod:`odl_fed.client`) starts a SuperNode, the server entry
(:mod:`odl_fed.server`) a SuperLink and ``flwr run``; both stop what they started, and only that,
on exit, on an error and on Ctrl-C / SIGTERM. Nothing here imports Flower: its commands run as
processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from odl_fed.federation.flower_env import OFFLINE_ENV

__all__ = ["OFFLINE_ENV", "AddressError", "parse_address", "flower_command", "flower_env", "port_answers",
           "wait_for_port", "tls_problem", "speaks_tls", "free_port", "stop_tree", "Processes", "TORCH_ADDRESS_FLOOR",
           "SERVER_HOME", "READY"]

# Address space a process needs to import torch at all (measured: ~3.1 GiB of mappings before any
# tensor exists); a hard RLIMIT_AS cap is the memory budget plus this, never the budget alone.
TORCH_ADDRESS_FLOOR = int(3.5 * 2**30)

# The server's Flower home, under its run directory, and the file in it that says the SuperLink
# answers and every node key is registered (what a compose healthcheck waits for).
SERVER_HOME = "flwr-home"
READY = "ready"

_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


class AddressError(ValueError):
    """An address that is not HOST:PORT."""


def parse_address(text: str, *, what: str = "--superlink") -> tuple[str, int]:
    """``"127.0.0.1:9092"`` -> ``("127.0.0.1", 9092)``; anything else raises :class:`AddressError`."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:9092), but got {text!r}")
    return host.strip("[]"), int(port)


def flower_command(name: str) -> str:
    """The path of one of Flower's commands, next to this Python first (the venv's ``bin``)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"Flower's {name} command is not installed (pip install 'flwr>=1.42')")
    return found


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, offline, with this Python's ``bin`` first on PATH (Flower starts its own
    ``flwr-*`` processes by name) and this checkout's package importable in every child."""
    package_root = str(Path(__file__).resolve().parents[2])
    python_path = os.environ.get("PYTHONPATH", "")
    if package_root not in python_path.split(os.pathsep):
        python_path = os.pathsep.join(p for p in (package_root, python_path) if p)
    return os.environ | OFFLINE_ENV | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"} | dict(extra or {})


def port_answers(host: str, port: int, *, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen | None = None) -> bool:
    """Wait until ``host:port`` answers; False after ``timeout`` s or when ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_answers(host, port, timeout=min(1.0, max(deadline - time.monotonic(), 0.05))):
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


# OpenSSL's verify codes, and what they usually mean for a fleet's files.
_VERIFY_HINTS = {20: " (it was signed by another CA: give the ca.crt of the same `odl-fed certs` run)",
                 10: " (make new ones: odl-fed certs DIR --force)",
                 62: " (the server certificate does not name this host: odl-fed certs DIR --host HOST)"}


def tls_problem(host: str, port: int, *, ca: Path, timeout: float = 5.0) -> str | None:
    """Why a TLS connection to ``host:port`` checked against the CA certificate ``ca`` fails (the
    words of OpenSSL's verdict: "certificate has expired", ...), or None when it succeeds."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as error:
        hint = _VERIFY_HINTS.get(error.verify_code, "")
        return f"its certificate does not verify against {ca}: {error.verify_message}{hint}"
    except ssl.SSLError as error:
        return f"no TLS there ({error.reason or error}; was it started with --insecure?)"
    except OSError as error:
        return f"no TLS connection ({error})"


def speaks_tls(host: str, port: int, *, timeout: float = 5.0) -> bool:
    """True when ``host:port`` completes a TLS handshake (whatever its certificate)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, context.wrap_socket(sock):
            return True
    except OSError:  # ssl.SSLError included
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a SuperNode's own ClientApp I/O port)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_tree(pid: int, *, timeout: float = 10.0) -> list[int]:
    """Stop the process ``pid`` and every process under it (SIGTERM, then SIGKILL after ``timeout``);
    returns the PIDs that were running."""
    try:
        root = psutil.Process(pid)
        processes = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in processes]


class Processes:
    """The processes an entry started: stopped by PID (with their children) when the block ends,
    however it ends; SIGTERM is turned into ``KeyboardInterrupt`` meanwhile, so a container's stop
    and a user's Ctrl-C take the same way out."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []
        self._previous = None

    def start(self, command: Sequence[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(list(command), **kwargs)
        self.started.append(process)
        return process

    def __enter__(self) -> Processes:
        try:
            self._previous = signal.signal(signal.SIGTERM, _interrupt)
        except ValueError:  # not the main thread: the caller handles signals
            self._previous = None
        return self

    def stop(self) -> None:
        for process in reversed(self.started):
            stop_tree(process.pid)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
