"""What every part of the store shares: the rendered statements and how they are run."""
from __future__ import annotations

from typing import Any, Protocol, cast

import psycopg

from ..queries import Queries, for_schema
from .names import StatementName


class Runner(Protocol):
    """Runs one statement somewhere else than on a given connection (kombu_pg.database.Database:
    a pooled connection, retried once the connection broke): rows if ``fetch``, else the count."""

    def run(self, query: str, params: Any = None, *, fetch: bool = False) -> Any: ...


#: Where a statement runs: a connection (in the caller's transaction, if any) or a runner.
Target = psycopg.Connection | Runner


class Statements:
    """Bound to one schema: every statement rendered once (see queries.Queries). Parameters are
    always passed as a mapping, an empty one too: a ``%`` in the schema name is doubled."""

    def __init__(self, schema: str):
        self.schema = schema
        self.queries: Queries = for_schema(schema)
        #: Statement name -> its text, indexed by literal names only (a type checker knows them).
        self.sql = cast(dict[StatementName, str], self.queries.texts)

    @staticmethod
    def _rows(target: Target, query: str, params: dict[str, Any]) -> list[tuple]:
        if isinstance(target, psycopg.Connection):
            return target.execute(query, params).fetchall()
        return target.run(query, params, fetch=True)

    @classmethod
    def _row(cls, target: Target, query: str, params: dict[str, Any]) -> tuple | None:
        rows = cls._rows(target, query, params)
        return rows[0] if rows else None

    @classmethod
    def _value(cls, target: Target, query: str, params: dict[str, Any]) -> Any:
        """The first column of the statement's one row."""
        row = cls._row(target, query, params)
        if row is None:
            raise LookupError("the statement returned no row")
        return row[0]

    @staticmethod
    def _count(target: Target, query: str, params: dict[str, Any]) -> int:
        """The statement's row count (rows changed, or returned)."""
        if isinstance(target, psycopg.Connection):
            return target.execute(query, params).rowcount
        return target.run(query, params)
