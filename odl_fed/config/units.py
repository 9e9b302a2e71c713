"""Sizes as people write them in profiles, fleets and on the command line: ``200KB``, ``1.5MiB``."""

from __future__ import annotations

import math
import re

__all__ = ["parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: str | int | float, *, what: str = "budget", allow_zero: bool = False) -> int:
    """``"200KB"`` -> 200000, ``"1.5MiB"`` -> 1572864, ``4096`` -> 4096 (KB = 1000 B, KiB = 1024 B)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive size like 200KB or 1.5MiB, but got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{what} must be a positive size like 200KB or 1.5MiB "
                             f"(units: {', '.join(u for u in _UNITS if u)}), but got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number):  # .inf and .nan in YAML
        raise ValueError(f"{what} must be a finite size like 200KB or 1.5MiB, but got {value!r}")
    nbytes = int(number * _UNITS[unit])
    if nbytes < 0 or (nbytes == 0 and not allow_zero):
        raise ValueError(f"{what} must be a positive size like 200KB or 1.5MiB, but got {value!r}")
    return nbytes
