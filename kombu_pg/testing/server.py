"""PostgreSQL servers of a test's own, for fault tests: restart, freeze, kill connections,
fail over to a streaming standby, serve TLS.

Each server is a fresh ``initdb`` in a temporary directory with stock settings (autovacuum on,
fsync on), listening on a free loopback port and on a socket directory of its own, run with the
PostgreSQL binaries that the ``pgserver`` package ships (a dev dependency), so a machine needs no
PostgreSQL installed. As root, PostgreSQL refuses to run: the server runs as the ``postgres``
user if there is one, else as ``pgserver`` (created by pgserver's helper, as the embedded
server does). Every server is stopped and its directory removed by :meth:`PrivateServer.close`;
processes are only ever signalled by the PIDs this server wrote.

A server with ``tls=True`` serves TLS with a certificate for 127.0.0.1 and localhost signed by
a certificate authority made for it (``openssl``); clients verify it with ``ca_file``. pgserver's
build has no OpenSSL, so such a server runs the PostgreSQL installed on the machine
(``pg_config`` on the PATH, or Debian's /usr/lib/postgresql); without one, TlsUnavailable.
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
from typing import Any
from pathlib import Path

import psycopg
from psycopg import sql


class TlsUnavailable(RuntimeError):
    """No PostgreSQL build with OpenSSL on this machine."""


def _bin_dir(tls: bool = False) -> Path:
    with warnings.catch_warnings():  # pgserver warns when XDG_RUNTIME_DIR is unset (CI)
        warnings.simplefilter("ignore")
        from pgserver import _commands

    bundled = Path(_commands.POSTGRES_BIN_PATH)
    if not tls:
        return bundled
    on_path = shutil.which("pg_config")
    candidates = [bundled, *([Path(on_path).parent] if on_path else []),
                  *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
    for bin_dir in candidates:
        if _has_openssl(bin_dir):
            return bin_dir
    raise TlsUnavailable("no PostgreSQL build with OpenSSL found (pgserver's has none): "
                         "install PostgreSQL (e.g. apt install postgresql)")


def _has_openssl(bin_dir: Path) -> bool:
    try:
        configure = subprocess.run([str(bin_dir / "pg_config"), "--configure"], capture_output=True,
                                   text=True, timeout=10).stdout
    except OSError:
        return False
    return (bin_dir / "postgres").exists() and ("--with-openssl" in configure
                                                or "--with-ssl=openssl" in configure)


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


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=60, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def certificate_authority(directory: Path, name: str = "ca") -> Path:
    """A new self-signed CA in ``directory`` (``<name>.crt``, ``<name>.key``); its certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
             "-subj", f"/CN=kombu-pg test {name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=directory)
    return directory / f"{name}.crt"


def server_certificate(directory: Path, ca: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost signed by ``ca`` (from certificate_authority):
    (certificate, key), in ``directory``."""
    (directory / "server.ext").write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    _openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
             "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt", cwd=directory)
    return directory / "server.crt", directory / "server.key"


class PrivateServer:
    def __init__(self, *, tls: bool = False, **settings):
        self._prepare(tls)
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if tls:
            settings = {**self._certificates(), **settings}
        self._configure(settings)
        self.start()

    def _prepare(self, tls: bool) -> None:
        """A directory, a port and the user to run as; no data directory yet."""
        self.dir = Path(tempfile.mkdtemp(prefix="kombu-pg-server-"))
        self.data, self.sockets, self.logfile = self.dir / "data", self.dir / "sockets", self.dir / "server.log"
        self.sockets.mkdir()
        self.port = free_port()
        self.bin_dir = _bin_dir(tls)
        self.ca_file: Path | None = None
        self._as_user = _run_as()
        self._frozen: list[int] = []
        self._chown(self.dir, self.sockets)

    def _chown(self, *paths: Path) -> None:
        """Hand ``paths`` to the user the server runs as (when started as root)."""
        if self._as_user:
            entry = pwd.getpwnam(self._as_user[2])
            for path in paths:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _configure(self, settings: dict) -> None:
        """Append the settings (later lines win over the ones a standby copied)."""
        self.settings = {"listen_addresses": "127.0.0.1", "port": self.port,
                         "unix_socket_directories": str(self.sockets), "max_connections": 200, **settings}
        with open(self.data / "postgresql.conf", "a") as conf:
            for key, value in self.settings.items():
                conf.write(f"{key} = {value if isinstance(value, int) else repr(str(value))}\n")

    def _certificates(self) -> dict:
        """A CA (``ca_file``) and a server certificate signed by it; the settings serving them."""
        directory = self.dir / "tls"
        self.ca_file = certificate_authority(directory)
        cert, key = server_certificate(directory, self.ca_file)
        key.chmod(0o600)  # PostgreSQL refuses a key others can read
        self._chown(directory, cert, key)
        return {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}

    def add_standby(self, name: str = "standby1", synchronous: bool = True) -> "PrivateServer":
        """A hot standby streaming from this server (``pg_basebackup -R``), started. With
        ``synchronous``, a commit here returns only once the standby has flushed it
        (``synchronous_standby_names`` names it, ``synchronous_commit = on``)."""
        standby = PrivateServer.__new__(PrivateServer)
        standby._prepare(tls=False)
        standby.bin_dir = self.bin_dir
        # application_name goes into the standby's primary_conninfo: the name the primary knows it by.
        self._pg("pg_basebackup", "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
                 "-d", f"host=127.0.0.1 port={self.port} user=postgres application_name={name}")
        standby._configure({})
        standby.start()
        if synchronous:
            with self.connect() as conn:
                conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(name)))
                conn.execute("ALTER SYSTEM SET synchronous_commit = on")
                conn.execute("SELECT pg_reload_conf()")
                deadline = time.monotonic() + 60
                while _scalar(conn, "SELECT count(*) FROM pg_stat_replication WHERE application_name = %s"
                                    " AND sync_state = 'sync'", (name,)) == 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"standby {name} did not become synchronous within 60 s")
                    time.sleep(0.1)
        return standby

    def promote(self) -> None:
        """Make this standby a primary (``pg_ctl promote``), waiting until it accepts writes."""
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, program: str, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self._as_user, str(self.bin_dir / program), *args], check=True, timeout=timeout,
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

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server's processes (postmaster, backends, background
        workers; exited backends are not counted, and idle clients' sessions do not exit)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self._server_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

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

    def connect(self) -> psycopg.Connection:
        """An autocommit superuser session, for the harness's own statements."""
        return psycopg.connect(self.url, autocommit=True, application_name="kp_fault_harness")

    def terminate_clients(self) -> int:
        """pg_terminate_backend() every client session but this call's own; how many."""
        with self.connect() as conn:
            return _scalar(
                conn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
                " AND application_name <> 'kp_fault_harness'")

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


def _scalar(conn: psycopg.Connection, query: str, params: tuple | None = None) -> Any:
    """The one value of an aggregate query."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {query!r}")
    return row[0]
