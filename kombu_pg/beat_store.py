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

from . import config
from .store import store_for

#: Five crontab fields: minute hour day-of-month month day-of-week.
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-]+$")


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


class BeatStore:
    def __init__(self, schema: str = config.Options.schema):
        self.schema = schema
        self._store = store_for(schema)

    # -- reading ----------------------------------------------------------------------------

    def tables_exist(self, conn: psycopg.Connection) -> bool:
        return self._store.beat_tables_exist(conn)

    def entries(self, conn: psycopg.Connection) -> list[EntryRow]:
        return [EntryRow(*row) for row in self._store.beat_entries(conn)]

    def leader(self, conn: psycopg.Connection) -> LeaderRow:
        return LeaderRow(*self._store.beat_leader(conn))

    # -- changing the schedule (each in one transaction, bumping the revision) ----------------

    def add(self, conn: psycopg.Connection, entry: EntryDef, *, replace: bool = False,
            source: str = "cli") -> str:
        """Insert an entry; with ``replace``, an existing one gets the new definition (its run
        state and source are kept). Returns 'added', 'replaced' or 'exists'."""
        definition = dataclasses.asdict(entry)
        with conn.transaction():
            if self._store.beat_insert_entry(conn, definition, source=source):
                outcome = "added"
            elif replace and self._store.beat_replace_entry(conn, definition):
                outcome = "replaced"
            else:
                return "exists"
            self._store.beat_bump_revision(conn)
        return outcome

    def set_paused(self, conn: psycopg.Connection, name: str, paused: bool) -> bool:
        """False if there is no such entry."""
        with conn.transaction():
            if not self._store.beat_set_paused(conn, name=name, paused=paused):
                return False
            self._store.beat_bump_revision(conn)
        return True

    def remove(self, conn: psycopg.Connection, name: str) -> str | None:
        """Delete an entry (and its ticks); its source, or None if there was none."""
        with conn.transaction():
            source = self._store.beat_delete_entry(conn, name=name)
            if source is None:
                return None
            self._store.beat_bump_revision(conn)
        return source

    def sync_config(self, conn: psycopg.Connection, entries: list[EntryDef]) -> dict[str, list[str]]:
        """Make the 'config' entries those given: add new ones, update changed definitions
        (run state kept), delete those no longer given. Entries added from the CLI are left
        alone unless a configured entry has their name (then the configuration wins)."""
        added: list[str] = []
        updated: list[str] = []
        with conn.transaction():
            self._store.beat_sync_lock(conn)
            for entry in sorted(entries, key=lambda e: e.name):
                inserted = self._store.beat_upsert_config_entry(conn, dataclasses.asdict(entry))
                if inserted is not None:
                    (added if inserted else updated).append(entry.name)
            removed = self._store.beat_delete_stale_config(conn, names=[e.name for e in entries])
            if added or updated or removed:
                self._store.beat_bump_revision(conn)
        return {"added": added, "updated": updated, "removed": removed}

    # -- leadership and ticks (the scheduler) ---------------------------------------------------

    def lead(self, conn: psycopg.Connection, me: str, lease: float) -> dt.datetime | None:
        """Take or renew the leadership on this session: the new end of the lease, or None."""
        return self._store.beat_lead(conn, me=me, lease=float(lease))

    def resign(self, conn: psycopg.Connection, me: str) -> bool:
        return self._store.beat_resign(conn, me=me)

    def advance(self, conn: psycopg.Connection, *, name: str, expected: dt.datetime, slot: dt.datetime,
                next_at: dt.datetime | None, me: str, runs: int = 1) -> bool:
        return self._store.beat_advance(conn, name=name, expected=expected, slot=slot, next_at=next_at,
                                        me=me, runs=runs)

    def record_tick(self, conn: psycopg.Connection, *, name: str, slot: dt.datetime, me: str) -> bool:
        return self._store.beat_record_tick(conn, name=name, slot=slot, me=me)

    def set_tick_task(self, conn: psycopg.Connection, *, name: str, slot: dt.datetime, task_id: Any) -> None:
        self._store.beat_set_tick_task(conn, name=name, slot=slot,
                                       task_id=str(task_id) if task_id is not None else None)

    def prune_ticks(self, conn: psycopg.Connection, keep_seconds: float) -> int:
        return self._store.beat_prune_ticks(conn, keep_seconds=float(keep_seconds))
