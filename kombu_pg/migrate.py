"""Apply the numbered SQL files in ``migrations/`` to a schema, once, under an advisory lock."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg
from psycopg import sql

from .queries import schema_sql

logger = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
# Arbitrary constant: the first key of the two-int advisory lock that serializes migrations.
_LOCK_NAMESPACE = 0x6B706D67  # "kpmg"


def migrations_dir() -> Path:
    """Inside the wheel the files are package data; in a checkout they sit at the top level."""
    packaged = Path(__file__).with_name("migrations")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "migrations"


def available() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = _FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    if not found:
        raise RuntimeError(f"no migrations found in {migrations_dir()}")
    return found


def migrate(conn: psycopg.Connection, schema: str) -> list[int]:
    """Bring ``schema`` up to date; returns the versions applied (empty if none were due).

    One transaction: concurrent migrators wait on the advisory lock, then see the versions the
    first one recorded (PostgreSQL DDL is transactional, so a failure leaves nothing behind).
    """
    ident = sql.Identifier(schema)
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_NAMESPACE, schema))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())").format(ident))
        done = {row[0] for row in conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations").format(ident))}
        for version, name, path in available():
            if version in done:
                continue
            # A migration file holds several statements: sent without parameters, psycopg uses
            # the simple query protocol, which accepts them in one call.
            conn.execute(sql.SQL(path.read_text()).format(schema=ident))
            conn.execute(sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)")
                         .format(schema_sql(schema)), (version, name))
            logger.info("kombu_pg: applied migration %04d_%s to schema %s", version, name, schema)
            applied.append(version)
    return applied


def pending(conn: psycopg.Connection, schema: str) -> list[int]:
    """Versions not yet applied (all of them if the schema does not exist)."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                          (f"{sql.Identifier(schema).as_string(conn)}.schema_migrations",)).fetchone()[0]
    done = set()
    if exists:
        done = {row[0] for row in conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema)))}
    return [version for version, _, _ in available() if version not in done]
