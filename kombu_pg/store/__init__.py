"""The only caller of the broker's SQL (kombu_pg/sql/*.sql, loaded by kombu_pg.queries).

:class:`Store` is bound to one schema and has a method per statement, with keyword parameters
and records for the rows (kombu_pg.store.records). Each method runs on a psycopg connection
(in the caller's transaction, if one is open), or, where marked ``Target``, on a runner such as
kombu_pg.database.Database (a pooled connection, retried). The statement text is rendered once
per schema, so psycopg's automatic preparation applies; the transport's hot statements also go
through libpq prepared statements (:meth:`Store.prepared`, kombu_pg.prepared). Methods read the
rendered text from :attr:`Store.sql` by literal name, typed by kombu_pg.store.names.

    store = store_for("kombu_pg")
    with psycopg.connect(url, autocommit=True) as conn:
        for row in store.stats_queues(conn):
            print(row.queue, row.ready)
"""
from __future__ import annotations

import functools

from .beat import BeatStatements
from .console import ConsoleStatements
from .messages import MessageStatements
from .operator import OperatorStatements
from ..queries import migrations_dir
from .upkeep import UpkeepStatements

__all__ = ["Store", "migrations_dir", "store_for"]


class Store(MessageStatements, OperatorStatements, UpkeepStatements, BeatStatements,
            ConsoleStatements):
    """Every statement of the broker, for one schema."""


@functools.cache
def store_for(schema: str) -> Store:
    return Store(schema)
