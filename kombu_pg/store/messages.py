"""Statements on messages (sql/messages.sql): publish, claim, settle, the consumers' polls."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal

from ..prepared import PreparedStatement
from ._base import Statements, Target
from .names import StatementName
from .records import (Buried, Claimed, Due, Failed, NewMessage, Polled, Scheduled, Settled)

#: The transport's hot path: prepared once per connection, run through libpq (prepared.py).
HOT: tuple[StatementName, ...] = ("publish_direct", "publish_routed", "claim", "claim_no_ack", "ack", "renew")


def error_json(error: dict | list[dict]) -> str:
    """Error history entries (at, worker, type, message, traceback) as the JSON array stored."""
    return json.dumps(error if isinstance(error, list) else [error], default=str)


class MessageStatements(Statements):
    def prepared(self, prefix: str | None) -> dict[str, PreparedStatement]:
        """The hot statements for prepared.py, named ``prefix + name`` (None: never prepared by
        name, as behind a transaction pooler). Same text as the methods below send."""
        return {name: PreparedStatement(prefix and prefix + name, self.sql[name]) for name in HOT}

    # -- publishing ---------------------------------------------------------------------------

    def publish_direct(self, target: Target, message: NewMessage, *, queue: str, channel: str,
                       notify: bool = True) -> list[str]:
        """Store ``message`` in ``queue``; the queues it went to (none: a duplicate unique key)."""
        params = dict(dataclasses.asdict(message), queue=queue, channel=channel, notify=notify)
        return [row[0] for row in self._rows(target, self.sql["publish_direct"], params)]

    def publish_routed(self, target: Target, message: NewMessage, *, exchange: str, routing_key: str,
                       channel: str, broadcast_channel: str, notify: bool = True) -> list[str]:
        """Route ``message`` through ``exchange``; the queues it went to (none: unroutable)."""
        params = dict(dataclasses.asdict(message), exchange=exchange, routing_key=routing_key,
                      channel=channel, broadcast_channel=broadcast_channel, notify=notify)
        return [row[0] for row in self._rows(target, self.sql["publish_routed"], params)]

    def publish(self, target: Target, statement: Literal["publish_direct", "publish_routed"],
                params: dict[str, Any]) -> list[str]:
        """The transport's publish: ``params`` as kombu_pg.messages.publish_params builds them,
        with the queue (or the exchange and routing key) and ``notify``; the queues it went to.
        (Its hot path runs the same statements through :meth:`prepared`.)"""
        return [row[0] for row in self._rows(target, self.sql[statement], params)]

    # -- consuming ----------------------------------------------------------------------------

    def claim(self, target: Target, *, queue: str, limit: int, default_max_attempts: int,
              lease_seconds: float, held: list[int] | str, synchronous_commit: str,
              holder: str) -> list[Claimed]:
        """Lease up to ``limit`` deliverable messages of ``queue`` (never those in ``held``)."""
        return [Claimed(*row) for row in self._rows(target, self.sql["claim"], {
            "queue": queue, "limit": limit, "default_max_attempts": default_max_attempts,
            "lease_seconds": lease_seconds, "held": held, "synchronous_commit": synchronous_commit,
            "holder": holder})]

    def claim_no_ack(self, target: Target, *, queue: str, limit: int) -> list[Claimed]:
        """Take (delete) up to ``limit`` deliverable messages, for a consumer that never acks."""
        return [Claimed(*row) for row in self._rows(target, self.sql["claim_no_ack"],
                                                    {"queue": queue, "limit": limit})]

    def ack(self, target: Target, *, ids: list[int], tokens: list[str]) -> list[str]:
        """Delete the messages whose lease is still ours; the queue of each one deleted."""
        return [row[0] for row in self._rows(target, self.sql["ack"], {"ids": ids, "tokens": tokens})]

    def release(self, target: Target, *, ids: list[int], tokens: Sequence[str | None],
                channel: str) -> list[str]:
        """Give leased messages back unprocessed; the queues woken."""
        return [row[0] for row in self._rows(target, self.sql["release"],
                                             {"ids": ids, "tokens": tokens, "channel": channel})]

    def renew(self, target: Target, *, ids: list[int], tokens: list[str], lease_seconds: float,
              synchronous_commit: str) -> set[int]:
        """Extend the leases still ours; their message ids."""
        return {row[0] for row in self._rows(target, self.sql["renew"], {
            "ids": ids, "tokens": tokens, "lease_seconds": lease_seconds,
            "synchronous_commit": synchronous_commit})}

    # -- settling by lease --------------------------------------------------------------------

    def requeue(self, target: Target, *, id: int, token: str, error: dict, default_max_attempts: int,
                channel: str) -> Settled | None:
        """Back for immediate redelivery, or to the dead letters at the cap (None: not ours)."""
        row = self._row(target, self.sql["requeue"], {
            "id": id, "token": token, "error": error_json(error),
            "default_max_attempts": default_max_attempts, "channel": channel})
        return Settled(*row[:3]) if row else None

    def fail(self, target: Target, *, id: int, token: str, error: dict, dead_reason: str,
             max_attempts: int | None, backoff_base: float | None, backoff_cap: float | None,
             default_max_attempts: int, default_backoff_base: float, default_backoff_cap: float,
             channel: str) -> Failed | None:
        """A failed attempt: retry after the backoff, or to the dead letters at the cap
        (``max_attempts``, ``backoff_*``: the task's own, None if unset). None: not ours."""
        row = self._row(target, self.sql["fail"], {
            "id": id, "token": token, "error": error_json(error), "dead_reason": dead_reason,
            "max_attempts": max_attempts, "backoff_base": backoff_base, "backoff_cap": backoff_cap,
            "default_max_attempts": default_max_attempts, "default_backoff_base": default_backoff_base,
            "default_backoff_cap": default_backoff_cap, "channel": channel})
        return Failed(*row[:4]) if row else None

    def dead_letter(self, target: Target, *, id: int, token: str, reason: str, error: dict) -> Buried | None:
        """Straight to the dead letters (None: the lease is not ours)."""
        row = self._row(target, self.sql["dead_letter"],
                        {"id": id, "token": token, "reason": reason, "error": error_json(error)})
        return Buried(*row) if row else None

    def dead_letter_taken(self, target: Target, *, id: int, queue: str, priority: int, attempts: int,
                          payload: str, reason: str, error: dict) -> int:
        """Dead-letter a message a no-ack claim already deleted; the dead letter's id."""
        return self._value(target, self.sql["dead_letter_taken"], {
            "id": id, "queue": queue, "priority": priority, "attempts": attempts, "payload": payload,
            "reason": reason, "error": error_json(error)})

    # -- a queue's messages -------------------------------------------------------------------

    def size(self, target: Target, *, queue: str) -> int:
        return self._value(target, self.sql["size"], {"queue": queue})

    def purge(self, target: Target, *, queue: str) -> int:
        return self._count(target, self.sql["purge"], {"queue": queue})

    def poll(self, target: Target, *, queues: list[str], hold_s: float, refresh_s: float, holder: str,
             lease_s: float) -> list[Polled]:
        return [Polled(*row) for row in self._rows(target, self.sql["poll"], {
            "queues": queues, "hold_s": hold_s, "refresh_s": refresh_s, "holder": holder,
            "lease_s": lease_s})]

    def next_due(self, target: Target, *, queues: list[str]) -> list[Due]:
        return [Due(*row) for row in self._rows(target, self.sql["next_due"], {"queues": queues})]

    def scheduled(self, target: Target, *, queues: list[str], limit: int) -> list[Scheduled]:
        return [Scheduled(*row) for row in self._rows(target, self.sql["scheduled"],
                                                      {"queues": queues, "limit": limit})]
