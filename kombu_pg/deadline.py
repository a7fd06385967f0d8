"""Client-side deadlines: a server that stops answering becomes a lost connection.

The server enforces ``statement_timeout``, and the kernel TCP keepalives and
``tcp_user_timeout``; none of them fires when the server's processes are stopped (SIGSTOP, a
paused VM, storage that hangs) while its host still acknowledges our packets: libpq then waits
for an answer for as long as that lasts. One watchdog thread per process shuts down the socket
of a connection whose statement outlived its deadline; libpq reports the connection as lost,
and the caller's reconnect path takes over, as for any other dropped connection.

Arming and disarming cost a lock and a dict operation (about a microsecond), so every
statement can be guarded.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time

logger = logging.getLogger(__name__)

#: How often the watchdog looks at the armed deadlines; a deadline fires up to this much late.
TICK_SECONDS = 0.5


class Watchdog:
    def __init__(self):
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, int]] = {}  # ticket -> (monotonic deadline, socket fd)
        self._tickets = itertools.count()
        self._owner_pid: int | None = None  # a forked child starts its own thread

    def arm(self, fd: int, seconds: float) -> int:
        """Shut the socket ``fd`` down unless :meth:`disarm` is called within ``seconds``."""
        ticket = next(self._tickets)
        with self._lock:
            self._armed[ticket] = (time.monotonic() + seconds, fd)
            if self._owner_pid != os.getpid():
                self._owner_pid = os.getpid()
                threading.Thread(target=self._run, name="kombu_pg-watchdog", daemon=True).start()
        return ticket

    def disarm(self, ticket: int) -> bool:
        """False if the deadline had passed (the socket was shut down)."""
        with self._lock:
            return self._armed.pop(ticket, None) is not None

    def guard(self, conn, seconds: float) -> "_Guard":
        """``with watchdog.guard(conn, seconds):`` around statements on ``conn``."""
        return _Guard(self, conn, seconds)

    def _run(self) -> None:
        while True:
            time.sleep(TICK_SECONDS)
            now = time.monotonic()
            # Shut down under the lock: once disarm() returned, its socket may be closed and
            # its descriptor reused, so a deadline must never fire after that.
            with self._lock:
                for ticket, (deadline, fd) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[ticket]
                        _shutdown(fd)


class _Guard:
    __slots__ = ("_watchdog", "_conn", "_seconds", "_ticket", "expired")

    def __init__(self, watchdog: Watchdog, conn, seconds: float):
        self._watchdog, self._conn, self._seconds = watchdog, conn, seconds
        #: Whether the deadline passed: the server did not answer in time.
        self.expired = False

    def __enter__(self):
        self._ticket = self._watchdog.arm(self._conn.fileno(), self._seconds)
        return self._conn

    def __exit__(self, *exc_info):
        self.expired = not self._watchdog.disarm(self._ticket)
        return False


def _shutdown(fd: int) -> None:
    logger.warning("kombu_pg: the server did not answer within the statement deadline: "
                   "closing the connection")
    try:
        # fromfd() works on a duplicate; shutdown() acts on the socket both descriptors share.
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed meanwhile: nothing left to wait on


watchdog = Watchdog()
