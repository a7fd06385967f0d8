"""Acks in batches, off the consumer's thread.

An ack only needs to reach the database eventually (until then the lease keeps the message
invisible, and a crash just means a redelivery), so ``ack()`` queues it and returns. A thread
deletes whatever has queued up in one statement, then looks again. Before each statement it
lingers a few milliseconds for more acks to join: every DELETE is a durable commit, and at a
few hundred tasks a second one commit per ack would take a disk flush per task from the
publishers sharing the server. Closing the connection (``flush``) does not linger.

An ack that cannot reach the database (the server restarts, the connection was killed) is
kept and tried again, and the message's lease stays held, so renewed, until the delete landed:
dropping it would let the lease expire and the message run a second time.
"""
from __future__ import annotations

import logging
import threading

from . import counters

logger = logging.getLogger(__name__)

LINGER_SECONDS = 0.005
#: Pause between attempts while acks fail, doubled up to the maximum.
RETRY_SECONDS, MAX_RETRY_SECONDS = 0.1, 2.0


class Acker:
    def __init__(self, db):
        self.db = db
        self._pending: list[tuple[int, str, str]] = []  # (id, token, queue)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._hurry = threading.Event()  # flush() waiting: no lingering
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def ack(self, message_id: int, token: str, queue: str) -> None:
        with self._lock:
            self._pending.append((message_id, token, queue))
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kombu_pg-acker", daemon=True)
                self._thread.start()
        if not self._wakeup.is_set():  # set() takes a lock; the thread is awake already
            self._wakeup.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued ack reached the database (or failed); False on timeout."""
        if self._thread is None:
            return True
        self._hurry.set()
        self._wakeup.set()
        try:
            return self._idle.wait(timeout)
        finally:
            self._hurry.clear()

    def stop(self) -> None:
        self.flush()
        self._stopped = True
        self._wakeup.set()

    def _run(self) -> None:
        pause = RETRY_SECONDS
        while not self._stopped:
            self._wakeup.wait()
            self._wakeup.clear()
            while True:
                self._hurry.wait(LINGER_SECONDS)  # acks arriving meanwhile join this batch
                with self._lock:
                    batch, self._pending = self._pending, []
                    if not batch:
                        self._idle.set()
                        break
                if self._delete(batch):
                    pause = RETRY_SECONDS
                    continue
                with self._lock:
                    self._pending[:0] = batch  # first in line for the next attempt
                    self._idle.set()  # flush() waits for this attempt, not for the outage
                if self._stopped:
                    return
                self._hurry.wait(pause)  # not _wakeup: each new ack would cut the pause short
                pause = min(pause * 2, MAX_RETRY_SECONDS)

    def _delete(self, batch) -> bool:
        ids = [m for m, _, _ in batch]
        self.db.leases.settling(ids)
        try:
            # On a pooled connection, retried on a fresh one if it broke (Database.run).
            deleted = self.db.store.ack(self.db, ids=ids, tokens=[t for _, t, _ in batch])
        except Exception as exc:
            logger.warning("kombu_pg: %d ack(s) could not be written (%s): trying again; their "
                           "leases stay renewed meanwhile", len(batch), " ".join(str(exc).split()))
            return False
        self.db.leases.forget(ids)
        # Only rows really deleted: after a server-side retry or a dead letter, Celery's ack of
        # the same delivery finds no lease and changes nothing.
        for queue in deleted:
            counters.add("acked", queue)
        return True
