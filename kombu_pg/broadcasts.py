"""Broadcasts without rows: short-lived broadcast queues get their messages as NOTIFY payloads.

Celery's gossip and event-receiver queues (auto-delete, not durable, messages expiring within
seconds) take every worker's heartbeat: stored as rows, N workers would write N x N rows per
heartbeat period and each consumer would claim its queue on a timer. Instead, once a consumer
of such a queue LISTENs on its exchange's broadcast channel, it marks the queue `via_notify`,
and a publish to the exchange sends the message ONCE as a notification (see the publish_routed
statement); every listening consumer routes it to its own queues by their bindings, as Redis
does with pub/sub. Delivery is at most once, like the queues themselves: a consumer that is not
listening at that moment (reconnecting) misses it. Messages too big for a notification (8000
bytes) still come as rows, with a wake-up.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import re
from time import monotonic
from typing import Iterable

from kombu.transport.virtual.exchange import TopicExchange

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1024)
def broadcast_channel(schema: str, exchange: str) -> str:
    """The NOTIFY channel of ``exchange``'s broadcasts: a digest, so that any schema and
    exchange name fits PostgreSQL's 63-byte channel names."""
    digest = hashlib.sha256(f"{schema}\0{exchange}".encode()).hexdigest()[:24]
    return f"kombu_pg.broadcast.{digest}"


class Broadcasts:
    """One per transport: its queues that receive broadcasts, by channel, and the messages
    received for them that were not delivered yet."""

    def __init__(self, schema: str):
        self.schema = schema
        self._exchanges: dict[str, str] = {}  # channel -> exchange
        self._bindings: dict[str, list[tuple[str, re.Pattern | None]]] = {}  # queue -> (exchange, key match)
        self._ttl: dict[str, float] = {}  # queue -> seconds its messages live (x-message-ttl)
        #: queue -> (received at, priority, payload), oldest first; what outlived the queue's TTL
        #: undelivered is dropped, as the broker drops it (a receiver that stopped reading).
        self.inbox: dict[str, collections.deque[tuple[float, int, str]]] = {}
        self._warned = False  # about a malformed notification: once, not for every one of a flood

    def __bool__(self) -> bool:
        return any(self.inbox.values())

    def queues(self) -> list[str]:
        return sorted(self._bindings)

    def channels(self) -> list[str]:
        return sorted(self._exchanges)

    def subscribe(self, queue: str, bindings: Iterable[tuple[str, str, str]], ttl: float) -> list[str]:
        """Route broadcasts to ``queue`` by its ``bindings``: (exchange, routing key, exchange
        type); its messages live ``ttl`` seconds. Returns the channels to LISTEN on."""
        matches: list[tuple[str, re.Pattern | None]] = []
        for exchange, routing_key, exchange_type in bindings:
            if exchange_type == "topic":
                matches.append((exchange, re.compile(TopicExchange(None).key_to_pattern(routing_key))))
            elif exchange_type == "direct":
                matches.append((exchange, re.compile(re.escape(routing_key) + r"\Z")))
            else:  # fanout
                matches.append((exchange, None))
        self._bindings[queue] = matches
        self._ttl[queue] = ttl
        self.inbox.setdefault(queue, collections.deque())
        channels = []
        for exchange, _ in matches:
            channel = broadcast_channel(self.schema, exchange)
            self._exchanges[channel] = exchange
            channels.append(channel)
        return channels

    def unsubscribe(self, queue: str) -> None:
        self._bindings.pop(queue, None)
        self._ttl.pop(queue, None)
        self.inbox.pop(queue, None)

    def receive(self, channel: str, note: str) -> set[str]:
        """File a notification of ``channel`` into the inbox of each queue it matches; returns
        those queues."""
        exchange = self._exchanges.get(channel)
        if exchange is None:
            return set()
        try:
            priority, routing_key_json, payload = note.split("\n", 2)
            routing_key = json.loads(routing_key_json)
            if not isinstance(routing_key, str):
                raise ValueError(f"routing key {routing_key!r} is not a string")
            message = (int(priority), payload)
        except ValueError as exc:  # not written by publish_routed (any role may NOTIFY)
            logger.log(logging.DEBUG if self._warned else logging.WARNING,
                       "kombu_pg: ignored a malformed broadcast on %r (%s)", channel, exc)
            self._warned = True
            return set()
        matched, now = set(), monotonic()
        for queue, matches in self._bindings.items():
            if any(ex == exchange and (match is None or match.match(routing_key))
                   for ex, match in matches):
                self.inbox[queue].append((now, *message))
                self._drop_expired(queue, now)
                matched.add(queue)
        return matched

    def _drop_expired(self, queue: str, now: float) -> None:
        inbox, oldest = self.inbox[queue], now - self._ttl[queue]
        while inbox and inbox[0][0] < oldest:
            inbox.popleft()

    def take(self, queue: str, limit: int | None = None) -> list[tuple[int, str]]:
        """Up to ``limit`` (all by default) received messages of ``queue``, oldest first."""
        if not self.inbox.get(queue):
            return []
        self._drop_expired(queue, monotonic())
        inbox = self.inbox[queue]
        count = len(inbox) if limit is None else min(limit, len(inbox))
        return [inbox.popleft()[1:] for _ in range(count)]
