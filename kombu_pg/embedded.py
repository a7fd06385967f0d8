"""A throw-away PostgreSQL server for the demo and the tests, via the ``pgserver`` package.

``pgserver`` ships PostgreSQL binaries in a wheel, so a machine without a server can still
run the demo and the test suite::

    from kombu_pg import embedded

    with embedded.start() as server:
        print(server.url)   # postgresql://postgres:@/postgres?host=/tmp/kombu-pg-.../pgdata

The server listens on a unix socket only (no TCP port), and :meth:`EmbeddedServer.stop`
(also called on ``with`` exit and at interpreter exit) stops it. Without ``data_dir`` the
data lives in a fresh temporary directory that is deleted on stop.

When run as root, PostgreSQL refuses to start, so ``pgserver`` runs it as a system user
named ``pgserver`` (created with ``useradd`` if missing) and makes the data directory and
its parent directories readable and traversable by that user.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["EmbeddedServer", "start"]

INSTALL_HINT = "pip install 'kombu-pg[embedded]'"


class EmbeddedServer:
    """A running embedded server. Use :func:`start` to get one."""

    def __init__(self, handle, url: str, pid: int, data_dir: Path, temp_dir: Path | None):
        self._handle = handle  # pgserver.PostgresServer
        self.url = url
        self.pid = pid  # of the postmaster
        self.data_dir = data_dir
        self._temp_dir = temp_dir  # ours to delete, if we made it
        # A forked child (e.g. a multiprocessing worker) inherits this object and the
        # atexit hook; only the process that started the server may stop it.
        self._owner_pid = os.getpid()
        self._stopped = False
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its data if it lives in a temp dir."""
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        # pgserver runs `pg_ctl stop -w` (fast shutdown: open connections are closed) on
        # this data directory only, and falls back to terminating the postmaster by the
        # PID it recorded. With cleanup_mode="delete" it also removes the data directory.
        self._handle.cleanup()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"pid={self.pid}"
        return f"<EmbeddedServer {self.url} {state}>"


def _import_pgserver():
    try:
        # pgserver's import asks platformdirs for a runtime dir, which warns when
        # XDG_RUNTIME_DIR is unset (containers, CI); the fallback it picks is fine.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:
        raise ImportError(
            f"The embedded PostgreSQL server needs the 'pgserver' package: {INSTALL_HINT}"
        ) from exc
    return pgserver


def _stop_postmaster(pgdata: Path, timeout: float = 10.0) -> None:
    """Stop the postmaster of ``pgdata`` (one we just started) by the PID it wrote."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGINT)  # SIGINT = PostgreSQL's "fast" shutdown
    except (OSError, ValueError):
        return  # never started, or already gone
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))  # no SIGKILL on Windows


def start(data_dir: Path | str | None = None) -> EmbeddedServer:
    """Start an embedded PostgreSQL server and return it once it accepts connections.

    ``data_dir``: where to keep the data. ``None`` (the default) uses a new temporary
    directory that :meth:`EmbeddedServer.stop` deletes; a given directory is created if
    needed and kept, so a later ``start(data_dir)`` finds the same databases. A server
    already running on ``data_dir`` (started by another process) is shared, and stops
    when the last process using it does.
    """
    pgserver = _import_pgserver()
    temp_dir = None
    if data_dir is None:
        # A fresh directory per server: pgserver keys servers by data directory, so two
        # starts (e.g. two test processes) never share or stop each other's server.
        temp_dir = Path(tempfile.mkdtemp(prefix="kombu-pg-"))
        pgdata, cleanup_mode = temp_dir / "pgdata", "delete"
    else:
        pgdata, cleanup_mode = Path(data_dir).expanduser().resolve(), "stop"
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
    except BaseException:
        # E.g. Ctrl-C or a timeout while pg_ctl waits: the postmaster runs in its own
        # session, so it may be up without pgserver knowing it has to stop it.
        if temp_dir is not None:
            _stop_postmaster(pgdata)
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return EmbeddedServer(handle, handle.get_uri(), handle.get_pid(), pgdata, temp_dir)
