"""The beat scheduler's statements (sql/beat.sql); kombu_pg.beat_store builds on them."""
from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from .. import lock_keys
from ._base import Statements


class BeatStatements(Statements):
    def beat_session_setup(self, conn: psycopg.Connection, *, limit: str) -> None:
        """Bound every statement, lock wait and idle transaction of the session by ``limit``."""
        conn.execute(self.sql["beat_session_setup"], {"limit": limit})

    def beat_tables_exist(self, conn: psycopg.Connection) -> bool:
        return self._value(conn, self.sql["beat_tables_exist"], {"schema": self.schema})

    def beat_entries(self, conn: psycopg.Connection) -> list[tuple]:
        """Rows in the column order of kombu_pg.beat_store.EntryRow."""
        return conn.execute(self.sql["beat_entries"], {}).fetchall()

    def beat_bump_revision(self, conn: psycopg.Connection) -> None:
        conn.execute(self.sql["beat_bump_revision"], {})

    def beat_insert_entry(self, conn: psycopg.Connection, definition: dict[str, Any], *, source: str) -> bool:
        """``definition``: the fields of beat_store.EntryDef. False if the name is taken."""
        return bool(conn.execute(self.sql["beat_insert_entry"], dict(definition, source=source)).rowcount)

    def beat_replace_entry(self, conn: psycopg.Connection, definition: dict[str, Any]) -> bool:
        return bool(conn.execute(self.sql["beat_replace_entry"], definition).rowcount)

    def beat_sync_lock(self, conn: psycopg.Connection) -> None:
        conn.execute(self.sql["beat_sync_lock"], {"namespace": lock_keys.BEAT_CONFIG_SYNC, "schema": self.schema})

    def beat_upsert_config_entry(self, conn: psycopg.Connection, definition: dict[str, Any]) -> bool | None:
        """True: added, False: its definition changed, None: unchanged."""
        row = conn.execute(self.sql["beat_upsert_config_entry"], definition).fetchone()
        return None if row is None else bool(row[0])

    def beat_delete_stale_config(self, conn: psycopg.Connection, *, names: list[str]) -> list[str]:
        return [row[0] for row in conn.execute(self.sql["beat_delete_stale_config"], {"names": names})]

    def beat_set_paused(self, conn: psycopg.Connection, *, name: str, paused: bool) -> bool:
        """False if there is no such entry."""
        return bool(conn.execute(self.sql["beat_set_paused"], {"name": name, "paused": paused}).rowcount)

    def beat_delete_entry(self, conn: psycopg.Connection, *, name: str) -> str | None:
        """The deleted entry's source, or None if there was none."""
        row = conn.execute(self.sql["beat_delete_entry"], {"name": name}).fetchone()
        return row[0] if row else None

    def beat_leader(self, conn: psycopg.Connection) -> tuple:
        """A row in the column order of kombu_pg.beat_store.LeaderRow."""
        row = self._row(conn, self.sql["beat_leader"], {})
        assert row is not None  # the table has one row
        return row

    def beat_lead(self, conn: psycopg.Connection, *, me: str, lease: float) -> dt.datetime | None:
        row = conn.execute(self.sql["beat_lead"], {"me": me, "lease": lease}).fetchone()
        return row[0] if row else None

    def beat_resign(self, conn: psycopg.Connection, *, me: str) -> bool:
        return bool(conn.execute(self.sql["beat_resign"], {"me": me}).rowcount)

    def beat_advance(self, conn: psycopg.Connection, *, name: str, expected: dt.datetime, slot: dt.datetime,
                     next_at: dt.datetime | None, me: str, runs: int) -> bool:
        return bool(conn.execute(self.sql["beat_advance"], {"name": name, "expected": expected, "slot": slot,
                                                       "next": next_at, "me": me, "runs": runs}).rowcount)

    def beat_record_tick(self, conn: psycopg.Connection, *, name: str, slot: dt.datetime, me: str) -> bool:
        row = conn.execute(self.sql["beat_record_tick"], {"name": name, "slot": slot, "me": me}).fetchone()
        return row is not None

    def beat_set_tick_task(self, conn: psycopg.Connection, *, name: str, slot: dt.datetime,
                           task_id: str | None) -> None:
        conn.execute(self.sql["beat_set_tick_task"], {"name": name, "slot": slot, "task_id": task_id})

    def beat_prune_ticks(self, conn: psycopg.Connection, *, keep_seconds: float) -> int:
        return conn.execute(self.sql["beat_prune_ticks"], {"keep": keep_seconds}).rowcount
