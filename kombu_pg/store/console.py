"""The per-minute counts every process writes (sql/stats.sql) and what the operator's web
console reads besides the operator statements (sql/console.sql): rates, lease holders."""
from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import psycopg

from ._base import Statements, Target


class MinuteCount(NamedTuple):
    """Events of one kind counted on a queue within a minute, by all processes."""

    minute: dt.datetime
    queue: str  # "" where a process counted what it cannot attribute to a queue
    event: str  # a counter of kombu_pg.counters: published, acked, retried, dead_lettered, ...
    total: int


class LeaseHolder(NamedTuple):
    """A consumer holding leases now."""

    leased_by: str | None  # "<worker>[<pid>]"; None for a lease taken by an older version
    since: dt.datetime | None  # its oldest lease's start
    leases: int
    queues: list[str]


class Lease(NamedTuple):
    """A leased message."""

    message_id: int
    queue: str
    task_id: str | None
    task_name: str | None
    leased_by: str | None
    leased_at: dt.datetime | None
    leased_until: dt.datetime
    attempt: int


class ConsoleStatements(Statements):
    # -- per-minute counts --------------------------------------------------------------------

    def stats_flush(self, target: Target, *, counts: dict[tuple[str, str], int], lag_s: float,
                    prune: bool, keep_s: float) -> int:
        """Add ``counts`` ((event, queue) -> delta) to the minute ``lag_s`` seconds ago; with
        ``prune``, delete rows older than ``keep_s`` first. The number of rows written."""
        return self._count(target, self.sql["stats_flush"], {
            "queues": [queue for _, queue in counts], "events": [event for event, _ in counts],
            "counts": list(counts.values()), "lag_s": lag_s, "prune": prune, "keep_s": keep_s})

    # -- the console ----------------------------------------------------------------------------

    def console_rates(self, conn: psycopg.Connection, *, minutes: int) -> list[MinuteCount]:
        """The counts of the last ``minutes`` minutes and the current one, oldest first."""
        return [MinuteCount(*row) for row in self._rows(conn, self.sql["console_rates"], {"minutes": minutes})]

    def console_minute(self, conn: psycopg.Connection) -> dt.datetime:
        """The current minute on the server's clock."""
        return self._value(conn, self.sql["console_minute"], {})

    def console_lease_holders(self, conn: psycopg.Connection) -> list[LeaseHolder]:
        return [LeaseHolder(by, since, leases, list(queues))
                for by, since, leases, queues in self._rows(conn, self.sql["console_lease_holders"], {})]

    def console_leases(self, conn: psycopg.Connection, *, limit: int) -> list[Lease]:
        return [Lease(*row) for row in self._rows(conn, self.sql["console_leases"], {"limit": limit})]

    def console_dead_letter_tasks(self, conn: psycopg.Connection) -> list[str]:
        return [row[0] for row in self._rows(conn, self.sql["console_dead_letter_tasks"], {})]
