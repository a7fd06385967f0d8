"""The LISTEN connection: wake-ups for consumers.

NOTIFY is only a hint (lost while nobody listens, coalesced per transaction), so consumers also
poll on a timer; after a reconnect they treat every queue as possibly ready.
"""
from __future__ import annotations

import logging
import select

import psycopg

from .failover import writable

logger = logging.getLogger(__name__)


#: Payload of the NOTIFY a new binding sends (see Database.unroutable): no queue's wake-up,
#: which starts with a number.
BOUND = "bind"


class Listener:
    def __init__(self, db, conninfo: str | None = None):
        self.db = db
        self.conninfo = conninfo or db.conninfo
        self.channel = db.options.notify_channel
        self.conn: psycopg.Connection | None = None
        self._fd = -1
        self._generation = db.pool_generation
        self._up = False  # counted in db.listening()

    def connect(self) -> int:
        """(Re)connect and LISTEN; returns the socket to watch. A standby refuses LISTEN:
        ReadOnlyServer, a lost connection."""
        self.close()
        self._generation = self.db.pool_generation
        self.conn = self.db.connect(self.conninfo, role="listen")
        try:
            with writable(self.conn):
                self.db.store.listen(self.conn, channel=self.channel)
        except psycopg.Error:
            self.close()
            raise
        self._up = True
        self.db.listening(True)
        self._fd = self.conn.fileno()
        return self._fd

    def outdated(self) -> bool:
        """Connected before the pool was last replaced (after an outage or a failover)."""
        return self.conn is not None and self._generation != self.db.pool_generation

    def fileno(self) -> int:
        """The socket as of connect(), also once the connection is lost (psycopg then raises),
        so that an event loop watching it can stop."""
        return self._fd

    def read(self) -> dict[str, float]:
        """Queues notified since the last read, with the seconds until their message is visible
        (0 for now). Never blocks.

        Reads through libpq directly: psycopg's notifies() would take the connection lock and
        block. Raises psycopg.OperationalError when the connection is gone.
        """
        assert self.conn is not None, "read() before connect()"
        pgconn = self.conn.pgconn
        pgconn.consume_input()
        woken: dict[str, float] = {}
        while (note := pgconn.notifies()) is not None:
            payload = note.extra.decode()
            if payload == BOUND:
                self.db.bound()
                continue
            delay_ms, _, queue = payload.partition(" ")
            delay = int(delay_ms) / 1000 if delay_ms.isdigit() else 0.0
            woken[queue] = min(delay, woken.get(queue, delay))
        return woken

    def wait(self, timeout: float) -> dict[str, float]:
        """Block up to ``timeout`` seconds for notifications."""
        assert self.conn is not None, "wait() before connect()"
        readable, _, _ = select.select([self.conn.fileno()], [], [], max(timeout, 0))
        return self.read() if readable else {}

    def close(self) -> None:
        if self._up:
            self._up = False
            self.db.listening(False)
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
