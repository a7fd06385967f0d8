"""Cluster-wide housekeeping, in one elected consumer process at a time.

A round drops expired queues (x-expires) and messages (TTL), returns expired leases to their
queues (or dead-letters them at the delivery cap) and wakes those queues' consumers, moves
expired tasks nobody took to the dead letters, and forgets expired revokes (handing over the
tasks a revoke removed without marking them REVOKED). One process suffices: run by every consumer,
the rounds would make up most of what idle workers cost the server.

The election is a lease in a one-row table (migration 0007), so it needs no session of its own
and works behind a pooler: consumers take it at their safety-net poll once it has run out (see
the ``poll`` statement), and the holder renews it in the transaction of each round, every
``sweep_interval``. A holder that dies, loses its connection or stalls (a solo worker running a
long task) stops renewing; after ``housekeeper_lease`` seconds the next consumer to poll takes
over, so rounds resume within that plus ``max_polling_interval``. A process that stops
consuming (it shuts down, or its only consumer was a short one: `celery inspect`, an events
receiver) gives the lease up, and the next poll takes it.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import weakref
from time import monotonic

from . import config
from .deadline import watchdog

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Round:
    """What a round changed."""

    queues_gone: int  # messages of expired queues, deleted with them
    expired: int  # plain messages past their TTL, deleted
    buried: list  # (message id, queue, task id) of expired tasks moved to the dead letters
    reaped: list  # rows of the reap statement
    to_mark_revoked: list  # ids of tasks a revoke removed that are not marked REVOKED yet


class Housekeeper:
    def __init__(self, db):
        self.db = db
        self._holder: str | None = None
        self._leader = False
        self._next_round = 0.0  # monotonic
        self._lock = threading.Lock()  # the transports of a process share one housekeeper
        self._consuming = weakref.WeakSet()  # this process's transports that consume

    @property
    def holder(self) -> str:
        """This process in the housekeeper row: its name as in its connections' names (once a
        Celery worker set it), and a random part (process ids repeat across hosts and containers).
        Each process has its own Database, hence its own Housekeeper."""
        if self._holder is None:
            self._holder = f"{config.client_name()} {secrets.token_hex(3)}"
        return self._holder

    def poll_params(self) -> dict:
        return {"holder": self.holder, "lease_s": self.db.options.housekeeper_lease}

    def elected(self) -> None:
        """Our poll took the lease: a round is due at once."""
        if not self._leader:
            logger.info("kombu_pg: this process (%s) now runs the housekeeping of schema %r",
                        self.holder, self.db.options.schema)
        self._leader, self._next_round = True, 0.0

    def next_round(self) -> float | None:
        """When our next round is due (monotonic), or None if we are not the housekeeper."""
        return self._next_round if self._leader else None

    def run_round(self) -> Round | None:
        """A round, if we are the housekeeper and one is due; None otherwise."""
        if not self._leader or monotonic() < self._next_round or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next_round = monotonic() + self.db.options.sweep_interval
            done = self._round()
        finally:
            self._lock.release()
        if done is None:
            self._leader = False
            logger.info("kombu_pg: this process (%s) no longer runs the housekeeping of schema %r: "
                        "another one took over", self.holder, self.db.options.schema)
            return None
        self.db.reaped(done.reaped)
        self.db.vacuumer.maybe_vacuum()
        return done

    def _round(self) -> Round | None:
        db, q, options = self.db, self.db.q, self.db.options
        with db.connection() as conn, watchdog.guard(conn, options.statement_deadline), \
                conn.transaction():
            if conn.execute(q.housekeeper_renew, self.poll_params()).fetchone() is None:
                return None
            queues_gone = conn.execute(q.sweep_expired_queues, {
                "auto_delete_expires_s": options.auto_delete_expires}).rowcount
            expired = conn.execute(q.sweep_expired_messages, {}).rowcount
            buried = conn.execute(q.sweep_expired_tasks, {
                "grace_s": options.expired_task_grace, "limit": 1000}).fetchall()
            reaped = db.reap(conn)
            conn.execute(q.sweep_revoked, {})
            to_mark = [task_id for task_id, in conn.execute(q.revoked_to_mark, {"limit": 1000})]
            returned = sorted({queue for outcome, _, queue, *_ in reaped if outcome == "returned"})
            if returned:  # nothing else tells their consumers: no NOTIFY marks a lease's end
                conn.execute(q.wake_queues, {"channel": options.notify_channel, "queues": returned})
        return Round(queues_gone, expired, buried, reaped, to_mark)

    def consuming(self, transport) -> None:
        self._consuming.add(transport)

    def stopped(self, transport) -> None:
        """``transport`` consumes nothing any more: once no transport of this process does, no
        round would come from here."""
        self._consuming.discard(transport)
        if not self._consuming:
            self.resign()

    def resign(self) -> None:
        """Give the lease up (shutdown), so that another consumer takes over at its next poll
        rather than once the lease has run out."""
        if not self._leader:
            return
        self._leader = False
        try:
            self.db.run(self.db.q.housekeeper_resign, {"holder": self.holder})
        except Exception as exc:  # it runs out by itself
            logger.debug("kombu_pg: could not give up the housekeeper lease: %s", exc)
