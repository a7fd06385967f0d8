"""Per-process access to one database and schema: its connections (connections.py), the
services that share them (lease keeper, acker, vacuum, maintenance), the publish-side memory
(debounced NOTIFYs, publishes no queue takes) and settling by lease.

Every process gets its own objects. After a fork the parent's are left untouched (closing a
connection inherited across fork would end the parent's session), and new ones are made.
"""
from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import socket
import threading
import time

from . import counters
from .acker import Acker
from .config import Options
from .connections import Connections
from .leases import LeaseKeeper
from .maintenance import Maintenance
from .reasons import Reason
from .vacuum import Vacuumer

logger = logging.getLogger(__name__)

#: A producer sends at most one NOTIFY per destination in this many seconds...
NOTIFY_DEBOUNCE_SECONDS = 0.005
#: ...and a consumer that just received messages from a queue claims again after this long, so
#: that a message published without a NOTIFY waits at most about this long (must exceed the
#: debounce window plus a publish round trip).
FOLLOW_UP_SECONDS = 0.025


class Database(Connections):
    def __init__(self, conninfo: str, options: Options, description: str):
        super().__init__(conninfo, options, description)
        #: synchronous_commit of lease statements (see fragment_lease_commit in queries.sql).
        self.lease_commit = "on" if options.durable_leases else "off"
        self.leases = LeaseKeeper(self)
        self.acker = Acker(self)
        self.vacuumer = Vacuumer(self)
        self.maintenance = Maintenance(self, self.leases, self.vacuumer)
        self._notified: dict = {}  # destination -> monotonic time of its last NOTIFY
        # (exchange, routing key) -> (routing epoch, monotonic expiry): published to, matched no
        # queue (see unroutable). The epoch moves whenever a LISTEN connection comes or goes.
        self._unroutable: dict = {}
        self._routing_epoch = 0
        self._listeners = 0  # LISTEN connections of this process that are up

    def _before_pool_close(self) -> None:
        self.acker.flush()  # queued acks go out through the pool

    # -- debounced wake-ups -----------------------------------------------------------------

    def should_notify(self, destination) -> bool:
        """Debounced wake-ups: NOTIFY costs about as much as the INSERT it accompanies."""
        now = time.monotonic()
        last = self._notified.get(destination)
        if last is not None and now - last < NOTIFY_DEBOUNCE_SECONDS:
            return False
        self._notified[destination] = now
        return True

    # -- publishes no queue takes -----------------------------------------------------------

    def unroutable(self, destination) -> bool:
        """Whether a publish to ``destination`` (exchange, routing key) would store nothing: it
        matched no queue a moment ago, and no queue was bound to the exchange since.

        An idle Celery worker without gossip publishes a heartbeat event every few seconds to an
        exchange no queue is bound to unless a monitor runs; this spares the server those
        transactions. Only trusted while this process listens: a bind NOTIFYs (see the ``bind``
        statement), and the listener then drops every entry (:meth:`bound`), as it does when a
        LISTEN connection comes or goes. Kept at most ``idle_polling_interval`` seconds, in
        case a LISTEN connection died unnoticed."""
        entry = self._unroutable.get(destination)
        return (entry is not None and self._listeners > 0 and entry[0] == self._routing_epoch
                and time.monotonic() < entry[1])

    def routing_epoch(self) -> int:
        return self._routing_epoch

    def note_unroutable(self, destination, epoch: int) -> None:
        """A publish to ``destination`` sent in routing epoch ``epoch`` matched no queue."""
        if epoch != self._routing_epoch or not self._listeners:
            return
        if len(self._unroutable) >= 1000:  # e.g. replies to many `celery inspect` clients gone
            self._unroutable.clear()
        self._unroutable[destination] = (epoch, time.monotonic() + self.options.idle_polling_interval)

    def bound(self) -> None:
        """A queue was bound to an exchange: publishes that matched no queue may be stored now.
        (A new epoch, rather than dropping entries: a publish in flight must not add a stale one.)"""
        with self._pool_lock:
            self._routing_epoch += 1

    def listening(self, up: bool) -> None:
        """A LISTEN connection of this process came up or went away."""
        with self._pool_lock:
            self._listeners += 1 if up else -1
            self._routing_epoch += 1

    # -- settling by lease: usable from any process that knows (id, token) ---------------------

    def fail(self, message_id: int, token: str, error: dict, *, queue: str,
             dead_reason: str = Reason.max_attempts, max_attempts: int | None = None,
             backoff_base: float | None = None, backoff_cap: float | None = None) -> dict | None:
        """Record a failed attempt: retry after backoff, or dead-letter at the cap.

        Returns ``{"attempt", "max_attempts", "dead_letter_id", "retry_at"}``, or None when the
        lease is no longer ours (nothing was changed).
        """
        policy = self.options.policy(queue)
        self.leases.settling([message_id])  # a renewal meanwhile may find it settled: not lost
        try:
            failed = self.store.fail(
                self, id=message_id, token=token, error=error, dead_reason=dead_reason,
                max_attempts=max_attempts, backoff_base=backoff_base, backoff_cap=backoff_cap,
                default_max_attempts=policy["max_attempts"], default_backoff_base=policy["backoff_base"],
                default_backoff_cap=policy["backoff_cap"], channel=self.options.notify_channel)
        except BaseException:
            self.leases.settled_not([message_id])  # still ours: renewed until settled otherwise
            raise
        self.leases.forget([message_id])  # settled, or no longer ours
        if failed is None:
            return None
        attempt, cap, dead_letter_id, retry_at = failed
        counters.add("dead_lettered" if dead_letter_id else "retried", queue)
        return {"attempt": attempt, "max_attempts": cap, "dead_letter_id": dead_letter_id,
                "retry_at": retry_at}

    def dead_letter(self, message_id: int, token: str, reason: str, error: dict) -> int | None:
        """Move a leased message to the dead letters; its id there, or None if not ours."""
        self.leases.settling([message_id])
        try:
            buried = self.store.dead_letter(self, id=message_id, token=token, reason=reason, error=error)
        finally:
            self.leases.forget([message_id])
        if buried is None:
            return None
        dead_letter_id, queue, task_id, attempts = buried
        counters.add("dead_lettered", queue)
        logger.warning("kombu_pg: dead-lettered message %s (task %s) of queue %r after %d "
                       "attempt(s): %s", message_id, task_id, queue, attempts, reason)
        return dead_letter_id

    def dead_letter_taken(self, message_id: int, queue: str, priority: int, attempts: int, payload: str,
                          reason: str, error: dict) -> int:
        """Dead-letter a message a no-ack claim already removed, from what the claim returned."""
        dead_letter_id = self.store.dead_letter_taken(
            self, id=message_id, queue=queue, priority=priority, attempts=attempts, payload=payload,
            reason=reason, error=error)
        counters.add("dead_lettered", queue)
        logger.warning("kombu_pg: dead-lettered message %s of queue %r: %s", message_id, queue, reason)
        return dead_letter_id

    def requeue(self, message_id: int, token: str, queue: str) -> dict | None:
        """Give a leased message back for immediate redelivery; at the delivery cap it goes to
        the dead letters instead (max_attempts). Returns ``{"attempt", "max_attempts",
        "dead_letter_id"}``, or None when the lease is no longer ours."""
        error = error_entry("Requeued", "requeued by the consumer at its last allowed delivery "
                                        "(max_attempts)")
        self.leases.settling([message_id])
        try:
            settled = self.store.requeue(self, id=message_id, token=token, error=error,
                                         default_max_attempts=self.options.policy(queue)["max_attempts"],
                                         channel=self.options.notify_channel)
        finally:
            self.leases.forget([message_id])
        if settled is None:
            return None
        attempt, cap, dead_letter_id = settled
        if dead_letter_id:
            counters.add("dead_lettered", queue)
            logger.warning("kombu_pg: message %s of queue %r requeued at delivery %d of %d: "
                           "dead-lettered (max_attempts)", message_id, queue, attempt, cap)
        else:
            counters.add("requeued", queue)
            logger.info("kombu_pg: message %s of queue %r requeued (delivery %d of %d)",
                        message_id, queue, attempt, cap)
        return {"attempt": attempt, "max_attempts": cap, "dead_letter_id": dead_letter_id}

    def close(self) -> None:
        self.maintenance.resign()
        self.acker.stop()
        self.leases.stop()
        self.close_pool()


_registry: dict[tuple, Database] = {}


@atexit.register
def _flush_acks_at_exit() -> None:
    if os.getpid() == _registry_pid:
        for db in list(_registry.values()):
            db.acker.flush(timeout=5)
_registry_pid = os.getpid()
_inherited: list[Database] = []  # kept referenced, never closed: they belong to the parent
_registry_lock = threading.Lock()


def get(conninfo: str, options: Options, description: str) -> Database:
    global _registry_pid
    key = (conninfo, options)
    with _registry_lock:
        if os.getpid() != _registry_pid:
            _inherited.extend(_registry.values())
            _registry.clear()
            _registry_pid = os.getpid()
        db = _registry.get(key)
        if db is None:
            db = _registry[key] = Database(conninfo, options, description)
        return db


def close_schema(schema: str) -> None:
    """Close this process's connection pools for ``schema`` (the transport keeps one per URL and
    options for the life of the process): before a test drops the schema it used."""
    with _registry_lock:
        dbs = [_registry.pop(key) for key, db in list(_registry.items()) if db.options.schema == schema]
    for db in dbs:
        db.close()


def error_entry(exc_type: str, message: str, traceback: str | None = None,
                worker: str | None = None) -> dict:
    """One entry of a message's error history."""
    return {"at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "worker": worker or f"{socket.gethostname()}:{os.getpid()}",
            "type": exc_type, "message": message, "traceback": traceback}
