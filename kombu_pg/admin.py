"""Operator API: dead letters (list, show, replay, purge) and queue statistics.

    from kombu_pg.admin import Admin
    admin = Admin("postgresql://…", schema="kombu_pg")
    for letter in admin.dead_letters(reason="max_attempts"):
        print(letter.id, letter.task_name, letter.errors[-1]["message"])
    admin.replay(task="tasks.charge")
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
from typing import Callable, Iterator

import psycopg

from . import config, counters, pooler
from . import migrate as migrations
from .queries import for_schema

logger = logging.getLogger(__name__)


#: Why a message was dead-lettered: the values of ``dead_letters.reason``.
REASONS = ("max_attempts", "lease_expired", "max_retries", "rejected", "unregistered",
           "undecodable", "expired")

#: What PostgreSQL says when a statement names a table, column or function the schema lacks.
_MISSING_OBJECT = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                   psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName)


class SchemaNotReady(config.ConfigurationError):
    """The schema has no broker tables (a mistyped name, or never migrated) or lacks migrations."""


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which dead letters: every field left None matches all."""

    queue: str | None = None
    task: str | None = None
    reason: str | None = None
    older_than: float | None = None  # seconds since dead-lettered
    newer_than: float | None = None
    replayed: bool | None = None
    ids: list[int] | None = None

    def params(self) -> dict:
        return {"queue": self.queue, "task": self.task, "reason": self.reason,
                "older_than_s": self.older_than, "newer_than_s": self.newer_than,
                "replayed": self.replayed, "ids": list(self.ids) if self.ids else None}


@dataclasses.dataclass(frozen=True)
class DeadLetterSummary:
    id: int
    message_id: int
    queue: str
    task_id: str | None
    task_name: str | None
    reason: str
    attempts: int
    max_attempts: int | None
    dead_lettered_at: dt.datetime
    replayed_at: dt.datetime | None
    last_error_type: str | None
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    id: int
    message_id: int
    queue: str
    priority: int
    task_id: str | None
    task_name: str | None
    reason: str
    attempts: int
    max_attempts: int | None
    errors: list[dict]
    message: dict | None  # the original Kombu message: body, headers, properties
    enqueued_at: dt.datetime
    dead_lettered_at: dt.datetime
    replayed_at: dt.datetime | None
    #: The payload as stored, when it is not a JSON object (an undecodable message; message is None).
    raw_payload: str | None = None


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class Admin:
    def __init__(self, url: str, schema: str = config.Options.schema, role: str = "cli"):
        self.conninfo = config.to_conninfo(url)
        self.role = role  # in the connections' application_name
        self.description = config.mask_url(url)
        self.schema = schema
        self.q = for_schema(schema)
        self.options = config.Options(schema=schema)
        self.channel = self.options.notify_channel

    def connect(self) -> psycopg.Connection:
        """A connection with the transport's default bounds on every wait (keepalives,
        tcp_user_timeout, statement_timeout). Nothing is prepared by name, and behind a pooler
        nothing is set on the session, which other clients of the pooler would share."""
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, prepare_threshold=None,
                                   **self.options.connection_kwargs(self.conninfo, self.role))
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"cannot connect to {self.description}: {config.scrub(exc, self.conninfo)}") from None
        if not pooler.detect(conn, self.q):
            conn.execute(self.q.session_setup, self.options.session_params())
        return conn

    @contextlib.contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        """A connection for the statements below: a schema without (all of) the broker's tables
        is reported as such, naming the fix, rather than as the SQL error it causes."""
        with self.connect() as conn:
            try:
                yield conn
            except _MISSING_OBJECT as exc:
                problem = self._schema_problem(conn)
                if problem is None:
                    raise
                raise SchemaNotReady(problem) from exc

    def _schema_problem(self, conn: psycopg.Connection) -> str | None:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.rollback()
        try:
            missing = migrations.pending(conn, self.schema)
        except (psycopg.Error, config.ConfigurationError):
            return None
        fix = f"`kombu-pg --schema {self.schema} migrate`"
        if len(missing) == len(migrations.available()):
            return (f"schema {self.schema!r} has no kombu-pg tables in {self.description}: check the "
                    f"schema name (--schema, the transport option 'schema'; default "
                    f"{config.Options.schema!r}), or create the tables with {fix}")
        if missing:
            return (f"schema {self.schema!r} lacks migrations {', '.join(f'{v:04d}' for v in missing)}: "
                    f"run {fix}")
        return None

    def dead_letters(self, filter: Filter = Filter(), *, after: int = 0,
                     limit: int = 50, **filters) -> list[DeadLetterSummary]:
        """One page of dead letters with id > ``after``, oldest first."""
        filter = dataclasses.replace(filter, **filters)
        with self.session() as conn:
            rows = conn.execute(self.q.dlq_list, dict(filter.params(), after=after, limit=limit)).fetchall()
        return [DeadLetterSummary(*row) for row in rows]

    def dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        with self.session() as conn:
            row = conn.execute(self.q.dlq_get, {"id": dead_letter_id}).fetchone()
        if row is None:
            return None
        values = list(row)
        message = _json_object(values[10])
        raw_payload = None if message is not None else values[10]
        values[10] = message
        return DeadLetter(*values, raw_payload=raw_payload)

    def replay(self, filter: Filter = Filter(), *, batch: int = 1000,
               progress: Callable[[int], None] | None = None, **filters) -> int:
        """Put matching dead letters back on their queues, all or none; returns how many."""
        filter = dataclasses.replace(filter, **filters)
        total, after = 0, 0
        with self.session() as conn, conn.transaction():
            while True:
                count, last_id, _ = conn.execute(self.q.dlq_replay_batch, dict(
                    filter.params(), after=after, limit=batch, channel=self.channel)).fetchone()
                if not count:
                    break
                total, after = total + count, last_id
                if progress:
                    progress(count)
        counters.add("replayed", filter.queue or "", total)
        logger.info("kombu_pg: replayed %d dead letter(s) (%s)", total, filter)
        return total

    def count(self, filter: Filter = Filter(), **filters) -> int:
        filter = dataclasses.replace(filter, **filters)
        with self.session() as conn:
            return conn.execute(self.q.dlq_count, filter.params()).fetchone()[0]

    def purge(self, filter: Filter = Filter(), **filters) -> int:
        """Delete matching dead letters; returns how many."""
        filter = dataclasses.replace(filter, **filters)
        with self.session() as conn:
            return conn.execute(self.q.dlq_purge, filter.params()).rowcount

    def stats(self) -> dict:
        """Per queue: ready, delayed, leased, oldest ready age; dead letters by queue and reason."""
        with self.session() as conn:
            queues = conn.execute(self.q.stats_queues, {}).fetchall()
            dead = conn.execute(self.q.stats_dead_letters, {}).fetchall()
        return {
            "queues": [{"queue": name, "ready": ready, "delayed": delayed, "leased": leased,
                        "oldest_ready_age_s": float(age) if age is not None else None}
                       for name, ready, delayed, leased, age in queues],
            "dead_letters": [{"queue": queue, "reason": reason, "count": count}
                             for queue, reason, count in dead],
        }
