"""The ServerApp's grid (odl_fed.federation.prompt_grid): replies pulled every 0.1 s, all else Flower's."""

from __future__ import annotations

import time

from flwr.app import Message, Metadata, RecordDict

from odl_fed.federation.prompt_grid import PromptGrid


def _reply(to: str) -> Message:
    return Message(RecordDict(), metadata=Metadata(run_id=1, message_id="", src_node_id=2, dst_node_id=1,
                                                   reply_to_message_id=to, group_id="", created_at=0.0, ttl=60.0,
                                                   message_type="train"))


class ReplyingLater:
    """A grid whose replies arrive one per pull from the third pull on (``silent``: never)."""

    def __init__(self, *, silent: bool = False):
        self.pulls, self.silent, self.node_ids = 0, silent, [7, 8]

    def get_node_ids(self):
        return self.node_ids

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.silent or self.pulls < 3:
            return []
        return [_reply(sorted(message_ids)[0])]


def test_replies_are_pulled_every_tenth_of_a_second_until_all_came():
    inner = ReplyingLater()
    grid = PromptGrid(inner)
    began = time.monotonic()
    replies = grid.send_and_receive([object(), object()], timeout=60)
    took = time.monotonic() - began
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert inner.pulls == 4 and took < 1.5  # Flower's deployed grid sleeps 3 s between pulls: 9 s here
    assert list(grid.get_node_ids()) == [7, 8]  # the rest is the wrapped grid's


def test_a_timeout_returns_what_came_and_a_zero_timeout_still_pulls_once():
    inner = ReplyingLater(silent=True)
    began = time.monotonic()
    assert PromptGrid(inner).send_and_receive([object()], timeout=0.5) == []
    assert 0.5 <= time.monotonic() - began < 1.5 and inner.pulls >= 4
    inner = ReplyingLater(silent=True)
    assert PromptGrid(inner).send_and_receive([object()], timeout=0) == [] and inner.pulls == 1
