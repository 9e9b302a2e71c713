"""A run's checkpoint, so a server that stops (a crash, a SIGKILL, a power cut) goes on where it was.

After every evaluated round the server writes ``RUN_DIR/checkpoint.pt``: the round number, the
global trained layers, the strategy's state (FedAdam's moments), the round log's lines and the fleet
the run belongs to. It is written atomically: a temporary file in the same directory, flushed and
``fsync``-ed, then renamed over the old one and the directory ``fsync``-ed, so the previous
checkpoint stays whole until the new one is in place.

Two locks (``fcntl.flock``, released by the kernel when their process dies, so a killed server
leaves none behind) keep a second server off a run directory: ``server.lock``, held by the entry
point (``odl-fed simulate``, ``python -m odl_fed.server``) for its life, and ``writer.lock``, held
by the ServerApp that writes the round log and the checkpoint (in deployment, another process).

Torch and the standard library only: no Flower types here.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from odl_fed.config.fleet import FleetSpec
from odl_fed.config.job import JobSpec
from odl_fed.schema import CHECKPOINT_FILE, RoundKey, to_json_value

__all__ = ["Checkpoint", "CheckpointError", "RunLock", "RunDirInUse", "CHECKPOINT", "SERVER_LOCK", "WRITER_LOCK",
           "FORMAT_VERSION", "fleet_identity", "save_checkpoint", "load_checkpoint", "check_fleet_matches",
           "check_fresh_run_dir", "check_run_dir", "resume_config", "lock_holder"]

CHECKPOINT = CHECKPOINT_FILE
SERVER_LOCK = "server.lock"
WRITER_LOCK = "writer.lock"
# 1: round, planned rounds, finished, arrays, strategy state, run line, round lines, fleet, run config
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, damaged, another fleet's); the message names the file."""


class RunDirInUse(RuntimeError):
    """Another server holds the run directory."""


@dataclass
class Checkpoint:
    """The state of a run after its round ``round`` of ``rounds`` was evaluated and recorded.

    Parameters
    ----------
    round : int
        The last finished round (0: the starting model, evaluated).
    rounds : int
        The rounds the job plans.
    arrays : dict[str, Tensor]
        The global trained layers after that round.
    strategy : dict[str, dict[str, Tensor]]
        The strategy's state by attribute (FedAdam: ``m_t``, ``v_t``); empty for FedAvg and FedProx.
    run : dict
        The round log's ``run`` line.
    records : list[dict]
        The round log's ``round`` lines, rounds 0 to ``round``.
    fleet : dict
        :func:`fleet_identity` of the run's fleet.
    run_config : dict
        The run config the run was started with (its fleet file, devices file, directories).
    finished : bool (default: False)
        The job ended (its ``end`` line is written).
    """

    round: int
    rounds: int
    arrays: dict[str, Tensor]
    strategy: dict[str, dict[str, Tensor]]
    run: dict
    records: list[dict]
    fleet: dict
    run_config: dict
    finished: bool = False
    version: int = field(default=FORMAT_VERSION)


def fleet_identity(fleet: FleetSpec) -> dict:
    """What a run directory belongs to: every client's device profile and the job (not the file's path)."""
    return json.loads(json.dumps({"devices": [{"count": g.count, **asdict(g.profile)} for g in fleet.groups],
                                  "job": asdict(fleet.job)}))


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    payload = asdict(checkpoint)
    for key in ("run", "records", "fleet", "run_config"):  # plain JSON text: loadable with weights_only
        payload[key] = json.dumps(payload[key], default=to_json_value)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``; a missing, damaged or unknown file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: {path.parent} holds no run to resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict):
            raise TypeError(f"a {type(payload).__name__}, not a checkpoint's mapping")
        version = payload.get("version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {version!r}; this odl-fed reads "
                                  f"version {FORMAT_VERSION}")
        for key in ("run", "records", "fleet", "run_config"):
            payload[key] = json.loads(payload[key])
        checkpoint = Checkpoint(**payload)
    except CheckpointError:
        raise
    except Exception as error:  # torch.load fails in many ways on a damaged file (zip, pickle, EOF)
        raise CheckpointError(f"checkpoint {path} is damaged and cannot be read ({type(error).__name__}: "
                              f"{error}); the run cannot be resumed from it") from error
    rounds = [line.get(RoundKey.ROUND) for line in checkpoint.records]
    if rounds != list(range(checkpoint.round + 1)):
        raise CheckpointError(f"checkpoint {path} is damaged: round {checkpoint.round} with the records of "
                              f"rounds {rounds}")
    return checkpoint


def check_fleet_matches(checkpoint: Checkpoint, identity: dict, *, path: str | Path, fleet: str | Path) -> None:
    """Raise :class:`CheckpointError` when the run at ``path`` belongs to a fleet other than ``identity``.

    A job field the checkpoint predates (one added to :class:`JobSpec` since) counts as its default.
    """
    defaults = {f.name: f.default for f in fields(JobSpec) if f.default is not MISSING}
    saved = {**defaults, **checkpoint.fleet["job"]}
    if saved == identity["job"] and checkpoint.fleet["devices"] == identity["devices"]:
        return
    differ = [f"job.{k}" for k in sorted(set(saved) | set(identity["job"])) if saved.get(k) != identity["job"].get(k)]
    if checkpoint.fleet["devices"] != identity["devices"]:
        differ.insert(0, "devices")
    raise CheckpointError(f"checkpoint {path} belongs to another fleet than {fleet} (they differ in "
                          f"{', '.join(differ)}): resume it with the fleet it was started with, or start "
                          f"this fleet in another run directory")


def check_fresh_run_dir(run_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` when a new run would overwrite an unfinished (or unreadable) one."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; a new run would overwrite its run directory: move or delete "
                              f"{path} first, or choose another out-dir") from None
    if not checkpoint.finished:
        raise CheckpointError(f"{run_dir} holds an unfinished run (checkpoint {path}: round {checkpoint.round} "
                              f"of {checkpoint.rounds}): resume it with --resume {run_dir}, or choose another "
                              f"out-dir")


def check_run_dir(run_dir: str | Path, fleet: FleetSpec, *, resume: bool,
                  writer_lock: bool = True) -> Checkpoint | None:
    """What a server may do in ``run_dir``: with ``resume``, the checkpoint to go on from (readable, of
    ``fleet``, of an unfinished run); without, None once sure a new run loses nothing there.

    Raises :class:`CheckpointError` naming the file, and :class:`RunDirInUse` while another server
    writes there (unless ``writer_lock`` is False: the caller is that writer); reads only, so a refused
    run changes nothing.
    """
    run_dir = Path(run_dir)
    if writer_lock and (run_dir / WRITER_LOCK).exists():
        RunLock(run_dir, WRITER_LOCK).acquire().release()  # raises while a server writes there
    if not resume:
        check_fresh_run_dir(run_dir)
        return None
    path = run_dir / CHECKPOINT
    checkpoint = load_checkpoint(path)
    check_fleet_matches(checkpoint, fleet_identity(fleet), path=path, fleet=fleet.path)
    if checkpoint.finished:
        raise CheckpointError(f"checkpoint {path}: the run finished all its {checkpoint.rounds} rounds; "
                              f"there is nothing to resume")
    return checkpoint


def resume_config(run_dir: str | Path) -> dict:
    """The run config of the run in ``run_dir`` (its fleet and devices file), read from its checkpoint."""
    return dict(load_checkpoint(Path(run_dir) / CHECKPOINT).run_config)


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN_DIR/NAME`` for as long as the ``with`` block runs.

    The lock file holds the holder's PID; the kernel drops the lock when the process ends, however it
    ends, so there is never a stale lock to clean up.
    """

    def __init__(self, run_dir: str | Path, name: str = SERVER_LOCK):
        self.path = Path(run_dir) / name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.path)
            raise RunDirInUse(f"run directory {self.path.parent} is in use by another server "
                              f"({'PID ' + holder if holder else 'PID unknown'}, lock {self.path}): wait for it "
                              f"to end or stop it, or choose another out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(path: str | Path) -> str:
    """The PID written in a lock file, or ``""``."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
