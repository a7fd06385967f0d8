"""Operator API: dead letters (list, show, replay, purge), queue statistics, where a task is,
durable revokes and queue purges.

    from kombu_pg.admin import Admin
    admin = Admin("postgresql://…", schema="kombu_pg")
    for letter in admin.dead_letters(reason="max_attempts"):
        print(letter.id, letter.task_name, letter.errors[-1]["message"])
    admin.replay(task="tasks.charge")
    print(admin.task("5f1c…").state)  # ready, delayed, leased, dead_lettered, revoked, not_found
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
from typing import Callable, Iterator

import psycopg

from . import config, counters, pooler, revocation
from . import migrate as migrations
from .reasons import REASONS, Reason  # noqa: F401 (API)
from .store import store_for
from .store.records import (DeadLetterSummary, Filter, QueueCount, Revocation,  # noqa: F401 (API)
                            TaskMessage)

logger = logging.getLogger(__name__)



#: What PostgreSQL says when a statement names a table, column or function the schema lacks.
_MISSING_OBJECT = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                   psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName)


class SchemaNotReady(config.ConfigurationError):
    """The schema has no broker tables (a mistyped name, or never migrated) or lacks migrations."""


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


@dataclasses.dataclass(frozen=True)
class TaskLookup:
    """Where a task is: its messages, dead letters and durable revoke."""

    task_id: str
    messages: list[TaskMessage]
    dead_letters: list[DeadLetterSummary]
    revoked: Revocation | None

    @property
    def state(self) -> str:
        """leased, ready or delayed (the first that applies to one of its messages), else
        dead_lettered, revoked, or not_found: acked (done), or never published here."""
        for state in ("leased", "ready", "delayed"):
            if any(m.state == state for m in self.messages):
                return state
        if any(d.replayed_at is None for d in self.dead_letters):
            return "dead_lettered"
        return "revoked" if self.revoked else "not_found"


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
        self.store = store_for(schema)
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
                f"cannot connect to {self.description}: {config.scrub(str(exc), self.conninfo)}") from None
        if not pooler.detect(conn, self.store):
            self.store.session_setup(conn, **self.options.session_params())
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
            return self.store.dlq_list(conn, filter, after=after, limit=limit)

    def dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        with self.session() as conn:
            row = self.store.dlq_get(conn, id=dead_letter_id)
        if row is None:
            return None
        message = _json_object(row.payload)
        return DeadLetter(*row[:10], message, *row[11:],
                          raw_payload=None if message is not None else row.payload)

    def replay(self, filter: Filter = Filter(), *, batch: int = 1000,
               progress: Callable[[int], None] | None = None, **filters) -> int:
        """Put matching dead letters back on their queues, all or none; returns how many."""
        filter = dataclasses.replace(filter, **filters)
        total, after = 0, 0
        with self.session() as conn, conn.transaction():
            while True:
                count, last_id = self.store.dlq_replay_batch(conn, filter, after=after, limit=batch,
                                                             channel=self.channel)
                if not count or last_id is None:
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
            return self.store.dlq_count(conn, filter)

    def purge(self, filter: Filter = Filter(), **filters) -> int:
        """Delete matching dead letters; returns how many."""
        filter = dataclasses.replace(filter, **filters)
        with self.session() as conn:
            return self.store.dlq_purge(conn, filter)

    def stats(self) -> dict:
        """Per queue: ready, delayed, leased, oldest ready age; dead letters by queue and reason."""
        with self.session() as conn:
            queues = self.store.stats_queues(conn)
            dead = self.store.stats_dead_letters(conn)
        return {"queues": [row._asdict() for row in queues],
                "dead_letters": [{"queue": queue, "reason": reason, "count": count} for queue, reason, count in dead]}

    # -- tasks --------------------------------------------------------------------------------

    def task(self, task_id: str) -> TaskLookup:
        """Where task ``task_id`` is: waiting, delayed, leased (by whom, since when), its
        attempts and errors, dead-lettered, revoked, or not found (acked, or never seen)."""
        with self.connect() as conn:
            return TaskLookup(
                task_id,
                self.store.task_messages(conn, task_id=task_id, default_max_attempts=self.options.max_attempts),
                self.store.task_dead_letters(conn, task_id=task_id),
                self.store.task_revoked(conn, task_id=task_id))

    def revoke(self, task_ids, *, expires: float = config.Options.revoke_expires,
               marked: bool = False) -> list[revocation.Outcome]:
        """Durable revoke without a Celery worker: remove the tasks' waiting messages and record
        the ids for ``expires`` seconds, so that no worker runs them (one started later too).
        Tasks removed here are marked REVOKED in the result backend by the next housekeeping
        round of a worker, unless the caller does (``marked``)."""
        with self.connect() as conn:
            outcomes = revocation.revoke(conn, self.store, task_ids, expires=expires, unmarked=not marked)
        logger.info("kombu_pg: revoked %s: removed %d waiting message(s)", ", ".join(map(str, task_ids)),
                    sum(o.removed for o in outcomes))
        return outcomes

    # -- queues -------------------------------------------------------------------------------

    def queue_counts(self, queues) -> list[QueueCount]:
        """Ready, delayed and leased messages of each of ``queues``."""
        with self.connect() as conn:
            return self.store.queue_counts(conn, queues=list(queues))

    def purge_queues(self, queues, *, delayed: bool = False, leased: bool = False) -> dict[str, dict]:
        """Delete the ready messages of ``queues`` (as ``celery purge``), and with ``delayed``
        those waiting for an ETA, countdown or retry backoff, with ``leased`` those consumers
        hold (their tasks still run; their acks then find nothing). Per queue, what went."""
        with self.connect() as conn:
            rows = self.store.purge_queues(conn, queues=list(queues), delayed=delayed, leased=leased)
        gone = {queue: {"ready": 0, "delayed": 0, "leased": 0} for queue in queues}
        for queue, ready, delayed_count, leased_count in rows:
            gone[queue] = {"ready": ready, "delayed": delayed_count, "leased": leased_count}
        logger.info("kombu_pg: purged %s", gone)
        return gone
