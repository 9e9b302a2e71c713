"""Reading a run's round log (``RUN_DIR/rounds.jsonl``) for the dashboard: whole, or as it grows.

The recorder (:mod:`odl_fed.federation.recorder`) writes one JSON line per event: ``run``, then ``round``
for each evaluated round, then ``end``. A reader meets logs that are not so tidy: a run that
crashed leaves its last line cut; a directory reused by another fleet holds two runs; a resumed
run has a ``resume`` line between its rounds. :func:`load_run` reports what is there and says, in
:attr:`RunLog.warnings`, what it left out; it raises :class:`RunLogError` only when there is
nothing to report (no directory, no log, no round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from odl_fed.schema import EVENT, ROUND_LOG, Event, JobKey, RoundKey, RunKey

__all__ = ["LOG_NAME", "RunLog", "RunLogError", "LogFollower", "load_run", "find_runs"]

LOG_NAME = ROUND_LOG


class RunLogError(ValueError):
    """A run directory with nothing to report."""


@dataclass
class RunLog:
    """One run as its round log tells it."""

    path: Path
    run: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    end: dict | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def job(self) -> dict:
        return self.run.get(RunKey.JOB, {})

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def planned_rounds(self) -> int | None:
        rounds = self.job.get(JobKey.ROUNDS)
        return int(rounds) if isinstance(rounds, (int, float)) else None

    def add(self, event: dict) -> None:
        """Take one event of the log, in order (what a follower feeds in as the file grows)."""
        kind = event.get(EVENT)
        if kind == Event.RUN:
            if self.run and _identity(self.run) != _identity(event):
                dropped = len(self.rounds)
                self.warnings.append(
                    f"{self.path} holds two runs: {_describe(self.run)}, then {_describe(event)}; "
                    f"showing the last one ({dropped} round line(s) of the first left out)")
                self.rounds, self.end = [], None
            self.run = event
        elif kind == Event.ROUND:
            if not isinstance(event.get(RoundKey.ROUND), int) or not isinstance(event.get(RoundKey.GLOBAL), dict):
                self.warnings.append(f"{self.path}: a round line without a round number or global metrics, skipped")
                return
            kept = [r for r in self.rounds if r[RoundKey.ROUND] != event[RoundKey.ROUND]]
            if len(kept) != len(self.rounds):
                self.warnings.append(f"{self.path}: round {event[RoundKey.ROUND]} is logged twice; "
                                     f"showing the later line")
            self.rounds = sorted([*kept, event], key=lambda r: r[RoundKey.ROUND])
        elif kind == Event.END:
            self.end = event
        # other events (``resume``) carry no numbers the dashboard shows


def _identity(run: dict) -> tuple:
    return run.get(RunKey.FLEET), json.dumps(run.get(RunKey.JOB), sort_keys=True)


def _describe(run: dict) -> str:
    job = run.get(RunKey.JOB, {})
    return (f"fleet {run.get(RunKey.FLEET)} ({job.get(JobKey.METHOD)} on {job.get(JobKey.MODEL)}, "
            f"{job.get(JobKey.ROUNDS)} rounds)")


def _log_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"run directory {path} does not exist")
    if path.is_dir():
        log = path / LOG_NAME
        if not log.is_file():
            raise RunLogError(f"{path} holds no round log ({LOG_NAME}): not a run directory, or the run "
                              f"never started")
        return log
    return path


def load_run(path: str | Path) -> RunLog:
    """The run in ``path`` (a run directory or its ``rounds.jsonl``)."""
    log_path = _log_path(path)
    log = RunLog(path=log_path)
    lines = log_path.read_bytes().decode("utf-8", errors="replace").split("\n")
    complete = lines[-1] == ""  # the recorder ends every line; a crash mid-write leaves the last one open
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            last = number == len(lines) and not complete
            log.warnings.append(f"{log_path}: line {number} is cut" + (
                " (the run stopped while writing it); showing what came before" if last else "; skipped"))
            continue
        if isinstance(event, dict):
            log.add(event)
    if not log.rounds:
        raise RunLogError(f"{log_path} holds no finished round yet: nothing to report")
    if not log.run:
        log.warnings.append(f"{log_path} has no run line: the fleet and the job are unknown")
    if log.end is None:
        planned = log.planned_rounds
        log.warnings.append(f"{log_path}: the run has not ended (round {log.rounds[-1][RoundKey.ROUND]}"
                            + (f" of {planned})" if planned is not None else ")")
                            + ": still running, or stopped early")
    return log


def find_runs(path: str | Path) -> list[Path]:
    """``path`` if it is a run directory, else the run directories right under it (sorted)."""
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"run directory {path} does not exist")
    if path.is_file() or (path / LOG_NAME).is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / LOG_NAME).is_file()) if path.is_dir() else []
    if not runs:
        raise RunLogError(f"{path} holds no round log ({LOG_NAME}), nor do the directories under it")
    return runs


class LogFollower:
    """The events appended to a round log since the last :meth:`poll` (a live view's source).

    Reads only complete lines, so a line being written is picked up whole at the next poll; waits
    quietly for a log that does not exist yet.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._pending = b""

    def poll(self) -> list[dict]:
        try:
            with self.path.open("rb") as file:
                if file.seek(0, 2) < self._offset:  # replaced by a new run: start over
                    self.restart()
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self._offset += len(chunk)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        events = []
        for text in lines:
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def restart(self) -> None:
        """Read from the beginning again (the log was replaced by a new run)."""
        self._offset, self._pending = 0, b""
