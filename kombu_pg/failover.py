"""A server that accepts no writes is a lost connection.

During a failover a session can find itself on a server that refuses writes: a hot standby
(a URL without ``target_session_attrs=read-write``, or a host that became a standby), or a
primary that a failover manager fenced (``default_transaction_read_only``) before demoting it.
Every statement on such a session fails alike, so the error is raised as a lost connection: the
session is dropped, callers reconnect as after a dropped connection, and libpq picks the
read-write host of a multi-host URL (see Options.connection_kwargs).
"""
from __future__ import annotations

import contextlib

import psycopg
from psycopg.errors import ReadOnlySqlTransaction


class ReadOnlyServer(psycopg.OperationalError):
    """The session's server accepts no writes (a standby, or a primary being demoted)."""


@contextlib.contextmanager
def writable(conn: psycopg.Connection):
    """Statements on ``conn`` within: a read-only server raises ReadOnlyServer. The caller
    drops ``conn`` (a pool: the whole pool, whose other connections are on that server too)."""
    try:
        yield conn
    except ReadOnlySqlTransaction as exc:
        raise ReadOnlyServer(f"the server accepts no writes, it is a standby or a primary being "
                             f"demoted ({' '.join(str(exc).split())})") from None
