"""Reading a benchmark's YAML settings: every mistake is one ``error:`` line naming the file and key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from odl_fed.config.suggest import did_you_mean

__all__ = ["read_settings", "check_keys"]


def read_settings(path: Path) -> dict:
    """The YAML mapping in ``path`` (empty file: ``{}``)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: benchmark config {path} does not exist") from None
    check_keys(str(path), raw, None)
    return raw


def check_keys(where: str, mapping: object, valid: Sequence[str] | None) -> None:
    """``mapping`` must be a mapping whose keys are all in ``valid`` (``None``: any key)."""
    if not isinstance(mapping, Mapping):
        raise SystemExit(f"error: {where}: expected a mapping of settings, got {type(mapping).__name__}")
    for key in mapping if valid is not None else ():
        if key not in valid:
            raise SystemExit(f"error: {where}: unknown setting {key!r}{did_you_mean(key, valid)}; "
                             f"valid: {', '.join(valid)}")
