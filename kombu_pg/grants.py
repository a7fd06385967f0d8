"""The privileges a runtime role needs on a migrated schema (``kombu-pg grants``), from grants.sql.

Applied by the store (``Store.grant``), which runs them in one transaction."""
from __future__ import annotations

from pathlib import Path

from psycopg import sql

_TEMPLATE = Path(__file__).with_name("grants.sql").read_text()


def statements(schema: str, role: str) -> list[str]:
    """The GRANT statements of grants.sql for ``role`` on ``schema``, names quoted as needed."""
    code = "\n".join(line for line in _TEMPLATE.splitlines() if not line.startswith("--"))
    names = {"schema": sql.Identifier(schema), "role": sql.Identifier(role)}
    return [sql.SQL(" ".join(text.split())).format(**names).as_string(None)
            for text in code.split(";") if text.strip()]

