"""The lease keeper: renews the leases of every message this process holds.

A message is held from delivery until its ack reached the database or it was released, whether
it is running, prefetched or waiting. A dedicated thread with its own connection renews all
leases about every third of the visibility timeout, in one statement, so that renewal goes on
while the consumer's thread is busy (in the solo pool, the task runs inside the event loop). A
renewal that fails (the server restarts, the connection was killed) is tried again every
second on a fresh connection, not a third of the timeout later. A connection found broken when
a round starts (the server closed it while idle: idle_session_timeout) or on a server that no
longer takes writes (a failover) is replaced at once, within the round.
"""
from __future__ import annotations

import logging
import threading

import psycopg

from .deadline import watchdog
from .errors import CONNECTION_ERRORS
from .failover import writable

logger = logging.getLogger(__name__)

#: Seconds between attempts while renewals fail.
RETRY_SECONDS = 1.0


class LeaseKeeper:
    def __init__(self, db):
        self.db = db
        self.lease_seconds = db.options.visibility_timeout
        self._held: dict[int, str] = {}  # message id -> lease token
        self._settling: set[int] = set()  # acks being written: a renewal may find them deleted
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None

    def hold(self, message_id: int, token: str | None) -> None:
        if token is None:  # taken by a no-ack consumer: the row is gone, there is no lease
            return
        with self._lock:
            self._held[message_id] = token
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kombu_pg-lease-keeper", daemon=True)
                self._thread.start()

    def settling(self, message_ids) -> None:
        """Their acks are being written: a renewal that finds them deleted is no lost lease."""
        with self._lock:
            self._settling.update(message_ids)

    def settled_not(self, message_ids) -> None:
        """Settling them failed (the server did not answer): still held, renewals count again."""
        with self._lock:
            self._settling.difference_update(message_ids)

    def forget(self, message_ids) -> None:
        with self._lock:
            for message_id in message_ids:
                self._held.pop(message_id, None)
                self._settling.discard(message_id)

    def held_ids(self) -> list[int]:
        """The messages this process holds: its claims and reaps leave them alone."""
        with self._lock:
            return list(self._held)

    def held_literal(self) -> str:
        """:meth:`held_ids` as a PostgreSQL array literal, for the libpq statement path."""
        with self._lock:
            return "{" + ",".join(map(str, self._held)) + "}"

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()

    def _run(self) -> None:
        interval = self.lease_seconds / 3
        wait = interval
        while not self._wakeup.wait(wait) and not self._stopped:
            try:
                self.renew()
                wait = interval
            except Exception as exc:  # keep renewing: the next round may succeed
                logger.warning("kombu_pg: lease renewal failed (%s): trying again in %gs",
                               " ".join(str(exc).split()), RETRY_SECONDS)
                self._close()
                wait = RETRY_SECONDS

    def renew(self) -> int:
        with self._lock:
            held = dict(self._held)
        if not held:
            self._close()  # nothing to renew: give the server its connection back
            return 0
        ids, tokens = list(held), list(held.values())
        reused = self._conn is not None and not self._conn.closed
        try:
            renewed = self._renew(ids, tokens)
        except CONNECTION_ERRORS:
            if not reused:
                raise
            self._close()
            renewed = self._renew(ids, tokens)
        lost = [i for i in ids if i not in renewed]
        if lost:
            with self._lock:
                # Acked meanwhile (forgotten, or its delete just landed: settling), or the
                # lease expired and another consumer has it now.
                gone = [i for i in lost if self._held.get(i) == held[i] and i not in self._settling]
                for i in gone:
                    del self._held[i]
            if gone:
                logger.warning("kombu_pg: lost the lease of %d message(s) (ids %s): "
                               "they may be delivered again", len(gone), gone[:10])
        logger.debug("kombu_pg: renewed %d lease(s)", len(renewed))
        return len(renewed)

    def _renew(self, ids: list[int], tokens: list[str]) -> set[int]:
        if self._conn is None or self._conn.closed:
            self._conn = self.db.connect(role="lease")
        with writable(self._conn), watchdog.guard(self._conn, self.db.options.statement_deadline):
            return self.db.store.renew(
                self._conn, ids=ids, tokens=tokens, lease_seconds=self.lease_seconds,
                synchronous_commit=self.db.lease_commit)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
