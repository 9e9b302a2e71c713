"""The "(did you mean ...?)" hint that every user-facing name check gives."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(word: object, options: Iterable[object]) -> str:
    """``" (did you mean 'rpi4'?)"`` for the option nearest ``word``, or ``""`` when none is near."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
