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
        # Fragments (blocks named fragment_*) are spliced into the statements that name them.
        values = {"schema": schema_sql(schema)}
        values.update((name.removeprefix("fragment_"), sql.SQL(_code(template)))
                      for name, template in _TEMPLATES.items() if name.startswith("fragment_"))
        for name, template in _TEMPLATES.items():
            if not name.startswith("fragment_"):
                # Only names go through format(); values stay %(name)s placeholders.
                setattr(self, name, sql.SQL(_code(template)).format(**values).as_string(None))


def schema_sql(schema: str) -> sql.SQL:
    """The quoted schema name, for statements executed with parameters.

    psycopg and prepared.py read ``%`` as the start of a placeholder, in names too: a ``%`` in
    the name is doubled, which both read back as one. Such a statement must always be executed
    with a parameter mapping (an empty one if it has no placeholders), or the ``%%`` stays.
    """
    return sql.SQL(sql.Identifier(schema).as_string(None).replace("%", "%%"))


def _code(template: str) -> str:
    """Comment lines are for readers of queries.sql, not for the wire."""
    return "\n".join(line for line in template.splitlines() if not line.startswith("--"))


@functools.cache
def for_schema(schema: str) -> Queries:
    return Queries(schema)
