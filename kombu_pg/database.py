"""Per-process access to one database and schema: a connection pool, the schema's statements,
the lease keeper and the one-time migration check.

Every process gets its own objects. After a fork the parent's are left untouched (closing a
connection inherited across fork would end the parent's session), and new ones are made.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from . import counters, migrate, minute_stats, pooler
from .deadline import watchdog
from .failover import ReadOnlyServer, writable
from .config import ConfigurationError, Options, mask_url, scrub, to_conninfo
from .acker import Acker
from .housekeeping import Housekeeper
from .leases import LeaseKeeper
from .vacuum import Vacuumer
from .prepared import Pending, PreparedStatement
from .queries import Queries, for_schema

logger = logging.getLogger(__name__)

#: A producer sends at most one NOTIFY per destination in this many seconds...
NOTIFY_DEBOUNCE_SECONDS = 0.005
#: ...and a consumer that just received messages from a queue claims again after this long, so
#: that a message published without a NOTIFY waits at most about this long (must exceed the
#: debounce window plus a publish round trip).
FOLLOW_UP_SECONDS = 0.025

#: Errors after which the statement may be retried once on a fresh connection (ReadOnlyServer,
#: a session on a server that accepts no writes, is an OperationalError).
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class Database:
    def __init__(self, conninfo: str, options: Options, description: str):
        self.conninfo = conninfo
        self.options = options
        self.description = description  # the masked URL, for messages
        self.q: Queries = for_schema(options.schema)
        #: Straight to PostgreSQL, for what needs a session behind a transaction pooler.
        self.direct_conninfo = to_conninfo(options.direct_url) if options.direct_url else None
        self._pooled = {"transaction": True, "none": False}.get(options.pooler)  # None: detect
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        #: Counts pools discarded: a connection made before the last discard may be on a server
        #: that failed or was demoted since (the LISTEN connection reconnects then).
        self.pool_generation = 0
        self._users = 0  # open transports using this database
        self._ready = False
        #: synchronous_commit of lease statements (see fragment_lease_commit in queries.sql).
        self.lease_commit = "on" if options.durable_leases else "off"
        self.leases = LeaseKeeper(self)
        self.acker = Acker(self)
        self.vacuumer = Vacuumer(self)
        self.housekeeper = Housekeeper(self)
        self._notified: dict = {}  # destination -> monotonic time of its last NOTIFY
        # (exchange, routing key) -> (routing epoch, monotonic expiry): published to, matched no
        # queue (see unroutable). The epoch moves whenever a LISTEN connection comes or goes.
        self._unroutable: dict = {}
        self._routing_epoch = 0
        self._listeners = 0  # LISTEN connections of this process that are up
        minute_stats.watch(self)  # this process's counts, flushed to queue_stats once a minute

    # -- connections ------------------------------------------------------------------------

    @property
    def pooled(self) -> bool:
        """Whether the broker URL leads to a transaction pooler (option ``pooler``; "auto" asks
        one connection, once per process and URL)."""
        if self._pooled is None:
            seen = _pooler_seen.get(self.conninfo)
            if seen is None:
                seen = _pooler_seen[self.conninfo] = self._detect_pooler()
            self._pooled = seen
        return self._pooled

    def _detect_pooler(self) -> bool:
        with self._open(self.conninfo, "probe", prepare_threshold=None) as conn:
            with watchdog.guard(conn, self.options.statement_deadline):
                found = pooler.detect(conn, self.q)
        if found:
            logger.info("kombu_pg: %s leads to a pooler: no prepared statements, no session "
                        "settings; LISTEN and beat's leader election use direct_url (set the "
                        "transport option pooler='none' for a session-pooling pooler)", self.description)
        return found

    @functools.cached_property
    def prepared(self) -> dict[str, PreparedStatement]:
        """The hot path, without psycopg's execute machinery (see prepared.py). Named, unless
        behind a transaction pooler, whose clients share server connections and their names."""
        prefix = None if self.pooled else "kombu_pg_"
        return {name: PreparedStatement(prefix and prefix + name, getattr(self.q, name))
                for name in ("publish_direct", "publish_routed", "claim", "claim_no_ack")}

    def session_conninfo(self, feature: str) -> str:
        """Where ``feature``, which needs a session of its own, connects: direct_url, else the
        broker URL unless that leads to a transaction pooler (then ConfigurationError)."""
        if self.direct_conninfo:
            return self.direct_conninfo
        if self.pooled:
            raise pooler.session_required(feature)
        return self.conninfo

    def connect(self, conninfo: str | None = None, *, role: str, bounded: bool = True,
                **kwargs) -> psycopg.Connection:
        """A new dedicated connection; errors name the problem and never carry the password.

        ``role``: what it is for, in its application_name (``listen``, ``lease``, ...).
        ``bounded``: statements get the ``statement_timeout`` option (not for migrations, which
        may rightly take longer; nor behind a transaction pooler, where a session setting would
        reach other clients: there the client-side deadline alone bounds a statement)."""
        conninfo = conninfo or self.conninfo
        pooled = conninfo == self.conninfo and self.pooled
        conn = self._open(conninfo, role, **self._pooled_kwargs(pooled), **kwargs)
        if bounded and not pooled:
            self._configure(conn)
        return conn

    def _open(self, conninfo: str, role: str, **kwargs) -> psycopg.Connection:
        try:
            return psycopg.connect(conninfo, autocommit=True,
                                   **{**self.options.connection_kwargs(conninfo, role), **kwargs})
        except psycopg.OperationalError as exc:
            where = self.description if conninfo == self.conninfo else mask_url(conninfo)
            raise psycopg.OperationalError(f"cannot connect to {where}: {scrub(exc, conninfo)}") from None

    @staticmethod
    def _pooled_kwargs(pooled: bool) -> dict:
        # psycopg prepares a statement run 5 times under a name of its own (_pg3_0, ...): behind
        # a transaction pooler another client meets it on the same server connection.
        return {"prepare_threshold": None} if pooled else {}

    def _configure(self, conn: psycopg.Connection) -> None:
        """Session settings of every connection (the pool's too)."""
        with watchdog.guard(conn, self.options.statement_deadline):
            conn.execute(self.q.session_setup, self.options.session_params())

    @property
    def pool(self) -> ConnectionPool:
        return self._pool if self._pool is not None else self.open_pool()

    def open_pool(self) -> ConnectionPool:
        """The pool, opened if need be, once its first connection is up (PoolTimeout if not
        within connect_timeout)."""
        with self._pool_lock:
            if self._pool is None:
                pooled = self.pooled
                pool = ConnectionPool(
                    self.conninfo, min_size=1, max_size=self.options.max_connections,
                    kwargs={"autocommit": True, **self.options.connection_kwargs(self.conninfo, "pool"),
                            **self._pooled_kwargs(pooled)},
                    configure=None if pooled else self._configure, timeout=self.options.connect_timeout,
                    name=f"kombu_pg[{os.getpid()}]", open=True)
                # Wait for that connection: a statement asking for one before it is up makes
                # the pool open a second one meanwhile, in a thread that competes for the GIL
                # with the statements that follow (measured: a first publish took ~12 ms
                # instead of ~8, the second 1.2 ms instead of 0.6). wait() closes it on timeout.
                pool.wait(self.options.connect_timeout)
                self._pool = pool
            return self._pool

    def _discard_pool(self) -> None:
        """Start over with a new pool: after an outage psycopg_pool retries connecting with an
        exponential backoff (1, 2, 4, 8 s ...), which would keep clients waiting well after the
        server is back; a new pool connects at once. Closed in the background: its connection
        attempts may still be blocked on the server."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
            self.pool_generation += 1
        if pool is not None:
            threading.Thread(target=pool.close, kwargs={"timeout": self.options.connect_timeout},
                             name="kombu_pg-pool-close", daemon=True).start()

    @contextlib.contextmanager
    def connection(self):
        """A pooled connection for several statements (no retry). A read-only server raises
        ReadOnlyServer, a lost connection, and starts a new pool."""
        try:
            with self.pool.connection() as conn, writable(conn):
                yield conn
        except ReadOnlyServer:
            self._discard_pool()
            raise

    def acquire(self) -> None:
        """A transport (Kombu connection) starts using this database."""
        with self._pool_lock:
            self._users += 1

    def release(self) -> None:
        """A transport is done: once none is left, close the pool (reopened on next use), so a
        process that used many URLs or schemas does not keep idle server connections for each."""
        with self._pool_lock:
            self._users = max(self._users - 1, 0)
            if self._users or self._pool is None:
                return
            pool, self._pool = self._pool, None
        self.acker.flush()
        pool.close()

    def ensure_ready(self) -> None:
        """Check that we can connect, and migrate the schema if need be, once per process."""
        if self._ready:
            return
        with self.connect(role="migrate", bounded=False) as conn:  # migrations may take long
            # Read first: against a current schema, take no lock and create nothing, so that a
            # role without CREATE rights starts, and nobody holding the lock can stop it.
            missing = migrate.pending(conn, self.options.schema)
            if missing and not self.options.auto_migrate:
                raise ConfigurationError(
                    f"schema {self.options.schema!r} lacks migrations {missing} and auto_migrate "
                    "is off: run `kombu-pg migrate`")
            if missing:
                migrate.migrate(conn, self.options.schema, self.options.migrate_lock_timeout)
        self._ready = True

    def run(self, query: str | PreparedStatement, params: Any = None, *, fetch: bool = False):
        """Execute one statement on a pooled connection: rows if ``fetch``, else the row count.

        A statement that fails because its connection broke, or because its server accepts no
        writes (a standby, a primary being demoted: see failover.py), is retried on a fresh one: all
        our statements are safe to repeat (acks, releases and renewals match a lease token; a
        repeated publish is at worst a duplicate, which at-least-once delivery allows).
        A server that does not answer at all costs at most the statement deadline, then
        ``connect_timeout`` for the fresh connection, before the error is raised.
        """
        # After a server restart every pooled connection is dead: allow one try per connection.
        attempts = self.options.max_connections + 1
        for attempt in range(1, attempts + 1):
            try:
                with self.pool.connection() as conn, writable(conn), \
                        watchdog.guard(conn, self.options.statement_deadline):
                    if isinstance(query, PreparedStatement):
                        rows = query.execute(conn, params)
                        return rows if fetch else len(rows)
                    cur = conn.execute(query, params)
                    return cur.fetchall() if fetch else cur.rowcount
            except CONNECTION_ERRORS as exc:
                if isinstance(exc, (PoolTimeout, ReadOnlyServer)):
                    self._discard_pool()
                if attempt == attempts or isinstance(exc, PoolTimeout):
                    raise psycopg.OperationalError(
                        f"database {self.description} unavailable: {scrub(exc, self.conninfo)}") from None
                logger.warning("kombu_pg: connection lost (%s), retrying", scrub(exc, self.conninfo))

    def start(self, statement: PreparedStatement, params: dict) -> Pending:
        """Send ``statement`` on a pooled connection now; ``.result()`` reads its rows later.

        No retry here: the caller falls back to :meth:`run` if sending fails."""
        return Pending(self.pool, statement, params, self.options.statement_deadline)

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

        An idle Celery worker publishes a heartbeat event every 2 s to an exchange no queue is
        bound to unless a monitor runs; this spares the server those transactions. Only trusted
        while this process listens: a bind NOTIFYs (see the ``bind`` statement), and the listener
        then drops every entry (:meth:`bound`), as it does when a LISTEN connection comes or
        goes. Kept at most ``idle_polling_interval`` seconds, in case a LISTEN connection died
        unnoticed."""
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
             dead_reason: str = "max_attempts", max_attempts: int | None = None,
             backoff_base: float | None = None, backoff_cap: float | None = None) -> dict | None:
        """Record a failed attempt: retry after backoff, or dead-letter at the cap.

        Returns ``{"attempt", "max_attempts", "dead_letter_id", "retry_at"}``, or None when the
        lease is no longer ours (nothing was changed).
        """
        policy = self.options.policy(queue)
        rows = self.run(self.q.fail, {
            "id": message_id, "token": token, "error": json.dumps([error], default=str),
            "dead_reason": dead_reason, "max_attempts": max_attempts, "channel": self.options.notify_channel,
            "backoff_base": backoff_base, "backoff_cap": backoff_cap,
            "default_max_attempts": policy["max_attempts"],
            "default_backoff_base": policy["backoff_base"],
            "default_backoff_cap": policy["backoff_cap"],
        }, fetch=True)
        if not rows:
            return None
        attempt, cap, dead_letter_id, retry_at, _ = rows[0]
        self.leases.forget([message_id])
        counters.add("dead_lettered" if dead_letter_id else "retried", queue)
        return {"attempt": attempt, "max_attempts": cap, "dead_letter_id": dead_letter_id,
                "retry_at": retry_at}

    def dead_letter(self, message_id: int, token: str, reason: str, error: dict) -> int | None:
        """Move a leased message to the dead letters; its id there, or None if not ours."""
        try:
            rows = self.run(self.q.dead_letter, {"id": message_id, "token": token, "reason": reason,
                                                 "error": json.dumps([error], default=str)}, fetch=True)
        finally:
            self.leases.forget([message_id])
        if not rows:
            return None
        dead_letter_id, queue, task_id, attempts = rows[0]
        counters.add("dead_lettered", queue)
        logger.warning("kombu_pg: dead-lettered message %s (task %s) of queue %r after %d "
                       "attempt(s): %s", message_id, task_id, queue, attempts, reason)
        return dead_letter_id

    def dead_letter_taken(self, message_id: int, queue: str, priority: int, attempts: int, payload: str,
                          reason: str, error: dict) -> int:
        """Dead-letter a message a no-ack claim already removed, from what the claim returned."""
        [(dead_letter_id,)] = self.run(self.q.dead_letter_taken, {
            "id": message_id, "queue": queue, "priority": priority, "attempts": attempts,
            "payload": payload, "reason": reason, "error": json.dumps([error], default=str)}, fetch=True)
        counters.add("dead_lettered", queue)
        logger.warning("kombu_pg: dead-lettered message %s of queue %r: %s", message_id, queue, reason)
        return dead_letter_id

    def requeue(self, message_id: int, token: str, queue: str) -> dict | None:
        """Give a leased message back for immediate redelivery; at the delivery cap it goes to
        the dead letters instead (max_attempts). Returns ``{"attempt", "max_attempts",
        "dead_letter_id"}``, or None when the lease is no longer ours."""
        error = error_entry("Requeued", "requeued by the consumer at its last allowed delivery "
                                        "(max_attempts)")
        try:
            rows = self.run(self.q.requeue, {
                "id": message_id, "token": token, "error": json.dumps([error], default=str),
                "default_max_attempts": self.options.policy(queue)["max_attempts"],
                "channel": self.options.notify_channel}, fetch=True)
        finally:
            self.leases.forget([message_id])
        if not rows:
            return None
        attempt, cap, dead_letter_id, _ = rows[0]
        if dead_letter_id:
            counters.add("dead_lettered", queue)
            logger.warning("kombu_pg: message %s of queue %r requeued at delivery %d of %d: "
                           "dead-lettered (max_attempts)", message_id, queue, attempt, cap)
        else:
            counters.add("requeued", queue)
            logger.info("kombu_pg: message %s of queue %r requeued (delivery %d of %d)",
                        message_id, queue, attempt, cap)
        return {"attempt": attempt, "max_attempts": cap, "dead_letter_id": dead_letter_id}

    def reap(self, conn: psycopg.Connection, limit: int = 1000) -> list[tuple]:
        """Return expired leases to their queues, or dead-letter them at the delivery cap, on
        ``conn`` (in the housekeeping round's transaction); log them with :meth:`reaped`."""
        return conn.execute(self.q.reap, {"limit": limit, "default_max_attempts": self.options.max_attempts,
                                          "held": self.leases.held_ids()}).fetchall()

    def reaped(self, rows: list[tuple]) -> None:
        for outcome, message_id, queue, task_id, attempt in rows:
            counters.add("dead_lettered" if outcome == "dead_lettered" else "released", queue)
            logger.warning("kombu_pg: lease of message %s (task %s, queue %r, attempt %d) expired: %s",
                           message_id, task_id, queue, attempt,
                           "dead-lettered (lease_expired)" if outcome == "dead_lettered" else "returned to its queue")

    def close(self) -> None:
        self.housekeeper.resign()
        self.acker.stop()
        self.leases.stop()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


_registry: dict[tuple, Database] = {}
#: conninfo -> whether it leads to a pooler, as detected (forked children know it too).
_pooler_seen: dict[str, bool] = {}


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
