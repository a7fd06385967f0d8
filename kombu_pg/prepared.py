"""The hot-path statements (publish, claim, ack, renew) straight through libpq.

psycopg's ``Connection.execute`` costs about 90 µs per statement here on top of the round
trip (parameter adaptation, its non-blocking wait loop, cursor and result objects): a quarter
of a durable publish. These statements need none of that: their parameters are strings,
numbers, booleans, timestamps and NULLs and arrays of those, their results a few text columns. So each is prepared
once per connection under a name of its own and run with ``PQexecPrepared`` in text format
(libpq releases the GIL while it waits), or sent now and read later (``send``/``receive``), so
that a consumer delivers one batch while the server leases the next. Errors are psycopg's own
exception classes, so callers handle them as they would from ``execute``.

Behind a transaction pooler (PgBouncer pool_mode=transaction) clients share server connections,
and with them the names of prepared statements: a statement without a name is sent with its
text each time instead (``PQexecParams``), which the server parses anew.
"""
from __future__ import annotations

import datetime as dt
import re
import weakref

import psycopg
from psycopg import errors, generators, pq

from .deadline import watchdog
from .failover import writable

# psycopg's placeholder syntax: %(name)s, and %% for a literal % (in a schema name).
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")


class PreparedStatement:
    def __init__(self, name: str | None, query: str):
        """``name`` None: never prepared, the text is sent with every execution."""
        self.name = name.encode() if name else None
        self.params: list[str] = []  # the %(name)s placeholders, in $n order

        def number(match):
            if match.group(1) is None:
                return "%"
            if match.group(1) not in self.params:
                self.params.append(match.group(1))
            return f"${self.params.index(match.group(1)) + 1}"

        self.text = _PLACEHOLDER.sub(number, query).encode()
        # Connections this statement is prepared on; a replaced connection prepares it again.
        self._prepared_on: weakref.WeakSet = weakref.WeakSet()

    def execute(self, conn: psycopg.Connection, params: dict) -> list[tuple]:
        """Run on ``conn`` (autocommit, idle); rows with every column as str or None."""
        pgconn, encoding = conn.pgconn, conn.info.encoding
        values = self._values(conn, params)
        if self.name is None:
            return _rows(_check(pgconn.exec_params(self.text, values), pgconn, encoding), encoding)
        try:
            result = _check(pgconn.exec_prepared(self.name, values), pgconn, encoding)
        except errors.InvalidSqlStatementName:  # deallocated (DISCARD ALL, a pooler): once more
            self._prepare(conn)
            result = _check(pgconn.exec_prepared(self.name, values), pgconn, encoding)
        return _rows(result, encoding)

    def send(self, conn: psycopg.Connection, params: dict) -> list[bytes | None]:
        """Start running on ``conn``; :meth:`receive` waits for the rows. Nothing else may use
        ``conn`` in between. Returns the values sent, which ``receive`` needs."""
        values = self._values(conn, params)
        if self.name is None:
            conn.pgconn.send_query_params(self.text, values)
        else:
            conn.pgconn.send_query_prepared(self.name, values)
        conn.wait(generators.send(conn.pgconn))
        return values

    def receive(self, conn: psycopg.Connection, values: list[bytes | None]) -> list[tuple]:
        """The rows of the statement :meth:`send` started on ``conn`` with ``values``."""
        pgconn, encoding = conn.pgconn, conn.info.encoding
        results = conn.wait(generators.fetch_many(pgconn))
        if not results:
            raise psycopg.OperationalError("connection lost")
        try:
            return _rows(_check(results[0], pgconn, encoding), encoding)
        except errors.InvalidSqlStatementName:
            self._prepare(conn)
            return _rows(_check(pgconn.exec_prepared(self.name, values), pgconn, encoding), encoding)

    def _values(self, conn: psycopg.Connection, params: dict) -> list[bytes | None]:
        if self.name is not None and conn not in self._prepared_on:
            self._prepare(conn)
        encoding = conn.info.encoding
        return [_text(params[name], encoding) for name in self.params]

    def _prepare(self, conn: psycopg.Connection) -> None:
        self._prepared_on.discard(conn)
        _check(conn.pgconn.prepare(self.name, self.text), conn.pgconn, conn.info.encoding)
        self._prepared_on.add(conn)


class Pending:
    """A statement sent on a pooled connection of its own, its rows not read yet."""

    def __init__(self, pool, statement: PreparedStatement, params: dict, deadline: float):
        self._pool, self._statement = pool, statement
        self._conn = pool.getconn()
        # Armed from sending until the rows are read: a server that stops answering meanwhile
        # fails result() instead of blocking the consumer.
        self._ticket = watchdog.arm(self._conn.fileno(), deadline)
        try:
            self._values = statement.send(self._conn, params)
        except BaseException:
            self._done()
            raise

    def result(self) -> list[tuple]:
        try:
            with writable(self._conn):
                return self._statement.receive(self._conn, self._values)
        finally:
            self._done()

    def _done(self) -> None:
        watchdog.disarm(self._ticket)
        self._pool.putconn(self._conn)  # the pool discards a broken connection


def _rows(result: pq.PGresult, encoding: str) -> list[tuple]:
    get, columns = result.get_value, range(result.nfields)
    return [tuple([None if value is None else value.decode(encoding)
                   for value in [get(row, col) for col in columns]])
            for row in range(result.ntuples)]


def _text(value, encoding: str) -> bytes | None:
    """A parameter in PostgreSQL's text input format."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, dt.datetime):
        return value.isoformat().encode()
    if isinstance(value, (str, int, float)):
        return str(value).encode(encoding)
    if isinstance(value, (list, tuple)):  # an array of numbers or strings (ids, lease tokens)
        return ("{" + ",".join(_element(item) for item in value) + "}").encode(encoding)
    raise TypeError(f"cannot send a {type(value).__name__} as a statement parameter")


def _element(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(result: pq.PGresult, pgconn: pq.PGconn, encoding: str) -> pq.PGresult:
    if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return result
    if pgconn.status == pq.ConnStatus.BAD:  # the connection is gone: the caller may retry
        raise psycopg.OperationalError(
            pq.error_message(result, encoding=encoding) or "connection lost")
    raise errors.error_from_result(result, encoding=encoding)
