"""Real processes for the deployment tests: start them, know their whole tree, stop every one by PID.

Shared by test_deploy, test_faults and test_security (and anything else that starts the entries):
a test that starts a process stops it, and everything it started, and checks none is left.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil

from odl_fed.deploy.processes import flower_env, stop_tree

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict:
    """This checkout's package in every process (the venv may hold another checkout in editable mode),
    offline, the venv's bin on PATH (Flower starts flower-superexec by name), one thread each."""
    return flower_env({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def start(command: list[str], log: Path) -> subprocess.Popen:
    """``command`` run from the repository, its output (both streams) to ``log``; a client's Flower log
    goes beside it (``LOG.flower``), not into the repository's runs/."""
    if "odl_fed.client" in command and "--verbose" not in command and "--flower-log" not in command:
        command = [*command, "--flower-log", str(log.with_name(log.name + ".flower"))]
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


# pid -> when that process started, for every process a test saw: PIDs are reused (this machine's
# pid_max is 32768, and a test of real processes starts hundreds), so a PID names the process the test
# saw only while its start time matches.
_BORN: dict[int, float] = {}


def _note(process: psutil.Process) -> int:
    try:
        _BORN.setdefault(process.pid, process.create_time())
    except psutil.NoSuchProcess:
        pass
    return process.pid


def _same(pid: int) -> psutil.Process | None:
    """The process ``pid`` if it is still the one the test saw (not a later one given the same PID)."""
    try:
        process = psutil.Process(pid)
        born = _BORN.get(pid)
        return process if born is None or abs(process.create_time() - born) < 0.05 else None
    except psutil.NoSuchProcess:
        return None


def tree(process: subprocess.Popen) -> set[int]:
    """The process and all its descendants now (empty when it has ended)."""
    try:
        root = psutil.Process(process.pid)
        return {_note(root), *(_note(c) for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: set[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie is not)."""
    running = []
    for pid in pids:
        try:
            process = _same(pid)
            if process is not None and process.status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def describe(pids) -> list[str]:
    """Each of ``pids`` still running: its PID, parent, start time and command (for a failure's message)."""
    said = []
    for pid in pids:
        process = _same(pid)
        try:
            if process is not None:
                born = time.strftime("%H:%M:%S", time.localtime(process.create_time()))
                said.append(f"{pid} (parent {process.ppid()}, started {born}): {' '.join(process.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            pass
    return said


def stop_all(started: list[subprocess.Popen], pids: set[int], *, grace: float = 15) -> None:
    """Stop every started process's tree (plus ``pids`` seen earlier) and assert none is left.

    A SuperNode that Flower ended leaves its SuperExec to notice the parent is gone (it does, in
    seconds): ``grace`` is how long that may take."""
    for process in started:
        pids |= tree(process)
        stop_tree(process.pid)
    for process in started:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(pids)
    said = describe(left)
    for pid in left:  # said, then stopped: a failed check leaves nothing running either
        stop_tree(pid, timeout=5)
    assert left == [], f"processes still running: {said}"


def is_clientapp(process: psutil.Process) -> bool:
    """A ClientApp process under a client entry: Flower's ``flwr-clientapp`` (``--cold``), or a child the warm
    launcher forked for a message (its command line is the launcher's, and so is its parent's)."""
    command, parent = " ".join(process.cmdline()), process.parent()
    return "flwr-clientapp" in command or ("odl_fed.deploy.launcher" in command and parent is not None
                                           and "odl_fed.deploy.launcher" in " ".join(parent.cmdline()))
