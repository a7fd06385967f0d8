"""Cluster-wide maintenance, in one elected consumer process at a time: the election, the
housekeeping round (sweeps, reaping of expired leases, the vacuum) under one lock, and what a
round's outcome tells the logs and the Celery integration.

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
from typing import TYPE_CHECKING, Callable

import psycopg

from . import config, counters
from .deadline import watchdog
from .store.records import ExpiredTask, Reaped, VacuumStats

if TYPE_CHECKING:
    from .connections import Connections
    from .leases import LeaseKeeper
    from .vacuum import Vacuumer

logger = logging.getLogger(__name__)

#: A hook of the Celery integration, given task ids (see Transport.on_tasks_expired).
TaskHook = Callable[[list], object]


@dataclasses.dataclass
class Round:
    """What a round changed."""

    queues_gone: int  # messages of expired queues, deleted with them
    expired: int  # plain messages past their TTL, deleted
    buried: list[ExpiredTask]  # expired tasks moved to the dead letters
    reaped: list[Reaped]
    to_mark_revoked: list[str]  # ids of tasks a revoke removed that are not marked REVOKED yet
    vacuum_stats: VacuumStats | None  # the messages table's dead rows, when the vacuum asked


class Maintenance:
    """One per Database, shared by the process's transports."""

    def __init__(self, connections: Connections, leases: LeaseKeeper, vacuumer: Vacuumer):
        self.db = connections
        self.options = connections.options
        self.leases = leases
        self.vacuumer = vacuumer
        self._holder: str | None = None
        self._leader = False
        self._next_round = 0.0  # monotonic
        self._lock = threading.Lock()  # the transports of a process share one housekeeper
        self._consuming: weakref.WeakSet = weakref.WeakSet()  # this process's transports that consume

    # -- the election -----------------------------------------------------------------------

    @property
    def holder(self) -> str:
        """This process in the housekeeper row: its name as in its connections' names (once a
        Celery worker set it), and a random part (process ids repeat across hosts and containers).
        Each process has its own Database, hence its own Maintenance."""
        if self._holder is None:
            self._holder = f"{config.client_name()} {secrets.token_hex(3)}"
        return self._holder

    def poll_params(self) -> dict:
        return {"holder": self.holder, "lease_s": self.options.housekeeper_lease}

    def elected(self) -> None:
        """Our poll took the lease: a round is due at once."""
        if not self._leader:
            logger.info("kombu_pg: this process (%s) now runs the housekeeping of schema %r",
                        self.holder, self.options.schema)
        self._leader, self._next_round = True, 0.0

    def next_round(self) -> float | None:
        """When our next round is due (monotonic), or None if we are not the housekeeper."""
        return self._next_round if self._leader else None

    def consuming(self, transport: object) -> None:
        self._consuming.add(transport)

    def stopped(self, transport: object) -> None:
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
            self.db.store.housekeeper_resign(self.db, holder=self.holder)
        except Exception as exc:  # it runs out by itself
            logger.debug("kombu_pg: could not give up the housekeeper lease: %s", exc)

    # -- the round --------------------------------------------------------------------------

    def sweep(self, on_tasks_expired: TaskHook | None, on_tasks_revoked: TaskHook | None) -> None:
        """A housekeeping round, when this process is the elected housekeeper and one is due:
        drop expired queues (x-expires) and messages (TTL), return expired leases to their
        queues (and wake their consumers), dead-letter expired tasks nobody took. The hooks
        (the Celery integration's, or None) mark the tasks it removed REVOKED."""
        done = self.run_round()
        if done is None:
            return
        if done.queues_gone or done.expired:
            logger.info("kombu_pg: sweep removed %d message(s) of expired queues and %d expired "
                        "message(s)", done.queues_gone, done.expired)
        if done.buried:
            self._expired_unclaimed(done.buried, on_tasks_expired)
        if done.to_mark_revoked and on_tasks_revoked is not None:
            try:
                on_tasks_revoked(done.to_mark_revoked)
            except Exception as exc:  # the messages are gone; only their state is not written
                logger.error("kombu_pg: could not mark %d revoked task(s) REVOKED: %s",
                             len(done.to_mark_revoked), exc)

    def _expired_unclaimed(self, buried: list[ExpiredTask], on_tasks_expired: TaskHook | None) -> None:
        for message_id, queue, task_id in buried:
            counters.add("dead_lettered", queue)
            logger.warning("kombu_pg: task %s (message %s) of queue %r expired and no consumer took it "
                           "within %g s: dead-lettered (expired)", task_id, message_id, queue,
                           self.options.expired_task_grace)
        if on_tasks_expired is not None:
            try:
                on_tasks_expired([task_id for _, _, task_id in buried])
            except Exception as exc:  # the dead letters are written; only their state is not
                logger.error("kombu_pg: could not mark %d expired task(s) REVOKED: %s", len(buried), exc)

    def run_round(self) -> Round | None:
        """A round, if we are the housekeeper and one is due; None otherwise."""
        if not self._leader or monotonic() < self._next_round or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next_round = monotonic() + self.options.sweep_interval
            done = self._round()
        finally:
            self._lock.release()
        if done is None:
            self._leader = False
            logger.info("kombu_pg: this process (%s) no longer runs the housekeeping of schema %r: "
                        "another one took over", self.holder, self.options.schema)
            return None
        self._reaped(done.reaped)
        self.vacuumer.maybe_vacuum(done.vacuum_stats)
        return done

    def _round(self) -> Round | None:
        db, store, options = self.db, self.db.store, self.options
        with db.connection() as conn, watchdog.guard(conn, options.statement_deadline), \
                conn.transaction():
            if store.housekeeper_renew(conn, **self.poll_params()) is None:
                return None
            queues_gone = store.sweep_expired_queues(conn, auto_delete_expires_s=options.auto_delete_expires)
            expired = store.sweep_expired_messages(conn)
            buried = store.sweep_expired_tasks(conn, grace_s=options.expired_task_grace, limit=1000)
            reaped = self._reap(conn)
            store.sweep_revoked(conn)
            to_mark = store.revoked_to_mark(conn, limit=1000)
            returned = sorted({row.queue for row in reaped if row.outcome == "returned"})
            if returned:  # nothing else tells their consumers: no NOTIFY marks a lease's end
                store.wake_queues(conn, queues=returned, channel=options.notify_channel)
            vacuum_stats = store.vacuum_due(conn) if self.vacuumer.due() else None
        return Round(queues_gone, expired, buried, reaped, to_mark, vacuum_stats)

    def _reap(self, conn: psycopg.Connection, limit: int = 1000) -> list[Reaped]:
        """Return expired leases to their queues, or dead-letter them at the delivery cap, on
        ``conn`` (in the round's transaction); log them with :meth:`_reaped`."""
        return self.db.store.reap(conn, limit=limit, default_max_attempts=self.options.max_attempts,
                                  held=self.leases.held_ids())

    def _reaped(self, rows: list[Reaped]) -> None:
        for outcome, message_id, queue, task_id, attempt in rows:
            counters.add("dead_lettered" if outcome == "dead_lettered" else "released", queue)
            logger.warning("kombu_pg: lease of message %s (task %s, queue %r, attempt %d) expired: %s",
                           message_id, task_id, queue, attempt,
                           "dead-lettered (lease_expired)" if outcome == "dead_lettered" else "returned to its queue")
