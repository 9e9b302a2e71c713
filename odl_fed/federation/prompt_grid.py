"""The ServerApp's grid: the one Flower hands it, with replies pulled every 0.1 s instead of every 3 s.

Flower 1.42's deployed grid (``HttpGrid.send_and_receive``) pushes a round's messages, then pulls their
replies with a 3-second sleep between pulls, so a reply that lands just after a pull waits up to 3 s
more: on loopback that was about half of a warm deployed round (``python -m bench.deploy``). A SuperNode
that finds no message also sleeps 3 s before it asks again; that part stays Flower's.

:class:`PromptGrid` keeps everything of the grid it wraps and runs the same push-then-pull loop with
a short sleep, through Flower's public grid methods (``push_messages``, ``pull_messages``). The
simulation's in-memory grid already pulls every 0.1 s, so wrapping it changes nothing there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PromptGrid", "PULL_INTERVAL_S"]

PULL_INTERVAL_S = 0.1  # what Flower's in-memory grid (the simulation's) waits between pulls


class PromptGrid(Grid):
    """``grid`` with a ``send_and_receive`` that pulls replies every ``pull_interval`` seconds."""

    def __init__(self, grid: Grid, *, pull_interval: float = PULL_INTERVAL_S):
        self._grid = grid
        self.pull_interval = pull_interval

    # -- the wrapped grid's own ----------------------------------------------------------------
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)  # anything else the wrapped grid holds

    # -- the loop, with a short sleep ----------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` seconds passed (as
        Flower's grid does: it pulls at least once, and ``None`` waits for every reply)."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(message.metadata.reply_to_message_id for message in pulled)
            if not waiting or (end is not None and time.monotonic() >= end):
                return replies
            time.sleep(self.pull_interval)
