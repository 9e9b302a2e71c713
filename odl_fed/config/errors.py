"""The config layer's errors: each names the file and the field that cannot run."""

from __future__ import annotations

__all__ = ["FleetError", "JobError"]


class FleetError(ValueError):
    """A fleet file that cannot run; the message names the file and the field."""


class JobError(FleetError):
    """A fleet's ``job`` that cannot run (a :class:`FleetError`: the message names the file and the field)."""
