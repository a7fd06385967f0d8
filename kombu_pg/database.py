"""Per-process access to one database and schema: a connection pool, the schema's statements,
the lease keeper and the one-time migration check.

Every process gets its own objects. After a fork the parent's are left untouched (closing a
connection inherited across fork would end the parent's session), and new ones are made.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from . import migrate
from .config import ConfigurationError, Options, scrub
from .leases import LeaseKeeper
from .queries import Queries, for_schema

logger = logging.getLogger(__name__)

#: Errors after which the statement may be retried once on a fresh connection.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class Database:
    def __init__(self, conninfo: str, options: Options, description: str):
        self.conninfo = conninfo
        self.options = options
        self.description = description  # the masked URL, for messages
        self.q: Queries = for_schema(options.schema)
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._ready = False
        self.leases = LeaseKeeper(self)

    # -- connections ------------------------------------------------------------------------

    def connect(self, conninfo: str | None = None, **kwargs) -> psycopg.Connection:
        """A new dedicated connection; errors name the problem and never carry the password."""
        conninfo = conninfo or self.conninfo
        try:
            return psycopg.connect(conninfo, autocommit=True,
                                   connect_timeout=max(1, int(self.options.connect_timeout)), **kwargs)
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"cannot connect to {self.description}: {scrub(exc, conninfo)}") from None

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.conninfo, min_size=1, max_size=self.options.max_connections,
                        kwargs={"autocommit": True}, timeout=self.options.connect_timeout,
                        name=f"kombu_pg[{os.getpid()}]", open=True)
        return self._pool

    def ensure_ready(self) -> None:
        """Check that we can connect, and migrate the schema once per process."""
        if self._ready:
            return
        with self.connect() as conn:
            if self.options.auto_migrate:
                migrate.migrate(conn, self.options.schema)
            else:
                missing = migrate.pending(conn, self.options.schema)
                if missing:
                    raise ConfigurationError(
                        f"schema {self.options.schema!r} lacks migrations {missing} and auto_migrate "
                        "is off: run `kombu-pg migrate`")
        self._ready = True

    def run(self, query: str, params: Any = None, *, fetch: bool = False):
        """Execute one statement on a pooled connection: rows if ``fetch``, else the row count.

        A statement that fails because its connection broke is retried on a fresh one: all
        our statements are safe to repeat (acks, releases and renewals match a lease token; a
        repeated publish is at worst a duplicate, which at-least-once delivery allows).
        """
        # After a server restart every pooled connection is dead: allow one try per connection.
        attempts = self.options.max_connections + 1
        for attempt in range(1, attempts + 1):
            try:
                with self.pool.connection() as conn:
                    cur = conn.execute(query, params)
                    return cur.fetchall() if fetch else cur.rowcount
            except CONNECTION_ERRORS as exc:
                if attempt == attempts or isinstance(exc, PoolTimeout):
                    raise psycopg.OperationalError(
                        f"database {self.description} unavailable: {scrub(exc, self.conninfo)}") from None
                logger.warning("kombu_pg: connection lost (%s), retrying", scrub(exc, self.conninfo))

    def close(self) -> None:
        self.leases.stop()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


_registry: dict[tuple, Database] = {}
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
