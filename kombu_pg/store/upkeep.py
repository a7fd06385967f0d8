"""Sessions (sql/sessions.sql), migrations (sql/migrate.sql), housekeeping rounds and the
vacuum service (sql/housekeeping.sql)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg
from psycopg import sql

from .. import grants
from ._base import Statements, Target
from .records import ExpiredTask, LockHolder, Reaped, VacuumStats


class UpkeepStatements(Statements):
    # -- sessions -----------------------------------------------------------------------------

    def session_setup(self, conn: psycopg.Connection, *, statement_timeout: str) -> None:
        conn.execute(self.sql["session_setup"], {"statement_timeout": statement_timeout})

    def server_backend_pid(self, conn: psycopg.Connection) -> int:
        """The server process running this connection's statements (see pooler.py)."""
        return self._value(conn, self.sql["server_backend_pid"], {})

    def listen(self, conn: psycopg.Connection, *, channel: str) -> None:
        conn.execute(self.queries.compose("listen", channel=channel))

    # -- migrations ---------------------------------------------------------------------------

    def migrations_table_exists(self, conn: psycopg.Connection) -> bool:
        """Read only; raises InsufficientPrivilege when the role may not use the schema."""
        return self._value(conn, self.sql["migrations_table_exists"], {"schema": self.schema})

    def applied_migrations(self, conn: psycopg.Connection) -> set[int]:
        return {row[0] for row in conn.execute(self.sql["applied_migrations"], {})}

    def migrate_lock(self, conn: psycopg.Connection, *, namespace: int, timeout: str) -> None:
        """Take the schema's migration lock for this transaction, waiting at most ``timeout``
        ('1500ms'): LockNotAvailable then. The migrations' own waits are unbounded again after."""
        conn.execute(self.sql["migrate_lock"],
                     {"timeout": timeout, "namespace": namespace, "schema": self.schema})
        conn.execute(self.sql["migrate_lock_taken"])  # two statements: the simple protocol, no parameters

    def migrate_lock_holders(self, conn: psycopg.Connection, *, namespace: int) -> list[LockHolder]:
        return [LockHolder(*row) for row in conn.execute(
            self.sql["migrate_lock_holders"], {"namespace": namespace, "schema": self.schema})]

    def create_migrations_table(self, conn: psycopg.Connection) -> None:
        """The schema and its schema_migrations table, if missing."""
        conn.execute(self.sql["create_schema"], {})
        conn.execute(self.sql["create_migrations_table"], {})

    def apply_migration(self, conn: psycopg.Connection, path: Path, *, version: int, name: str) -> None:
        """Run migration file ``path`` (several statements: sent without parameters, so psycopg
        uses the simple query protocol) and record it, in the caller's transaction."""
        conn.execute(sql.SQL(path.read_text()).format(schema=sql.Identifier(self.schema)))
        conn.execute(self.sql["record_migration"], {"version": version, "name": name})

    def grant(self, conn: psycopg.Connection, *, role: str) -> list[str]:
        """Give ``role`` the runtime privileges of kombu_pg/grants.sql, all or none; the
        statements run."""
        done = grants.statements(self.schema, role)
        with conn.transaction():
            for statement in done:
                conn.execute(statement)
        return done

    # -- housekeeping rounds (in the round's transaction) -------------------------------------

    def housekeeper_renew(self, conn: psycopg.Connection, *, holder: str, lease_s: float) -> dt.datetime | None:
        """The lease's new end if it is still ours (the row stays locked until commit)."""
        row = conn.execute(self.sql["housekeeper_renew"], {"holder": holder, "lease_s": lease_s}).fetchone()
        return row[0] if row else None

    def housekeeper_resign(self, target: Target, *, holder: str) -> None:
        self._count(target, self.sql["housekeeper_resign"], {"holder": holder})

    def reap(self, conn: psycopg.Connection, *, limit: int, default_max_attempts: int,
             held: list[int]) -> list[Reaped]:
        return [Reaped(*row) for row in conn.execute(self.sql["reap"], {
            "limit": limit, "default_max_attempts": default_max_attempts, "held": held})]

    def wake_queues(self, conn: psycopg.Connection, *, queues: list[str], channel: str) -> None:
        conn.execute(self.sql["wake_queues"], {"queues": queues, "channel": channel})

    def sweep_expired_queues(self, conn: psycopg.Connection, *, auto_delete_expires_s: float) -> int:
        """How many messages went with the expired queues."""
        return conn.execute(self.sql["sweep_expired_queues"],
                            {"auto_delete_expires_s": auto_delete_expires_s}).rowcount

    def sweep_expired_messages(self, conn: psycopg.Connection) -> int:
        return conn.execute(self.sql["sweep_expired_messages"], {}).rowcount

    def sweep_expired_tasks(self, conn: psycopg.Connection, *, grace_s: float, limit: int) -> list[ExpiredTask]:
        return [ExpiredTask(*row) for row in conn.execute(
            self.sql["sweep_expired_tasks"], {"grace_s": grace_s, "limit": limit})]

    def sweep_revoked(self, conn: psycopg.Connection) -> int:
        return conn.execute(self.sql["sweep_revoked"], {}).rowcount

    def revoked_to_mark(self, conn: psycopg.Connection, *, limit: int) -> list[str]:
        return [row[0] for row in conn.execute(self.sql["revoked_to_mark"], {"limit": limit})]

    # -- vacuum -------------------------------------------------------------------------------

    def vacuum_due(self, target: Target) -> VacuumStats | None:
        """None when the schema has no messages table."""
        row = self._row(target, self.sql["vacuum_due"], {"schema": self.schema})
        return VacuumStats(*row) if row else None

    def vacuum_messages(self, conn: psycopg.Connection) -> None:
        """Outside a transaction (autocommit)."""
        conn.execute(self.sql["vacuum_messages"], {})
