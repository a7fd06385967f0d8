"""The broker's SQL, loaded once from the ``sql/*.sql`` files and rendered for a schema.

Each file holds named blocks (``-- name: x``). Blocks named ``fragment_*`` are pieces of SQL
spliced in where another block (or fragment) says ``{x}``; ``{schema}`` is the quoted schema
name; values are always ``%(name)s`` parameters. A statement with another ``{name}`` (an
identifier known only at run time, such as LISTEN's channel) is kept as a template.

Their caller is :mod:`kombu_pg.store` (the hot ones also run through prepared.py).
"""
from __future__ import annotations

import functools
import re
import string
from pathlib import Path

from psycopg import sql

SQL_DIR = Path(__file__).with_name("sql")
_BLOCK = re.compile(r"^-- name: (\w+)\n", re.MULTILINE)
_FRAGMENT = "fragment_"


def _parse(text: str) -> dict[str, str]:
    parts = _BLOCK.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2])}


def _load() -> dict[str, dict[str, str]]:
    """File stem -> {block name -> block text, comments included}; names are unique."""
    files = {path.stem: _parse(path.read_text()) for path in sorted(SQL_DIR.glob("*.sql"))}
    seen: dict[str, str] = {}
    for stem, blocks in files.items():
        for name in blocks:
            if name in seen:
                raise RuntimeError(f"statement {name!r} is defined in {seen[name]}.sql and {stem}.sql")
            seen[name] = stem
    return files


FILES = _load()
TEMPLATES: dict[str, str] = {name: text for blocks in FILES.values() for name, text in blocks.items()}
#: The statements (every block but the fragments).
NAMES: tuple[str, ...] = tuple(name for name in TEMPLATES if not name.startswith(_FRAGMENT))


def migrations_dir() -> Path:
    """Where the numbered migration files are (the one place that knows): inside the wheel
    they are package data, kombu_pg/migrations (pyproject.toml force-includes them); in a
    checkout they sit at the top level."""
    packaged = SQL_DIR.parent / "migrations"
    return packaged if packaged.is_dir() else SQL_DIR.resolve().parent.parent / "migrations"


def placeholders(text: str) -> set[str]:
    """The ``{name}`` placeholders of a template."""
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def _code(template: str) -> str:
    """Comment lines are for readers of the .sql files, not for the wire."""
    return "\n".join(line for line in template.splitlines() if not line.lstrip().startswith("--"))


@functools.cache
def expanded(name: str) -> str:
    """The code of block ``name`` with its fragments spliced in (recursively), comments gone;
    ``{schema}`` and other names still to be filled."""
    code = _code(TEMPLATES[name])
    for field in placeholders(code):
        if _FRAGMENT + field in TEMPLATES:
            code = code.replace("{" + field + "}", expanded(_FRAGMENT + field))
    return code


class Queries:
    """The statements as plain strings, ``{schema}`` replaced by the quoted schema name.

    Rendered once, so that each execution sends the same text and psycopg's automatic statement
    preparation applies (and prepared.py can prepare them by name). :attr:`texts` maps statement
    names to them; statements with a run-time identifier are in :attr:`templates` instead. The
    store reads them by literal name (kombu_pg.store.names).
    """

    def __init__(self, schema: str):
        self.schema = schema
        self.texts: dict[str, str] = {}
        self.templates: dict[str, str] = {}
        quoted = schema_sql(schema)
        for name in NAMES:
            code = expanded(name)
            if placeholders(code) - {"schema"}:
                self.templates[name] = code
            else:
                # Only names go through format(); values stay %(name)s placeholders.
                self.texts[name] = sql.SQL(code).format(schema=quoted).as_string(None)

    def compose(self, name: str, **identifiers: str) -> sql.Composed:
        """Statement ``name`` with its run-time identifiers quoted (never for the hot path)."""
        return sql.SQL(self.templates[name]).format(
            schema=sql.Identifier(self.schema), **{k: sql.Identifier(v) for k, v in identifiers.items()})


def schema_sql(schema: str) -> sql.SQL:
    """The quoted schema name, for statements executed with parameters.

    psycopg and prepared.py read ``%`` as the start of a placeholder, in names too: a ``%`` in
    the name is doubled, which both read back as one. Such a statement must always be executed
    with a parameter mapping (an empty one if it has no placeholders), or the ``%%`` stays.
    """
    return sql.SQL(sql.Identifier(schema).as_string(None).replace("%", "%%"))


@functools.cache
def for_schema(schema: str) -> Queries:
    return Queries(schema)
