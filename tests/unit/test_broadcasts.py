"""Routing broadcasts to a consumer's own queues (kombu_pg/broadcasts.py): by binding, within TTL."""
from __future__ import annotations

import json

import pytest

from kombu_pg import broadcasts
from kombu_pg.broadcasts import Broadcasts, broadcast_channel


def note(routing_key: str, payload: str = '{"n": 1}', priority: int = 0) -> str:
    """As the publish_routed statement writes it."""
    return f"{priority}\n{json.dumps(routing_key)}\n{payload}"


def test_messages_go_to_the_queues_whose_bindings_match():
    b = Broadcasts("s")
    [events] = b.subscribe("gossip", [("celeryev", "worker.#", "topic")], ttl=2)
    b.subscribe("tasks", [("celeryev", "task.*", "topic")], ttl=2)
    [direct] = b.subscribe("replies", [("reply", "abc", "direct")], ttl=2)
    [fanout] = b.subscribe("all", [("bcast", "", "fanout")], ttl=2)
    assert events == broadcast_channel("s", "celeryev") != broadcast_channel("other", "celeryev")
    assert len(events) <= 63  # PostgreSQL's channel names

    assert b.receive(events, note("worker.heartbeat")) == {"gossip"}
    assert b.receive(events, note("task.sent.more")) == set()  # * is one word
    assert b.receive(events, note("task.sent", priority=3)) == {"tasks"}
    assert b.receive(direct, note("abcd")) == set()
    assert b.receive(direct, note("abc")) == {"replies"}
    assert b.receive(fanout, note("anything")) == {"all"}
    assert b.receive(broadcast_channel("s", "unknown"), note("worker.x")) == set()
    assert b.take("tasks") == [(3, '{"n": 1}')]
    assert b.take("tasks") == []


def test_the_payload_may_hold_newlines_and_the_key_anything():
    b = Broadcasts("s")
    [channel] = b.subscribe("q", [("x", "a\nb", "direct")], ttl=2)
    assert b.receive(channel, note("a\nb", payload='{"text": "line\\nline"}\n')) == {"q"}
    assert b.take("q") == [(0, '{"text": "line\\nline"}\n')]


def test_take_gives_the_oldest_first_up_to_a_limit():
    b = Broadcasts("s")
    [channel] = b.subscribe("q", [("x", "k", "direct")], ttl=2)
    for n in range(3):
        b.receive(channel, note("k", payload=str(n)))
    assert bool(b)
    assert b.take("q", 1) == [(0, "0")]
    assert b.take("q") == [(0, "1"), (0, "2")]
    assert not b


def test_what_outlives_the_queue_ttl_undelivered_is_dropped(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(broadcasts, "monotonic", lambda: clock[0])
    b = Broadcasts("s")
    [channel] = b.subscribe("q", [("x", "k", "direct")], ttl=2)
    b.receive(channel, note("k", payload="old"))
    clock[0] += 1.5
    b.receive(channel, note("k", payload="new"))
    clock[0] += 1.0  # "old" is 2.5 s old now, "new" 1 s
    assert b.take("q") == [(0, "new")]


@pytest.mark.parametrize("malformed", ["", "no newlines", "x\n\"k\"\n{}", "0\nnot json\n{}", "0\n5\n{}"])
def test_a_malformed_notification_is_dropped(malformed):
    b = Broadcasts("s")
    [channel] = b.subscribe("q", [("x", "k", "direct")], ttl=2)
    assert b.receive(channel, malformed) == set()
    assert not b


def test_an_unsubscribed_queue_gets_nothing_more():
    b = Broadcasts("s")
    [channel] = b.subscribe("q", [("x", "k", "direct")], ttl=2)
    b.receive(channel, note("k"))
    b.unsubscribe("q")
    assert b.receive(channel, note("k")) == set()
    assert b.take("q") == [] and not b
