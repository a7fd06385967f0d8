"""The LISTEN connection: wake-ups for consumers, and broadcasts (kombu_pg/broadcasts.py).

NOTIFY is only a hint (lost while nobody listens, coalesced per transaction), so consumers also
poll on a timer; after a reconnect they treat every queue as possibly ready. Broadcasts are
messages themselves, on channels of their own: at most once.
"""
from __future__ import annotations

import logging
import select
from typing import Callable, Iterable

import psycopg

from .failover import writable

logger = logging.getLogger(__name__)


#: Payload of the NOTIFY a new binding sends (see Database.unroutable): no queue's wake-up,
#: which starts with a number.
BOUND = "bind"


class Listener:
    def __init__(self, db, conninfo: str | None = None,
                 on_broadcast: Callable[[str, str], object] | None = None):
        """``on_broadcast(channel, payload)`` takes the notifications of every other channel
        this connection LISTENs on (:meth:`listen`)."""
        self.db = db
        self.conninfo = conninfo or db.conninfo
        self.channel = db.options.notify_channel
        self._on_broadcast = on_broadcast
        self.broadcast_channels: set[str] = set()  # LISTENed on again after a reconnect
        self._caught: list = []  # notifications psycopg read while running a statement here
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
        self.conn.add_notify_handler(self._caught.append)
        try:
            with writable(self.conn):
                for channel in [self.channel, *sorted(self.broadcast_channels)]:
                    self.db.store.listen(self.conn, channel=channel)
        except psycopg.Error:
            self.close()
            raise
        self._up = True
        self.db.listening(True)
        self._fd = self.conn.fileno()
        return self._fd

    def listen(self, channels: Iterable[str]) -> None:
        """LISTEN on more broadcast channels: now if connected, else at connect."""
        new = set(channels) - self.broadcast_channels
        self.broadcast_channels |= new
        if self.conn is not None:
            with writable(self.conn):  # a standby refuses LISTEN: ReadOnlyServer, as at connect
                for channel in sorted(new):
                    self.db.store.listen(self.conn, channel=channel)

    def outdated(self) -> bool:
        """Connected before the pool was last replaced (after an outage or a failover)."""
        return self.conn is not None and self._generation != self.db.pool_generation

    def fileno(self) -> int:
        """The socket as of connect(), also once the connection is lost (psycopg then raises),
        so that an event loop watching it can stop."""
        return self._fd

    def read(self) -> dict[str, float]:
        """Queues notified since the last read, with the seconds until their message is visible
        (0 for now); broadcasts go to ``on_broadcast``. Never blocks.

        Reads through libpq directly: psycopg's notifies() would take the connection lock and
        block. Raises psycopg.OperationalError when the connection is gone.
        """
        assert self.conn is not None, "read() before connect()"
        pgconn = self.conn.pgconn
        pgconn.consume_input()
        woken: dict[str, float] = {}
        caught, self._caught[:] = list(self._caught), []
        for note in caught:
            self._take(note.channel, note.payload, woken)
        while (raw := pgconn.notifies()) is not None:
            self._take(raw.relname.decode(), raw.extra.decode(), woken)
        return woken

    def _take(self, channel: str, payload: str, woken: dict[str, float]) -> None:
        if channel != self.channel:
            if self._on_broadcast is not None:
                self._on_broadcast(channel, payload)
            return
        if payload == BOUND:
            self.db.bound()
            return
        delay_ms, _, queue = payload.partition(" ")
        delay = int(delay_ms) / 1000 if delay_ms.isdigit() else 0.0
        woken[queue] = min(delay, woken.get(queue, delay))

    def wait(self, timeout: float) -> dict[str, float]:
        """Block up to ``timeout`` seconds for notifications."""
        assert self.conn is not None, "wait() before connect()"
        if self._caught:
            return self.read()
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
