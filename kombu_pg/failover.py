"""A server that accepts no writes is a lost connection.

During a failover a session can find itself on a server that refuses writes: a hot standby
(a URL without ``target_session_attrs=read-write``, or a host that became a standby), or a
primary that a failover manager fenced (``default_transaction_read_only``) before demoting it.
Every statement on such a session fails alike, so the session is closed and the error raised as
a lost connection: callers reconnect as after a dropped connection, and libpq picks the
read-write host of a multi-host URL.
"""
from __future__ import annotations

import contextlib

import psycopg
from psycopg.errors import ReadOnlySqlTransaction


class ReadOnlyServer(psycopg.OperationalError):
    """The session's server accepts no writes (a standby, or a primary being demoted)."""


def read_only_server(exc: ReadOnlySqlTransaction) -> ReadOnlyServer:
    return ReadOnlyServer(
        f"the server accepts no writes, it is a standby or a primary being demoted ({' '.join(str(exc).split())}): "
        "reconnecting; name every host in the URL with target_session_attrs=read-write so that "
        "libpq picks the primary")


@contextlib.contextmanager
def writable(conn: psycopg.Connection):
    """Statements on ``conn`` within: a read-only server closes ``conn`` (a pool then drops it)
    and raises ReadOnlyServer."""
    try:
        yield conn
    except ReadOnlySqlTransaction as exc:
        with contextlib.suppress(Exception):
            conn.close()
        raise read_only_server(exc) from None
