"""The leadership of one PostgreSQL beat scheduler (celery_ext.beat): the lease in
``beat_leader`` and the database session it is bound to.

A leader that cannot renew its lease, or whose connection died, stops sending: the scheduler
checks :attr:`Leadership.deadline` before each tick, and the tick's transaction itself only
succeeds for the holder of an unexpired lease on the very session it was granted to.
"""
from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from kombu_pg.beat_store import BeatStore, LeaderRow
from kombu_pg.config import scrub
from kombu_pg.database import Database
from kombu_pg.store import store_for

from .beat_entries import iso

# Not __name__: beat logs as "kombu_pg.beat", under the "kombu_pg" logger the README documents
# (users filter on it), one name for all of beat's modules.
logger = logging.getLogger("kombu_pg.beat")


class Leadership:
    """Seeks, holds, renews and resigns the leader lease over one connection."""

    def __init__(self, identity: str, lease: float):
        self.identity = identity
        self.lease = lease
        self.db: Database | None = None  # the transport's
        self.conninfo = ""  # where the leader's session connects
        self.conn: psycopg.Connection | None = None
        self.leads = False
        #: Monotonic time at which this scheduler stops sending unless it renewed the lease.
        self.deadline = 0.0
        self._seen_leader: str | None = None

    def connect(self) -> None:
        assert self.db is not None
        given = conninfo_to_dict(self.conninfo)
        extra: dict[str, Any] = {"keepalives": 1, "keepalives_idle": max(1, int(self.lease / 2)),
                                 "keepalives_interval": 1, "keepalives_count": 3}
        conn = self.db.connect(self.conninfo, role="beat", **{k: v for k, v in extra.items() if k not in given})
        # Nothing may outlast the lease: a statement, a lock wait, a transaction left open by a
        # leader that hangs (which would hold an entry's row lock against its successor).
        store_for(self.db.options.schema).beat_session_setup(conn, limit=f"{int(self.lease * 1000)}ms")
        self.conn = conn

    def elect(self, store: BeatStore, schema: str, started: float) -> tuple[LeaderRow, bool]:
        """Renew the lease, or take it if it is free. ``started``: monotonic time before this
        pass's first statement. Returns the leader row read, and whether this scheduler has
        just become the leader."""
        assert self.conn is not None
        row = store.leader(self.conn)
        until = store.lead(self.conn, self.identity, self.lease) if row.free_for(self.identity) else None
        was_leader, self.leads = self.leads, until is not None
        if self.leads:
            # Measured from before the statement: the server's lease ends later than this.
            self.deadline = started + self.lease - min(1.0, self.lease / 10)
            if not was_leader:
                previous = f" (took over from {row.holder})" if row.holder and row.holder != self.identity else ""
                logger.info("beat: %s is now the leader for schema %s%s", self.identity, schema, previous)
                self._seen_leader = self.identity
                return row, True
        elif was_leader:
            logger.warning("beat: %s lost the leadership to %s: not sending", self.identity, row.holder)
            self._seen_leader = row.holder
        elif row.holder != self._seen_leader:
            self._seen_leader = row.holder
            logger.info("beat: standby: %s leads schema %s (lease until %s)", row.holder or "nobody",
                        schema, iso(row.leader_until) if row.leader_until else "-")
        return row, False

    def drop(self, exc: BaseException, retry_in: float) -> None:
        """The connection failed: close it, and lead no more until elected again."""
        if self.leads:
            logger.warning("beat: %s lost its database session (%s): not sending until it leads again",
                           self.identity, self.scrub(exc))
        else:
            logger.warning("beat: database connection lost (%s): trying again in %gs", self.scrub(exc), retry_in)
        self.leads = False
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                pass

    def release(self, store: BeatStore) -> None:
        """Resign (a standby takes over at once) and close the connection."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.leads and not conn.closed and store.resign(conn, self.identity):
                logger.info("beat: %s resigned the leadership", self.identity)
        except Exception as exc:  # the session ends anyway: standbys notice
            logger.debug("beat: could not resign: %s", exc)
        finally:
            self.leads = False
            try:
                conn.close()
            except Exception:
                pass

    def scrub(self, exc: BaseException) -> str:
        """The error's text without the passwords of the connections."""
        text = scrub(str(exc), self.conninfo or None)
        return scrub(text, self.db.conninfo if self.db else None)
