"""The statement watchdog (kombu_pg.deadline): a connection whose statement outlives its
deadline has its socket shut down; a deadline disarmed in time never fires."""
from __future__ import annotations

import socket

import pytest

from kombu_pg.deadline import Watchdog


@pytest.fixture
def sockets():
    pairs = [socket.socketpair() for _ in range(2)]
    yield pairs
    for pair in pairs:
        for sock in pair:
            sock.close()


def wait_shut_down(sock: socket.socket) -> None:
    """Returns once ``sock``'s peer was shut down (recv gives EOF); bounded by the timeout."""
    sock.settimeout(10)
    assert sock.recv(1) == b""


def test_expired_deadline_shuts_the_socket_down_and_a_disarmed_one_never_fires(sockets):
    (fired, fired_peer), (spared, spared_peer) = sockets
    watchdog = Watchdog()
    watchdog.disarm(watchdog.arm(spared.fileno(), 0))  # disarmed before any tick
    watchdog.arm(fired.fileno(), 0)
    wait_shut_down(fired_peer)
    # Deadlines are checked all at once, under the lock: the disarmed one is gone for good.
    spared.sendall(b"x")
    assert spared_peer.recv(1) == b"x"


def test_guard_arms_for_its_block_only(sockets):
    (fired, fired_peer), (guarded, guarded_peer) = sockets

    class Conn:  # what guard() needs of a psycopg connection
        def __init__(self, sock):
            self.sock = sock

        def fileno(self):
            return self.sock.fileno()

    watchdog = Watchdog()
    conn = Conn(guarded)
    with watchdog.guard(conn, 0) as inside:
        assert inside is conn
    with watchdog.guard(Conn(fired), 0):
        wait_shut_down(fired_peer)
    guarded.sendall(b"y")
    assert guarded_peer.recv(1) == b"y"
