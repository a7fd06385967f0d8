"""The vacuum service: keeps the messages table small under steady traffic.

Every message leaves dead row versions behind (its claim, its ack), and only a vacuum makes
their space reusable. Autovacuum visits a table at most once per ``autovacuum_naptime`` (a
minute by default, a server-wide setting): at a few hundred tasks a second the table then
holds a minute of dead rows, tens of megabytes, and claims and index scans wade through them.
So the housekeeping process vacuums the table itself, every ``vacuum_interval`` seconds once
enough dead rows piled up, in a thread of its own (the consumer goes on meanwhile). It needs to
own the table; a role that does not is told once, and autovacuum alone does the job.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from .connections import Connections
    from .store.records import VacuumStats

logger = logging.getLogger(__name__)

#: Vacuum once this many dead rows piled up, or a fifth of the live ones if that is more.
MIN_DEAD_ROWS = 2000


class Vacuumer:
    def __init__(self, db: Connections):
        self.db = db
        self._next = 0.0
        self._allowed: bool | None = None  # unknown until first asked
        self._running = threading.Lock()

    def due(self) -> bool:
        """Whether to look at the table's dead rows now (the housekeeping round asks, and
        then reads them in its own transaction: no transaction of its own for an idle cluster)."""
        interval = self.db.options.vacuum_interval
        if not interval or self._allowed is False or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + interval
        return True

    def maybe_vacuum(self, stats: VacuumStats | None) -> bool:
        """Start a vacuum of the messages table if ``stats`` (the ``vacuum_due`` statement's
        row, None without a messages table) say it is worth it; whether it did."""
        if stats is None:
            return False
        allowed, dead, live = stats
        self._allowed = allowed
        if not allowed:
            logger.info("kombu_pg: this role does not own %s.messages, so it may not vacuum it: "
                        "autovacuum alone keeps it small", self.db.options.schema)
            return False
        if dead is None or dead < max(MIN_DEAD_ROWS, (live or 0) // 5):
            return False
        if not self._running.acquire(blocking=False):
            return False  # the previous one is still at it
        threading.Thread(target=self._vacuum, args=(dead,), name="kombu_pg-vacuum", daemon=True).start()
        return True

    def _vacuum(self, dead: int) -> None:
        started = time.monotonic()
        try:
            # A dedicated connection: VACUUM runs outside any transaction, and without the
            # statement_timeout of pooled connections (a bloated table may rightly take longer).
            with self.db.connect(role="vacuum", bounded=False) as conn:
                self.db.store.vacuum_messages(conn)
            logger.debug("kombu_pg: vacuumed %s.messages (%d dead rows) in %.0f ms",
                         self.db.options.schema, dead, (time.monotonic() - started) * 1000)
        except psycopg.Error as exc:  # the next round tries again; autovacuum still runs
            logger.warning("kombu_pg: vacuum of %s.messages failed: %s", self.db.options.schema,
                           " ".join(str(exc).split()))
        finally:
            self._running.release()
