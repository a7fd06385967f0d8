"""PostgreSQL servers of a test's own, for fault tests: restart, freeze, kill connections.

Each server is a fresh ``initdb`` in a temporary directory with stock settings (autovacuum on,
fsync on), listening on a free loopback port and on a socket directory of its own, run with the
PostgreSQL binaries that the ``pgserver`` package ships (a dev dependency), so a machine needs no
PostgreSQL installed. As root, PostgreSQL refuses to run: the server runs as the ``postgres``
user if there is one, else as ``pgserver`` (created by pgserver's helper, as the embedded
server does). Every server is stopped and its directory removed by :meth:`PrivateServer.close`;
processes are only ever signalled by the PIDs this server wrote.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import psycopg


def _bin_dir() -> Path:
    with warnings.catch_warnings():  # pgserver warns when XDG_RUNTIME_DIR is unset (CI)
        warnings.simplefilter("ignore")
        from pgserver import _commands

    return Path(_commands.POSTGRES_BIN_PATH)


def service_user() -> str | None:
    """The user that database services run as when we are root (they refuse to run as root):
    ``postgres`` if there is one, else ``pgserver``; None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        from pgserver.utils import ensure_user_exists

        ensure_user_exists("pgserver")
        return "pgserver"


def _run_as() -> list[str]:
    user = service_user()
    return ["runuser", "-u", user, "--"] if user else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateServer:
    def __init__(self, **settings):
        self.dir = Path(tempfile.mkdtemp(prefix="kombu-pg-server-"))
        self.data, self.sockets, self.logfile = self.dir / "data", self.dir / "sockets", self.dir / "server.log"
        self.sockets.mkdir()
        self.port = free_port()
        self.settings = {"listen_addresses": "127.0.0.1", "port": self.port,
                         "unix_socket_directories": str(self.sockets), "max_connections": 200, **settings}
        self._as_user = _run_as()
        if self._as_user:
            user = self._as_user[2]
            entry = pwd.getpwnam(user)
            for path in (self.dir, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._frozen: list[int] = []
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            for key, value in self.settings.items():
                conf.write(f"{key} = {value if isinstance(value, int) else repr(str(value))}\n")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, program: str, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self._as_user, str(_bin_dir() / program), *args], check=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self.thaw()
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _server_pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, WAL writer, ...)."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                        children.append(int(entry.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP every server process: the server stops answering, its sockets stay open."""
        self._frozen = self._server_pids()
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    def terminate_clients(self) -> int:
        """pg_terminate_backend() every client session but this call's own; how many."""
        with psycopg.connect(self.url, autocommit=True, application_name="kp_fault_harness") as conn:
            return conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
                " AND application_name <> 'kp_fault_harness'").fetchone()[0]

    def close(self) -> None:
        self.thaw()
        with contextlib.suppress(Exception):
            self.stop("immediate")
        pid = self.postmaster_pid()
        if pid is not None:  # pg_ctl failed: end it by the PID it wrote
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        shutil.rmtree(self.dir, ignore_errors=True)
