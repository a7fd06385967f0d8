"""PgBouncer instances of a test's own, in front of a :class:`~kombu_pg.testing.server.PrivateServer`.

Each instance runs Debian's ``pgbouncer`` (installed with apt-get when it is missing and we are
root) in the foreground, with its configuration and log in a temporary directory of its own,
listening on a free loopback port only (no Unix socket), in transaction pooling with trust
authentication for the server's ``postgres`` user. PgBouncer refuses to run as root: as root it
runs as the same user as the server. :meth:`PrivatePooler.close` stops it by its PID and
removes its directory.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .server import PrivateServer, free_port, service_user

INSTALL_TIMEOUT = 600


class PoolerUnavailable(RuntimeError):
    """pgbouncer is not installed and cannot be installed here (the message says why)."""


def pgbouncer_binary() -> str:
    """The pgbouncer program, installed with ``apt-get install pgbouncer`` if need be."""
    found = _find()
    if found:
        return found
    if os.geteuid() != 0:
        raise PoolerUnavailable("pgbouncer is not installed, and installing it needs root "
                                "(apt-get install pgbouncer)")
    if not shutil.which("apt-get"):
        raise PoolerUnavailable("pgbouncer is not installed and there is no apt-get to install it")
    if _apt("install", "-y", "--no-install-recommends", "pgbouncer").returncode != 0:
        _apt("update")  # a fresh machine may have no package lists yet
        result = _apt("install", "-y", "--no-install-recommends", "pgbouncer")
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PoolerUnavailable(f"apt-get install pgbouncer failed: {reason}")
    found = _find()
    if not found:
        raise PoolerUnavailable("apt-get installed pgbouncer, but no pgbouncer program was found")
    return found


def _find() -> str | None:
    return shutil.which("pgbouncer") or next(
        (str(p) for p in (Path("/usr/sbin/pgbouncer"), Path("/usr/bin/pgbouncer")) if p.exists()), None)


def _apt(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="kombu-pg-apt-") as tmp:
        # invoke-rc.d asks this script whether to start the package's service: never.
        policy = Path(tmp) / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "POLICYRCD": str(policy)}
        # Other test processes may be installing too: wait for the dpkg lock, boundedly.
        return subprocess.run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", *args], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT)


class PrivatePooler:
    """PgBouncer in front of ``server``: ``pool_size`` server connections at most."""

    def __init__(self, server: PrivateServer, pool_mode: str = "transaction", pool_size: int = 5):
        self.server = server
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        binary = pgbouncer_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="kombu-pg-pooler-"))
        self.port = free_port()
        self.config, self.logfile = self.dir / "pgbouncer.ini", self.dir / "pgbouncer.log"
        userlist = self.dir / "userlist.txt"
        userlist.write_text('"postgres" ""\n')  # trust: the user must still be listed
        self.config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {userlist}\nadmin_users = postgres\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n"
            "min_pool_size = 0\nreserve_pool_size = 0\nmax_client_conn = 1000\n")
        user = service_user()
        as_user: dict[str, Any] = {}
        if user:
            entry = pwd.getpwnam(user)
            for path in (self.dir, self.config, userlist):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with open(self.logfile, "ab") as log:
            # In the foreground, so that the PID is pgbouncer's own.
            self._process = subprocess.Popen([binary, str(self.config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, **as_user)
        self.pid = self._process.pid
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({self._process.returncode}):\n{self.log()}")
            try:
                with psycopg.connect(self.url, autocommit=True, prepare_threshold=None,
                                     connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"pgbouncer did not accept connections within {timeout:g}s:\n"
                                       f"{self.log()}") from None
                time.sleep(0.1)

    def show(self, what: str) -> list[dict]:
        """``SHOW <what>`` on PgBouncer's admin console (pools, clients, servers ...)."""
        if not what.isalpha():
            raise ValueError(f"not a SHOW command: {what!r}")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer",
                             autocommit=True, prepare_threshold=None, connect_timeout=5) as conn:
            return conn.cursor(row_factory=dict_row).execute(f"SHOW {what}").fetchall()

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError as exc:
            return f"<{exc}>"

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
