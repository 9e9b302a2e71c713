"""Flower's side of a process: its offline environment, its log lines, and the notices a fleet's user
need not read. Only the layers that run Flower (federation, deploy) use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OFFLINE_ENV", "FLOWER_LOG", "offline", "flower_log_file", "known_notices_hidden"]

# Flower, Ray and HuggingFace datasets with nothing to fetch: no telemetry, no update check, no
# installation of an app's dependencies, no dataset download.
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_DATASETS_OFFLINE": "1",
               "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
FLOWER_LOG = "flower.log"  # Flower's own lines, in the run directory


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """:data:`OFFLINE_ENV` in this process's environment (and so its children's) meanwhile; what was
    there before comes back after."""
    before = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _KnownNotices(logging.Filter):
    """Drops two warnings that say nothing to a fleet's user: this entry point is the documented
    reason for using ``run_simulation``, and the server evaluates the global model itself."""

    NOTICES = ("`run_simulation` function is deprecated", "This is a deprecated feature",
               "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


@contextlib.contextmanager
def known_notices_hidden() -> Iterator[None]:
    """Flower's logger drops :class:`_KnownNotices` meanwhile (one filter, removed after)."""
    logger, notices = logging.getLogger("flwr"), _KnownNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)


@contextlib.contextmanager
def flower_log_file(path: str | Path) -> Iterator[Path]:
    """Flower's log lines (its ``flwr`` logger, INFO and up) go to ``path`` instead of the
    terminal meanwhile; errors still show there too."""
    logger = logging.getLogger("flwr")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    consoles = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in consoles]
    previous_level = logger.level
    for console in consoles:
        console.setLevel(logging.ERROR)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(previous_level)
        for console, level in zip(consoles, levels):
            console.setLevel(level)
