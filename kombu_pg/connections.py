"""Connections to one database and schema: the pool, dedicated connections with their session
settings, pooler detection, the one-time migration check, and statements run with a retry on a
fresh connection when theirs broke or its server stopped taking writes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from . import migrate, minute_stats, pooler
from .config import ConfigurationError, Options, mask_url, scrub, to_conninfo
from .deadline import watchdog
from .errors import CONNECTION_ERRORS
from .failover import ReadOnlyServer, writable
from .prepared import Pending, PreparedStatement
from .store import Store, store_for

logger = logging.getLogger(__name__)


#: conninfo -> whether it leads to a pooler, as detected (forked children know it too).
_pooler_seen: dict[str, bool] = {}


class Connections:
    def __init__(self, conninfo: str, options: Options, description: str):
        self.conninfo = conninfo
        self.options = options
        self.description = description  # the masked URL, for messages
        #: Every statement of the schema (the hot ones through :attr:`prepared`).
        self.store: Store = store_for(options.schema)
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
                found = pooler.detect(conn, self.store)
        if found:
            logger.info("kombu_pg: %s leads to a pooler: no prepared statements, no session "
                        "settings; LISTEN and beat's leader election use direct_url (set the "
                        "transport option pooler='none' for a session-pooling pooler)", self.description)
        return found

    @functools.cached_property
    def prepared(self) -> dict[str, PreparedStatement]:
        """The hot path, without psycopg's execute machinery (see prepared.py). Named, unless
        behind a transaction pooler, whose clients share server connections and their names."""
        return self.store.prepared(None if self.pooled else "kombu_pg_")

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
            self.store.session_setup(conn, **self.options.session_params())

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
        self._before_pool_close()
        pool.close()

    def _before_pool_close(self) -> None:
        """What must still go through the pool before release() closes it."""

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
        minute_stats.watch(self)  # this process's counts, flushed to queue_stats once a minute

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
            deadline = None
            try:
                with self.pool.connection() as conn, writable(conn), \
                        (deadline := watchdog.guard(conn, self.options.statement_deadline)):
                    if isinstance(query, PreparedStatement):
                        rows = query.execute(conn, params)
                        return rows if fetch else len(rows)
                    cur = conn.execute(query, params)
                    return cur.fetchall() if fetch else cur.rowcount
            except CONNECTION_ERRORS as exc:
                # A server that did not answer in time would not answer on the pool's other
                # connections either: each would cost another deadline. Start a new pool; its
                # first connection is bounded by connect_timeout.
                if isinstance(exc, (PoolTimeout, ReadOnlyServer)) or (deadline and deadline.expired):
                    self._discard_pool()
                if attempt == attempts or isinstance(exc, PoolTimeout):
                    raise psycopg.OperationalError(
                        f"database {self.description} unavailable: {scrub(exc, self.conninfo)}") from None
                logger.warning("kombu_pg: connection lost (%s), retrying", scrub(exc, self.conninfo))

    def start(self, statement: PreparedStatement, params: dict) -> Pending:
        """Send ``statement`` on a pooled connection now; ``.result()`` reads its rows later.

        No retry here: the caller falls back to :meth:`run` if sending fails."""
        return Pending(self.pool, statement, params, self.options.statement_deadline)

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
