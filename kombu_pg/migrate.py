"""Apply the numbered SQL files in ``migrations/`` to a schema, once, under an advisory lock."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg

from . import lock_keys
from .config import ConfigurationError, Options
from .store import migrations_dir, store_for

logger = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
#: The fix named by every error here: who may apply migrations, and how.
FIX = ("run `kombu-pg migrate` as a role that may create the schema (the auto_migrate transport "
       "option makes clients migrate on connect, which needs such a role)")


class MigrationError(ConfigurationError):
    """The schema needs migrations this connection cannot apply (one line, no password)."""


def available() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = _FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    if not found:
        raise RuntimeError(f"no migrations found in {migrations_dir()}")
    return found


def migrate(conn: psycopg.Connection, schema: str,
            lock_timeout: float = Options.migrate_lock_timeout, up_to: int | None = None) -> list[int]:
    """Bring ``schema`` up to date (or to version ``up_to``); returns the versions applied
    (empty if none were due).

    One transaction: concurrent migrators wait on the advisory lock (at most ``lock_timeout``
    seconds), then see the versions the first one recorded (PostgreSQL DDL is transactional,
    so a failure leaves nothing behind). Raises :class:`MigrationError` when the lock stays
    taken or the role lacks a privilege.
    """
    store = store_for(schema)
    applied: list[int] = []
    try:
        with conn.transaction():
            _lock(conn, schema, lock_timeout)
            store.create_migrations_table(conn)
            done = store.applied_migrations(conn)
            for version, name, path in available():
                if version in done or (up_to is not None and version > up_to):
                    continue
                store.apply_migration(conn, path, version=version, name=name)
                logger.info("kombu_pg: applied migration %04d_%s to schema %s", version, name, schema)
                applied.append(version)
    except _LockTimeout:
        raise MigrationError(
            f"schema {schema!r} needs {_needed(conn, schema)} but the migration lock stayed taken for "
            f"{lock_timeout:g} s ({_holders(conn, schema)}): {FIX}") from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationError(
            f"schema {schema!r} needs {_needed(conn, schema)}, which role {conn.info.user!r} may not "
            f"apply ({_one_line(exc)}): {FIX}") from None
    return applied


class _LockTimeout(Exception):
    pass


def _lock(conn: psycopg.Connection, schema: str, timeout: float) -> None:
    try:
        store_for(schema).migrate_lock(conn, namespace=lock_keys.MIGRATIONS,
                                       timeout=f"{max(1, round(timeout * 1000))}ms")
    except psycopg.errors.LockNotAvailable:
        raise _LockTimeout() from None


def _holders(conn: psycopg.Connection, schema: str) -> str:
    rows = store_for(schema).migrate_lock_holders(conn, namespace=lock_keys.MIGRATIONS)
    held = [f"pid {pid}, role {user!r}" + (f", application {app!r}" if app else "") for pid, user, app in rows]
    return "held by " + "; ".join(held) if held else "its holder is gone now"


def pending(conn: psycopg.Connection, schema: str) -> list[int]:
    """Versions not yet applied (all of them if the schema does not exist). Read only."""
    store = store_for(schema)
    try:
        done = store.applied_migrations(conn) if store.migrations_table_exists(conn) else set()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationError(
            f"role {conn.info.user!r} may not read schema {schema!r} ({_one_line(exc)}): grant it "
            f"the runtime privileges with `kombu-pg grants {conn.info.user} --apply`, run by the "
            "schema's owner") from None
    return [version for version, _, _ in available() if version not in done]


def _needed(conn: psycopg.Connection, schema: str) -> str:
    """'migrations 0004, 0005', for an error message (just "migrations" if that cannot be read)."""
    try:
        versions = pending(conn, schema)
    except (MigrationError, psycopg.Error):
        versions = []
    return "migrations " + ", ".join(f"{v:04d}" for v in versions) if versions else "migrations"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
