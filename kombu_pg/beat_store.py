"""The tables of the PostgreSQL beat scheduler (migration 0004_beat): statements shared by the
scheduler (``celery_ext.beat``) and the ``kombu-pg beat`` commands.

No Celery here: entries are plain data. Every method takes a psycopg connection; methods that
change the schedule bump ``beat_revision`` in the same transaction, which running schedulers
poll to reload.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import config
from .queries import schema_sql

SOURCES = ("config", "cli")
#: Five crontab fields: minute hour day-of-month month day-of-week.
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-]+$")

#: Arbitrary constant: first key of the advisory lock serializing config syncs (as migrate.py).
_LOCK_NAMESPACE = 0x6B706762  # "kpgb"


class EntryError(ValueError):
    """An invalid entry definition (bad crontab, arguments that are not JSON, ...)."""


def check_crontab(text: str) -> str:
    """A crontab line normalized to single spaces; loose syntax check (Celery parses it)."""
    fields = str(text).split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise EntryError(f"invalid crontab {text!r}: expected five fields, "
                         "'minute hour day-of-month month day-of-week' (e.g. '*/15 * * * *')")
    return " ".join(fields)


def schedule_text(every: float | None, crontab: str | None) -> str:
    if every is not None:
        return f"every {every:g}s"
    return f"crontab({crontab})"


@dataclasses.dataclass
class EntryDef:
    """What defines an entry. args/kwargs/options are JSON text (Kombu's JSON encoding)."""

    name: str
    task: str
    every: float | None = None
    crontab: str | None = None
    args: str = "[]"
    kwargs: str = "{}"
    options: str = "{}"
    from_config: bool = False
    schedule_text: str = ""

    def __post_init__(self):
        if not self.name:
            raise EntryError("an entry needs a name")
        if not self.task:
            raise EntryError(f"entry {self.name!r}: no task")
        if not self.from_config:
            if (self.every is None) == (self.crontab is None):
                raise EntryError(f"entry {self.name!r}: give either every (seconds) or a crontab")
            if self.every is not None and not float(self.every) > 0:
                raise EntryError(f"entry {self.name!r}: every must be > 0 seconds")
            if self.crontab is not None:
                self.crontab = check_crontab(self.crontab)
        self.schedule_text = self.schedule_text or schedule_text(self.every, self.crontab)


@dataclasses.dataclass
class EntryRow:
    name: str
    task: str
    source: str
    every: float | None
    crontab: str | None
    from_config: bool
    schedule_text: str
    args: str  # JSON text
    kwargs: str
    options: str
    paused: bool
    resumed_at: dt.datetime | None
    last_run_at: dt.datetime
    next_run_at: dt.datetime | None
    total_run_count: int
    created_at: dt.datetime
    updated_at: dt.datetime

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("args", "kwargs", "options"):
            data[key] = json.loads(data[key])
        return data


@dataclasses.dataclass
class LeaderRow:
    holder: str | None
    backend_pid: int | None
    leader_until: dt.datetime | None
    elected_at: dt.datetime | None
    renewed_at: dt.datetime | None
    #: The lease ran out (or nobody ever held it).
    expired: bool
    #: The holder's database session still exists.
    session_alive: bool
    #: beat_revision, read in the same statement.
    revision: int

    def free_for(self, me: str) -> bool:
        """Whether ``me`` may take (or keep) the leadership."""
        return self.holder is None or self.holder == me or self.expired or not self.session_alive


_ENTRY_COLUMNS = ("name, task, source, every, crontab, from_config, schedule_text, args::text, "
                  "kwargs::text, options::text, paused, resumed_at, last_run_at, next_run_at, total_run_count, "
                  "created_at, updated_at")


class BeatStore:
    def __init__(self, schema: str = config.Options.schema):
        self.schema = schema
        s = schema_sql(schema)  # every statement below is executed with parameters (maybe {})

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(s=s, columns=sql.SQL(_ENTRY_COLUMNS))

        self._entries = q("SELECT {columns} FROM {s}.beat_entries ORDER BY name")
        self._entry = q("SELECT {columns} FROM {s}.beat_entries WHERE name = %(name)s")
        self._bump = q("UPDATE {s}.beat_revision SET revision = revision + 1")
        self._insert = q(
            "INSERT INTO {s}.beat_entries (name, task, source, every, crontab, from_config, schedule_text,"
            " args, kwargs, options)"
            " VALUES (%(name)s, %(task)s, %(source)s, %(every)s, %(crontab)s, %(from_config)s,"
            " %(schedule_text)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(options)s::jsonb)"
            " ON CONFLICT (name) DO NOTHING")
        # Definition only: the run state (last_run_at, paused, counts) is kept.
        self._replace = q(
            "UPDATE {s}.beat_entries SET task = %(task)s, every = %(every)s, crontab = %(crontab)s,"
            " from_config = %(from_config)s, schedule_text = %(schedule_text)s, args = %(args)s::jsonb,"
            " kwargs = %(kwargs)s::jsonb, options = %(options)s::jsonb, updated_at = now()"
            " WHERE name = %(name)s")
        self._upsert_config = q(
            "INSERT INTO {s}.beat_entries AS e (name, task, source, every, crontab, from_config,"
            " schedule_text, args, kwargs, options)"
            " VALUES (%(name)s, %(task)s, 'config', %(every)s, %(crontab)s, %(from_config)s,"
            " %(schedule_text)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(options)s::jsonb)"
            " ON CONFLICT (name) DO UPDATE SET task = EXCLUDED.task, source = 'config',"
            " every = EXCLUDED.every, crontab = EXCLUDED.crontab, from_config = EXCLUDED.from_config,"
            " schedule_text = EXCLUDED.schedule_text, args = EXCLUDED.args, kwargs = EXCLUDED.kwargs,"
            " options = EXCLUDED.options, updated_at = now()"
            " WHERE (e.task, e.source, e.every, e.crontab, e.from_config, e.schedule_text, e.args,"
            "        e.kwargs, e.options)"
            " IS DISTINCT FROM (EXCLUDED.task, EXCLUDED.source, EXCLUDED.every, EXCLUDED.crontab,"
            "        EXCLUDED.from_config, EXCLUDED.schedule_text, EXCLUDED.args, EXCLUDED.kwargs,"
            "        EXCLUDED.options)"
            " RETURNING (xmax = 0) AS inserted")
        self._delete_stale_config = q(
            "DELETE FROM {s}.beat_entries WHERE source = 'config' AND NOT (name = ANY(%(names)s))"
            " RETURNING name")
        self._set_paused = q(
            "UPDATE {s}.beat_entries SET paused = %(paused)s, updated_at = now(),"
            " resumed_at = CASE WHEN paused AND NOT %(paused)s THEN now() ELSE resumed_at END"
            " WHERE name = %(name)s RETURNING paused")
        self._delete = q("DELETE FROM {s}.beat_entries WHERE name = %(name)s RETURNING source")
        self._sync_lock = sql.SQL("SELECT pg_advisory_xact_lock(%s, hashtext(%s))")
        self._leader = q(
            "SELECT l.holder, l.backend_pid, l.leader_until, l.elected_at, l.renewed_at,"
            " (l.leader_until IS NULL OR l.leader_until < clock_timestamp()) AS expired,"
            " EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid) AS session_alive,"
            " (SELECT revision FROM {s}.beat_revision) AS revision"
            " FROM {s}.beat_leader l")
        # Take or renew the lease, under the same conditions as LeaderRow.free_for, re-checked
        # under the row lock. The leader is bound to this session: see _advance.
        self._lead = q(
            "UPDATE {s}.beat_leader l SET holder = %(me)s, backend_pid = pg_backend_pid(),"
            " leader_until = clock_timestamp() + make_interval(secs => %(lease)s),"
            " renewed_at = clock_timestamp(),"
            " elected_at = CASE WHEN l.holder IS NOT DISTINCT FROM %(me)s AND l.elected_at IS NOT NULL"
            "                   THEN l.elected_at ELSE clock_timestamp() END"
            " WHERE l.holder IS NULL OR l.holder = %(me)s OR l.leader_until IS NULL"
            "    OR l.leader_until < clock_timestamp()"
            "    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid)"
            " RETURNING l.leader_until")
        self._resign = q(
            "UPDATE {s}.beat_leader SET leader_until = clock_timestamp() - interval '1 second'"
            " WHERE holder = %(me)s")
        # Compare-and-set of one entry's last tick, only for the current leader on the session
        # it holds the lease with: a scheduler that lost its session or its lease cannot
        # advance anything, and of two schedulers racing for one tick only the first succeeds.
        self._advance = q(
            "UPDATE {s}.beat_entries e SET last_run_at = %(slot)s, next_run_at = %(next)s,"
            " total_run_count = e.total_run_count + %(runs)s"
            " WHERE e.name = %(name)s AND e.last_run_at = %(expected)s AND NOT e.paused"
            " AND EXISTS (SELECT 1 FROM {s}.beat_leader l WHERE l.holder = %(me)s"
            "             AND l.backend_pid = pg_backend_pid() AND l.leader_until > clock_timestamp())")
        self._record_tick = q(
            "INSERT INTO {s}.beat_ticks (entry, scheduled_at, sent_by) VALUES (%(name)s, %(slot)s, %(me)s)"
            " ON CONFLICT DO NOTHING RETURNING scheduled_at")
        self._tick_task = q(
            "UPDATE {s}.beat_ticks SET task_id = %(task_id)s WHERE entry = %(name)s AND scheduled_at = %(slot)s")
        self._prune = q(
            "DELETE FROM {s}.beat_ticks WHERE scheduled_at < clock_timestamp() - make_interval(secs => %(keep)s)")
        self._ticks = q(
            "SELECT entry, scheduled_at, task_id, sent_by, sent_at FROM {s}.beat_ticks"
            " WHERE (%(name)s::text IS NULL OR entry = %(name)s) ORDER BY scheduled_at DESC, entry LIMIT %(limit)s")

    # -- reading ----------------------------------------------------------------------------

    def tables_exist(self, conn: psycopg.Connection) -> bool:
        name = f"{sql.Identifier(self.schema).as_string(conn)}.beat_entries"
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

    def entries(self, conn: psycopg.Connection) -> list[EntryRow]:
        return [EntryRow(*row) for row in conn.execute(self._entries, {}).fetchall()]

    def entry(self, conn: psycopg.Connection, name: str) -> EntryRow | None:
        row = conn.execute(self._entry, {"name": name}).fetchone()
        return EntryRow(*row) if row else None

    def leader(self, conn: psycopg.Connection) -> LeaderRow:
        return LeaderRow(*conn.execute(self._leader, {}).fetchone())

    def ticks(self, conn: psycopg.Connection, name: str | None = None, limit: int = 50) -> list[dict]:
        cur = conn.cursor(row_factory=dict_row)
        return cur.execute(self._ticks, {"name": name, "limit": limit}).fetchall()

    # -- changing the schedule (each in one transaction, bumping the revision) ----------------

    def add(self, conn: psycopg.Connection, entry: EntryDef, *, replace: bool = False,
            source: str = "cli") -> str:
        """Insert an entry; with ``replace``, an existing one gets the new definition (its run
        state and source are kept). Returns 'added', 'replaced' or 'exists'."""
        params = dict(dataclasses.asdict(entry), source=source)
        with conn.transaction():
            if conn.execute(self._insert, params).rowcount:
                outcome = "added"
            elif replace and conn.execute(self._replace, params).rowcount:
                outcome = "replaced"
            else:
                return "exists"
            conn.execute(self._bump, {})
        return outcome

    def set_paused(self, conn: psycopg.Connection, name: str, paused: bool) -> bool:
        """False if there is no such entry."""
        with conn.transaction():
            if not conn.execute(self._set_paused, {"name": name, "paused": paused}).rowcount:
                return False
            conn.execute(self._bump, {})
        return True

    def remove(self, conn: psycopg.Connection, name: str) -> str | None:
        """Delete an entry (and its ticks); its source, or None if there was none."""
        with conn.transaction():
            row = conn.execute(self._delete, {"name": name}).fetchone()
            if row is None:
                return None
            conn.execute(self._bump, {})
        return row[0]

    def sync_config(self, conn: psycopg.Connection, entries: list[EntryDef]) -> dict[str, list[str]]:
        """Make the 'config' entries those given: add new ones, update changed definitions
        (run state kept), delete those no longer given. Entries added from the CLI are left
        alone unless a configured entry has their name (then the configuration wins)."""
        added, updated = [], []
        with conn.transaction():
            conn.execute(self._sync_lock, (_LOCK_NAMESPACE, self.schema))
            for entry in sorted(entries, key=lambda e: e.name):
                row = conn.execute(self._upsert_config, dataclasses.asdict(entry)).fetchone()
                if row is not None:
                    (added if row[0] else updated).append(entry.name)
            removed = [r[0] for r in conn.execute(
                self._delete_stale_config, {"names": [e.name for e in entries]}).fetchall()]
            if added or updated or removed:
                conn.execute(self._bump, {})
        return {"added": added, "updated": updated, "removed": removed}

    # -- leadership and ticks (the scheduler) ---------------------------------------------------

    def lead(self, conn: psycopg.Connection, me: str, lease: float) -> dt.datetime | None:
        """Take or renew the leadership on this session: the new end of the lease, or None."""
        row = conn.execute(self._lead, {"me": me, "lease": float(lease)}).fetchone()
        return row[0] if row else None

    def resign(self, conn: psycopg.Connection, me: str) -> bool:
        return bool(conn.execute(self._resign, {"me": me}).rowcount)

    def advance(self, conn: psycopg.Connection, *, name: str, expected: dt.datetime, slot: dt.datetime,
                next_at: dt.datetime | None, me: str, runs: int = 1) -> bool:
        return bool(conn.execute(self._advance, {"name": name, "expected": expected, "slot": slot,
                                                 "next": next_at, "me": me, "runs": runs}).rowcount)

    def record_tick(self, conn: psycopg.Connection, *, name: str, slot: dt.datetime, me: str) -> bool:
        return conn.execute(self._record_tick, {"name": name, "slot": slot, "me": me}).fetchone() is not None

    def set_tick_task(self, conn: psycopg.Connection, *, name: str, slot: dt.datetime, task_id: Any) -> None:
        conn.execute(self._tick_task, {"name": name, "slot": slot,
                                       "task_id": str(task_id) if task_id is not None else None})

    def prune_ticks(self, conn: psycopg.Connection, keep_seconds: float) -> int:
        return conn.execute(self._prune, {"keep": float(keep_seconds)}).rowcount
