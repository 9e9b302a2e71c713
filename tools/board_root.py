"""An emulated Raspberry Pi 4 on this machine: an arm64 Debian root run under qemu-user (``make test-board``).

What the board test needs, each step checked, nothing left behind on the host:

- the host's tools, installed with apt-get only when missing (``qemu-user-static``, ``binfmt-support``,
  ``debootstrap``), ``binfmt_misc`` mounted and its ``qemu-aarch64`` entry enabled, so aarch64
  binaries run transparently (the entry's ``F`` flag: the interpreter is the host's, a chroot needs
  no copy of it);
- the root: ``debootstrap --arch=arm64 --variant=minbase`` of Debian bookworm with python3, its venv
  module and the CA certificates, from the mirror in apt's sources, kept as a tarball in the cache
  (as :func:`tools.docker_engine.base_image` keeps the compose stage's base) and unpacked per run;
  the host's CA bundle copied in (pip inside verifies TLS with it: ``PIP_CERT``);
- a command run inside it as a Raspberry Pi 4 would run it: in a private mount namespace
  (``unshare --mount --propagation private``) that mounts ``/proc``, ``/dev`` and ``/sys`` into the
  root and a Pi 4's ``/proc/cpuinfo`` over the root's, then ``chroot``, with ``QEMU_CPU=cortex-a72``
  (qemu's default CPU model has ARMv8.1 instructions a Pi 4's core lacks, so code that dies on a Pi 4
  runs under it). The mounts live only in that namespace: they go when its last process ends, and
  the host's mount table never holds them (:meth:`Board.host_mounts` checks).

The root shares the host's network: a client inside reaches a server on the host's 127.0.0.1.
Where binfmt_misc or qemu cannot be set up (not root, no apt-get, no binfmt_misc in the kernel), the
functions raise :class:`BoardUnavailable` with the reason, and a test skips with it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tools.docker_engine import EngineUnavailable, _debian_mirror

__all__ = ["BoardUnavailable", "Board", "host_ready", "make_board", "PI4_CPUINFO", "PI5_CPUINFO", "CACHE",
           "ROOT_TARBALL"]

CACHE = Path(os.environ.get("ODL_FED_CACHE", "/var/cache/odl-fed"))
ROOT_TARBALL = "board-root-arm64-bookworm.tar"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HOST_PACKAGES = {"qemu-user-static": "/usr/bin/qemu-aarch64-static", "binfmt-support": "/usr/sbin/update-binfmts",
                 "debootstrap": "/usr/sbin/debootstrap"}
ROOT_PACKAGES = "python3,python3-venv,ca-certificates"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _pi4_cpuinfo(cores: int = 4) -> str:
    """/proc/cpuinfo of a Raspberry Pi 4 Model B on a 64-bit kernel: four Cortex-A72 (part 0xd08), no atomics."""
    core = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
            "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
            "CPU revision\t: 3\n\n")
    return "".join(core.format(i=i) for i in range(cores)) + (
        "Hardware\t: BCM2835\nRevision\t: c03111\nSerial\t\t: 100000000badc0de\n"
        "Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n")


def _pi5_cpuinfo(cores: int = 4) -> str:
    """/proc/cpuinfo of a Raspberry Pi 5 Model B: four Cortex-A76 (part 0xd0b), with the ARMv8.1 atomics."""
    core = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
            "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
            "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n")
    return "".join(core.format(i=i) for i in range(cores)) + (
        "Revision\t: d04170\nSerial\t\t: 100000000badc0de\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")


PI4_CPUINFO = _pi4_cpuinfo()
PI5_CPUINFO = _pi5_cpuinfo()


class BoardUnavailable(RuntimeError):
    """No emulated board can run here; the message says why."""


def _run(command, *, timeout: float = 600, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


def _install_host_packages() -> None:
    """The Debian packages of HOST_PACKAGES that are missing (apt-get as root), as docker_engine does for docker.io."""
    missing = [name for name, path in HOST_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise BoardUnavailable(f"{', '.join(missing)} not installed, and no apt-get as root to install them")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        done = _run(command, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            raise BoardUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


def host_ready(*, install: bool = True) -> None:
    """qemu-user-static, binfmt_misc mounted and its aarch64 entry enabled (with the F flag), or BoardUnavailable."""
    if os.geteuid() != 0:
        raise BoardUnavailable("binfmt_misc, mounts and chroot need root")
    if install:
        _install_host_packages()
    if not BINFMT.is_dir():
        raise BoardUnavailable(f"{BINFMT} does not exist: the kernel has no binfmt_misc")
    if not (BINFMT / "register").exists():
        done = _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        if done.returncode != 0:
            raise BoardUnavailable(f"mount -t binfmt_misc failed: {done.stderr.strip()[-300:]}")
    entry = BINFMT / "qemu-aarch64"
    if not entry.is_file() or not entry.read_text().startswith("enabled"):
        done = _run(["update-binfmts", "--enable", "qemu-aarch64"])
        if done.returncode != 0 or not entry.is_file():
            said = (done.stderr or done.stdout)[-300:]
            raise BoardUnavailable(f"update-binfmts --enable qemu-aarch64 failed: {said}")
    text = entry.read_text()
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if not text.startswith("enabled") or "F" not in flags:
        raise BoardUnavailable(f"binfmt_misc's qemu-aarch64 entry is not usable in a chroot (needs enabled and the "
                               f"F flag): {text.strip()}")


def _debootstrap(target: Path) -> None:
    try:
        mirror = _debian_mirror()
    except EngineUnavailable as error:
        raise BoardUnavailable(str(error)) from None
    done = _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={ROOT_PACKAGES}", "bookworm",
                 str(target), mirror], timeout=1800)
    if done.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-800:] if log.is_file() else done.stderr[-800:]
        raise BoardUnavailable(f"debootstrap --arch=arm64 failed: {tail}")
    shutil.rmtree(target / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (target / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)


def _unpack(tarball: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = _run(["tar", "-C", str(target), "--numeric-owner", "-xpf", str(tarball)], timeout=900)
    if done.returncode != 0:
        raise BoardUnavailable(f"unpacking {tarball} failed: {done.stderr.strip()[-300:]}")


def _pack(source: Path, tarball: Path) -> None:
    """``source`` as ``tarball``, written whole or not at all (a run stopped midway leaves no half cache)."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}")
    done = _run(["tar", "-C", str(source), "--numeric-owner", "-cf", str(partial), "."], timeout=900)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BoardUnavailable(f"packing {source} failed: {done.stderr.strip()[-300:]}")
    partial.replace(tarball)


@dataclass
class Board:
    """An arm64 root on the host's disk, and how to run a command inside it as a given board.

    ``cpu`` is qemu's CPU model (``cortex-a72``: a Raspberry Pi 4; ``cortex-a76``: a Pi 5) and
    ``cpuinfo`` what the board's ``/proc/cpuinfo`` says."""

    root: Path
    cpu: str = "cortex-a72"
    cpuinfo: str = PI4_CPUINFO
    # Scheduling priority of everything run inside. Flower gives a freshly started ClientApp 30 s to
    # report to its SuperNode (the task token's first heartbeat); under emulation, importing Flower
    # alone took 20-49 s here with other work on the 2 cores (a load of 18-20), so the board's
    # processes go first. A real Pi 4 starts one in seconds.
    nice: int = -10

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self._cpuinfo_file = self.root / "etc" / "odl-fed-cpuinfo"
        self._cpuinfo_file.write_text(self.cpuinfo)

    def env(self, extra: dict | None = None) -> dict[str, str]:
        """The environment of a process inside: a clean one with the board's CPU for qemu and the root's CA bundle."""
        return {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": self.cpu,
                "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                **(extra or {})}

    def command(self, argv: list[str], *, cwd: str = "/") -> list[str]:
        """``argv`` run inside the root, in a private mount namespace holding the board's mounts.

        The mounts are made by the host's ``sh`` in the new namespace, then ``chroot`` runs ``argv``
        there (with ``exec`` all the way: the PID that starts is the PID of ``argv``), at ``nice``."""
        r = shlex.quote(str(self.root))
        mounts = (f"mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && mount --rbind /sys {r}/sys && "
                  f"mount --bind {shlex.quote(str(self._cpuinfo_file))} {r}/proc/cpuinfo")
        inside = f"cd {shlex.quote(cwd)} && exec \"$@\""
        script = f"set -e; {mounts}; exec /usr/sbin/chroot {r} /bin/sh -c {shlex.quote(inside)} sh " + \
            " ".join(shlex.quote(a) for a in argv)
        return ["/usr/bin/nice", "-n", str(self.nice), "/usr/bin/unshare", "--mount", "--propagation", "private",
                "/bin/sh", "-c", script]

    def run(self, argv: list[str], *, cwd: str = "/", env: dict | None = None, timeout: float = 600,
            **kwargs) -> subprocess.CompletedProcess:
        return _run(self.command(argv, cwd=cwd), env=self.env(env), timeout=timeout, **kwargs)

    def start(self, argv: list[str], log: Path, *, cwd: str = "/", env: dict | None = None) -> subprocess.Popen:
        """``argv`` started inside, its output (both streams) to ``log``."""
        return subprocess.Popen(self.command(argv, cwd=cwd), env=self.env(env), stdout=log.open("w"),
                                stderr=subprocess.STDOUT)

    def host_mounts(self) -> list[str]:
        """Mount points under the root that the host's mount table holds (none, when all is well)."""
        prefix = str(self.root) + "/"
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return [p for p in points if p == str(self.root) or p.startswith(prefix)]

    def remove(self) -> None:
        """Delete the root, after undoing any mount the host holds under it (deepest first)."""
        for point in sorted(self.host_mounts(), key=len, reverse=True):
            _run(["umount", "-l", point])
        if self.host_mounts():
            raise BoardUnavailable(f"mounts under {self.root} are still there; not removing it: {self.host_mounts()}")
        shutil.rmtree(self.root, ignore_errors=True)


def make_board(directory: Path, *, cache: Path | None = CACHE, cpu: str = "cortex-a72",
               cpuinfo: str = PI4_CPUINFO) -> tuple[Board, float]:
    """A fresh arm64 root in ``directory`` (unpacked from the cache's tarball, else made with debootstrap
    and cached), with the host's CA bundle and resolver; returns it and the seconds making it took."""
    started = time.monotonic()
    host_ready()
    tarball = None if cache is None else cache / ROOT_TARBALL
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    if tarball is not None and tarball.is_file():
        _unpack(tarball, directory)
    else:
        _debootstrap(directory)
        if tarball is not None:
            _pack(directory, tarball)
    if HOST_CA_BUNDLE.is_file():  # pip inside verifies the registries' TLS with the host's bundle
        shutil.copyfile(HOST_CA_BUNDLE, directory / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    resolv = directory / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    if Path("/etc/resolv.conf").is_file():
        shutil.copyfile("/etc/resolv.conf", resolv)
    board = Board(directory, cpu=cpu, cpuinfo=cpuinfo)
    done = board.run(["/bin/uname", "-m"], timeout=120)
    if done.returncode != 0 or done.stdout.strip() != "aarch64":
        raise BoardUnavailable(f"an aarch64 binary does not run in the root under qemu: {done.stdout}{done.stderr}")
    return board, time.monotonic() - started

