"""Transactional enqueue: publish tasks in the application's own database transaction.

    with transaction.atomic(), kombu_pg.enqueue_in(django_connection):
        order = Order.objects.create(...)
        send_receipt.delay(order.id)          # unchanged Celery call

Inside the block, every message this thread publishes to the broker is inserted through the
given connection, in its current transaction: it commits or rolls back with the application's
data. Consumers are woken by a NOTIFY, which PostgreSQL delivers at commit. The broker tables
must live in the same database as that connection.
"""
from __future__ import annotations

import contextlib
import contextvars

import psycopg

_connection: contextvars.ContextVar[psycopg.Connection | None] = contextvars.ContextVar(
    "kombu_pg_enqueue_connection", default=None)


def current() -> psycopg.Connection | None:
    """The connection publishes must go through, if inside :func:`enqueue_in`."""
    return _connection.get()


@contextlib.contextmanager
def enqueue_in(connection):
    """Publish through ``connection`` (psycopg 3 Connection, SQLAlchemy Session or Connection,
    or a Django database wrapper such as ``django.db.connection``) until the block exits."""
    token = _connection.set(psycopg_connection(connection))
    try:
        yield
    finally:
        _connection.reset(token)


def psycopg_connection(obj) -> psycopg.Connection:
    if isinstance(obj, psycopg.Connection):
        return obj
    # Django: a DatabaseWrapper (django.db.connection / connections[alias]), psycopg 3 backend.
    if hasattr(obj, "ensure_connection") and getattr(obj, "vendor", None) == "postgresql":
        obj.ensure_connection()
        return psycopg_connection(obj.connection)
    # SQLAlchemy: a Session (its connection for the current transaction), or a Connection.
    if hasattr(obj, "get_bind") and callable(getattr(obj, "connection", None)):
        return psycopg_connection(obj.connection())
    dbapi = getattr(getattr(obj, "connection", None), "dbapi_connection", None)
    if dbapi is not None:
        return psycopg_connection(dbapi)
    raise TypeError(
        f"enqueue_in() needs a psycopg 3 connection, a SQLAlchemy Session/Connection using "
        f"postgresql+psycopg, or a Django connection with the psycopg 3 backend; got {type(obj).__name__}")
