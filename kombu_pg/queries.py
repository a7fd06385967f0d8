"""The transport's SQL, loaded once from ``queries.sql`` and bound to a schema."""
from __future__ import annotations

import functools
import re
from pathlib import Path

from psycopg import sql

_BLOCK = re.compile(r"^-- name: (\w+)\n", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _BLOCK.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2])}


_TEMPLATES = _parse((Path(__file__).with_name("queries.sql")).read_text())


class Queries:
    """The statements with ``{schema}`` replaced by the quoted schema name.

    Rendered to plain strings once, so that each execution sends the same text and psycopg's
    automatic statement preparation applies.
    """

    def __init__(self, schema: str):
        self.schema = schema
        ident = sql.Identifier(schema)
        for name, template in _TEMPLATES.items():
            # Only the schema goes through format(); values stay %(name)s placeholders.
            # Comment lines are for readers of queries.sql, not for the wire.
            code = "\n".join(line for line in template.splitlines() if not line.startswith("--"))
            setattr(self, name, sql.SQL(code).format(schema=ident).as_string(None))


@functools.cache
def for_schema(schema: str) -> Queries:
    return Queries(schema)
