"""Per-minute event counts in PostgreSQL (table ``queue_stats``, migration 0009), so that rates
outlive the processes that counted them (the console's rates and charts: ``kombu-pg web``).

The in-process counters (:mod:`kombu_pg.counters`) stay the only work on the hot path. A
thread of each process that uses the broker looks at them once a minute
(``KOMBU_PG_STATS_INTERVAL`` seconds) and, if anything was counted since the last look, adds the
deltas in one upsert; a process that counted nothing writes nothing, so idle workers cost the
server no more than before. Workers, producers and beat alike: each process counts and flushes
what it did itself (a prefork pool child too, through its own connection). What remains
unflushed is written when the process exits normally (atexit, if its pool is still open); a
killed process loses at most a minute of counts.

A process that uses several databases or schemas flushes into the last one it started using
(the counters do not tell them apart); what it counted before is written to the previous one
at the switch, if that one is still open.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any, Protocol

import psycopg

from . import counters
from .config import Options
from .store import store_for

logger = logging.getLogger(__name__)

INTERVAL_ENV = "KOMBU_PG_STATS_INTERVAL"
DEFAULT_INTERVAL = 60.0
#: Rows older than this are deleted by the flushing processes...
KEEP_SECONDS = 86400
#: ...each at most this often.
PRUNE_EVERY_SECONDS = 3600


class Database(Protocol):
    """Where the counts go (kombu_pg.connections.Connections): its schema, and a runner of
    statements (see kombu_pg.store)."""

    options: Options

    def run(self, query: str, params: Any = None, *, fetch: bool = False) -> Any: ...


def interval() -> float:
    try:
        return max(float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL), 0.1)
    except ValueError:
        logger.warning("kombu_pg: %s=%r is not a number of seconds: using %s", INTERVAL_ENV,
                       os.environ[INTERVAL_ENV], DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL


class Flusher:
    """The flushing thread of one process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._db: weakref.ref[Database] | None = None
        self._baseline = counters.snapshot()  # counts of a forked child's parent are not ours
        self._window_start = time.time()
        self._next_prune = 0.0  # monotonic; the first flush prunes
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._refused: str | None = None  # the last error, logged once

    def watch(self, db: Database, *, thread: bool = True) -> None:
        previous = self._db() if self._db else None
        if previous is not None and previous is not db:
            # What was counted so far belongs to the database in use until now: written there
            # if its pool is still open, else dropped (never into the next one).
            if getattr(previous, "_pool", None) is not None:
                self.flush()
            with self._lock:
                self._baseline, self._window_start = counters.snapshot(), time.time()
        self._db = weakref.ref(db)
        if thread and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kombu_pg-stats", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        period = interval()
        while True:
            time.sleep(period)
            self.flush()

    def flush(self) -> int:
        """Write what was counted since the last flush; returns the number of (queue, event)
        rows written (0 when nothing was counted or the write failed, which is logged)."""
        db = self._db() if self._db else None
        if db is None:
            return 0
        with self._lock:
            now, snapshot = time.time(), counters.snapshot()
            deltas = {key: n - self._baseline.get(key, 0) for key, n in snapshot.items()
                      if n != self._baseline.get(key, 0)}
            lag = (now - self._window_start) / 2
            self._window_start = now
            if not deltas:
                return 0
            prune = time.monotonic() >= self._next_prune
            try:
                store_for(db.options.schema).stats_flush(db, counts=deltas, lag_s=lag, prune=prune,
                                                         keep_s=KEEP_SECONDS)
            except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege,
                    psycopg.errors.InvalidSchemaName) as exc:
                # Not migrated to 0009 (auto_migrate off), the schema dropped, or a role without
                # the grant: these counts are dropped rather than retried every minute.
                self._baseline = snapshot
                self._log_refusal(f"{type(exc).__name__}: {str(exc).splitlines()[0]} (run `kombu-pg "
                                  "migrate`, and `kombu-pg grants ROLE` for a least-privilege role)",
                                  logging.WARNING if isinstance(exc, psycopg.errors.InsufficientPrivilege)
                                  else logging.INFO)
                return 0
            except Exception as exc:  # the server is away: kept for the next flush
                self._log_refusal(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                return 0
            self._baseline = snapshot
            self._refused = None
            if prune:
                self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
            return len(deltas)

    def _log_refusal(self, error: str, level: int = logging.WARNING) -> None:
        if error != self._refused:
            logger.log(level, "kombu_pg: cannot write the per-minute counts: %s", error)
        self._refused = error


_flusher: Flusher | None = None
_lock = threading.Lock()


def watch(db: Database) -> None:
    """Flush this process's counts into ``db`` from now on: called once the process reached a
    database (kombu_pg.connections.Connections.ensure_ready)."""
    global _flusher
    with _lock:
        if _flusher is None or _flusher.pid != os.getpid():  # new after a fork: threads are gone
            _flusher = Flusher()
        _flusher.watch(db)


def flush() -> int:
    """Flush now (at exit, and for tests); the number of rows written."""
    flusher = _flusher
    if flusher is None or flusher.pid != os.getpid():
        return 0
    return flusher.flush()


def _flush_at_exit() -> None:
    """At exit, only into a database the process still uses (its pool open): writing into one
    it closed (a test's server, stopped since) would make the exit wait connect_timeout."""
    flusher = _flusher
    db = flusher._db() if flusher is not None and flusher._db is not None else None
    if db is not None and getattr(db, "_pool", None) is not None:
        flush()


atexit.register(_flush_at_exit)
