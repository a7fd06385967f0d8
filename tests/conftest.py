"""Test harness: a real PostgreSQL server, per-test schemas, Celery apps and worker processes.

Rings (directories; each test is also marked with its ring, so ``-m unit`` works too; the
markers are declared in pyproject.toml):
``unit/`` pure logic, no database and no subprocess (the whole ring runs in seconds; a unit test
that asks for the database fails at collection); ``integration/`` real PostgreSQL, everything in
this process; ``acceptance/`` Celery workers, beat, the CLI and scripts as subprocesses, and
servers of a test's own (faults, failover, TLS, PgBouncer, the demo).

Database: ``KOMBU_PG_TEST_URL`` if set, else one embedded server (``kombu_pg.embedded``) per
test process (under pytest-xdist every xdist worker starts its own: nothing is shared, so
nothing can be stopped under another worker's feet).

Isolation: each test gets two fresh PostgreSQL schemas, ``t_<hex>`` for the broker (created by
the transport's auto-migration on first connect, exactly as for a user) and ``r_<hex>`` for the
Celery result backend and the tests' own bookkeeping table (``runs``). Both are dropped with
CASCADE at teardown, so tests are parallel-safe.

Processes: every subprocess (Celery worker, beat, consumer scripts) is started in its own
session, logs to a file in ``tmp_path`` and is stopped by PID at teardown (SIGTERM, then
SIGKILL to its process group after a bounded wait). Log tails are printed at teardown, which
pytest shows for failing tests.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

PY = sys.executable
HOST = "kptest"  # the host part of worker node names (w1@kptest)


RINGS = ("unit", "integration", "acceptance")
# Fixtures that need a server or start processes: never in the unit ring.
NOT_IN_UNIT = {"pg_url", "procs", "private_server", "private_pooler", "pytester", "testdir"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (runs by default)")


def ring_of(path: Path) -> str | None:
    """The ring of a test file: the directory under tests/ it lies in."""
    tests = Path(__file__).parent
    parts = path.relative_to(tests).parts if path.is_relative_to(tests) else ()
    return parts[0] if len(parts) > 1 and parts[0] in RINGS else None


def pytest_collection_modifyitems(config, items):
    misplaced = []
    for item in items:
        ring = ring_of(Path(item.path))
        if ring:
            item.add_marker(ring)
        needs = sorted(NOT_IN_UNIT.intersection(getattr(item, "fixturenames", ())))
        if ring == "unit" and needs:
            misplaced.append(f"{item.nodeid} uses {', '.join(needs)}")
    if misplaced:
        raise pytest.UsageError("unit tests must not need PostgreSQL or subprocesses; move them to "
                                "tests/integration or tests/acceptance:\n  " + "\n  ".join(misplaced))
    if hasattr(config, "workerinput"):
        # Under pytest-xdist: the slow tests first (a stable sort, the same in every xdist
        # worker), so that the short ones fill the gaps and no core idles at the end of the run.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    if ring_of(Path(request.node.path)) == "unit":
        def refuse(*args, **kwargs):
            raise AssertionError(f"a unit test started a subprocess ({args[:1]}): it belongs in tests/acceptance")

        monkeypatch.setattr(subprocess, "Popen", refuse)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, interval: float = 0.1, what="condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = what() if callable(what) else what  # a callable describes the state at timeout
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def with_query(url: str, **params) -> str:
    """``url`` with extra query parameters (keeps existing ones, e.g. the socket ``host``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + [(k, str(v)) for k, v in params.items()]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def sqlalchemy_url(url: str) -> str:
    """The Celery database result backend URL for a libpq URL (psycopg 3 driver)."""
    _, _, rest = url.partition("://")
    return f"db+postgresql+psycopg://{rest}"


INTEGRATION_LINE = "kombu-pg: PostgreSQL broker integration active:"


def assert_automatic(app, *workers) -> None:
    """The app module never mentions this package; the integration announced itself anyway."""
    source = app.path.read_text()
    assert "kombu_pg" not in source and "celery_ext" not in source
    for worker in workers:
        assert INTEGRATION_LINE in worker.log(), f"{worker.name} did not log the integration line"


def dead_letters(env) -> list[dict]:
    """Rows of the test's dead_letters table, oldest first."""
    if not env.db.table_exists(env.broker_schema, "dead_letters"):
        return []
    cur = env.db.conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(f'SELECT * FROM "{env.broker_schema}".dead_letters ORDER BY id').fetchall()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<{exc}>"
    return "\n".join(text.splitlines()[-lines:])


def subprocess_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("KOMBU_PG_TEST_URL", None)  # the subprocesses get their URL from the app module
    return env


def console_script(name: str) -> str:
    """A console script of this venv (e.g. ``celery``, ``kombu-pg``), as a user would run it."""
    candidate = Path(PY).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    assert found, f"console script {name!r} not found next to {PY} nor on PATH"
    return found


# ---------------------------------------------------------------------------------------------
# The database server and per-test schemas
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_url():
    """A superuser URL of the test server."""
    url = os.environ.get("KOMBU_PG_TEST_URL")
    if url:
        yield url
        return
    from kombu_pg import embedded  # started only when no URL is given

    server = embedded.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kombu_pg_server_url(pg_url):
    """The server of kombu-pg's pytest plugin fixtures (kombu_pg_broker, ...): this suite's."""
    return pg_url


class Database:
    """An autocommit connection to the test database with a few query helpers."""

    def __init__(self, url: str):
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True, application_name="kp_test_harness")

    def query(self, query, params=None) -> list[tuple]:
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def scalar(self, query, params=None):
        rows = self.query(query, params)
        return rows[0][0] if rows else None

    def table_exists(self, schema: str, table: str) -> bool:
        return self.scalar("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{table}"',))

    def close(self):
        self.conn.close()


@pytest.fixture(scope="session")
def _session_db(pg_url):
    db = Database(pg_url)
    yield db
    db.close()


class Env:
    """What a test needs to know about its isolated slice of the database."""

    def __init__(self, url: str, db: Database, broker_schema: str, app_schema: str):
        self.url = url
        self.db = db
        self.broker_schema = broker_schema  # the transport's tables (schema option)
        self.app_schema = app_schema  # result backend tables and the tests' `runs` table

    @property
    def transport_options(self) -> dict:
        return {"schema": self.broker_schema}

    # Broker table helpers ------------------------------------------------------------------
    def t(self, table: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.broker_schema), sql.Identifier(table))

    def broker_ready(self) -> bool:
        return self.db.table_exists(self.broker_schema, "messages")

    def messages(self, queue: str | None = None, where: str = "TRUE") -> list[dict]:
        """Rows of the messages table (optionally of one queue) as dicts."""
        if not self.broker_ready():
            return []
        cur = self.db.conn.cursor(row_factory=psycopg.rows.dict_row)
        # Invisible: not due yet, or under a live lease.
        query = sql.SQL("SELECT *, visible_at > now() OR (lease_token IS NOT NULL AND"
                        " coalesce(leased_until, visible_at) > now()) AS invisible"
                        " FROM {} WHERE ({}) {} ORDER BY id").format(
            self.t("messages"), sql.SQL(where),
            sql.SQL("AND queue = {}").format(sql.Literal(queue)) if queue else sql.SQL(""))
        return cur.execute(query).fetchall()

    def message_count(self, queue: str | None = None) -> int:
        """Messages of ``queue``, or of every task queue: Celery's remote-control and event
        queues are left out (mingle's hello to a killed worker waits in its pidbox queue
        until the queue expires)."""
        if queue is not None:
            return len(self.messages(queue))
        return len(self.messages(where="queue NOT LIKE '%.pidbox' AND queue NOT LIKE 'celeryev.%'"))

    def terminate_backends(self, application_name: str) -> int:
        """pg_terminate_backend on every session of ``application_name`` (a worker's broker
        connections, named through the URL); how many were terminated."""
        rows = self.db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = %s AND pid <> pg_backend_pid()", (application_name,))
        return sum(1 for (ok,) in rows if ok)

    def wait_count(self, queue: str | None, count: int, timeout: float = 10.0) -> None:
        """Acks may be applied asynchronously (batched): poll until the queue has ``count`` rows."""
        wait_for(lambda: self.message_count(queue) == count, timeout, interval=0.05,
                 what=lambda: f"{count} message row(s) in {queue or 'all queues'} (have {self.message_count(queue)})")

    def queue_names(self) -> set[str]:
        if not self.broker_ready():
            return set()
        return {r[0] for r in self.db.query(sql.SQL("SELECT name FROM {}").format(self.t("queues")))}

    # The tests' bookkeeping table ----------------------------------------------------------
    def runs(self, label: str | None = None) -> list[dict]:
        cur = self.db.conn.cursor(row_factory=psycopg.rows.dict_row)
        query = sql.SQL("SELECT * FROM {}.runs {} ORDER BY id").format(
            sql.Identifier(self.app_schema),
            sql.SQL("WHERE label = {}").format(sql.Literal(label)) if label else sql.SQL(""))
        return cur.execute(query).fetchall()

    def wait_runs(self, count: int, label: str | None = None, timeout: float = 30.0, what: str = ""):
        return wait_for(lambda: (lambda rows: rows if len(rows) >= count else None)(self.runs(label)),
                        timeout, what=what or f"{count} runs of {label or 'any task'}")


def _drop_schema(db: Database, schema: str) -> None:
    # Bounded: a leftover session holding a lock must not hang the teardown forever.
    with psycopg.connect(db.url, autocommit=True, application_name="kp_test_teardown") as conn:
        conn.execute("SET lock_timeout = '20s'")
        for attempt in range(3):
            try:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == 2:
                    raise
            except psycopg.errors.DeadlockDetected:
                time.sleep(0.5)


def _close_transport_pools(schema: str) -> None:
    """Close this process's transport connection pools for ``schema``.

    The transport keeps one pool per (URL, options) per process for the life of the process,
    even after every kombu Connection using it was released. A test process that uses a new
    schema per test would otherwise hold two idle server connections per test and run into
    max_connections. This reaches into kombu_pg.database internals, defensively.
    """
    try:
        from kombu_pg import database
    except ImportError:
        return
    registry = getattr(database, "_registry", None)
    if not isinstance(registry, dict):
        return
    with getattr(database, "_registry_lock", None) or contextlib.nullcontext():
        keys = [key for key, db in registry.items()
                if getattr(getattr(db, "options", None), "schema", None) == schema]
        dbs = [registry.pop(key) for key in keys]
    for db in dbs:
        with contextlib.suppress(Exception):
            db.close()


@pytest.fixture
def env(pg_url, _session_db):
    """Fresh broker and app schemas for this test, dropped with CASCADE at teardown."""
    broker_schema, app_schema = unique("t_"), unique("r_")
    db = _session_db
    db.query(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(app_schema)))
    db.query(sql.SQL(
        "CREATE TABLE {}.runs ("
        " id bigserial PRIMARY KEY, task_id text, label text, hostname text, pid integer,"
        " redelivered boolean, retries integer, started_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ).format(sql.Identifier(app_schema)))
    e = Env(pg_url, db, broker_schema, app_schema)
    yield e
    _close_transport_pools(broker_schema)
    for schema in (broker_schema, app_schema):
        _drop_schema(db, schema)


@pytest.fixture
def kombu_conn(env):
    """Factory of ``kombu.Connection``s to this test's broker schema; all closed at teardown."""
    import kombu

    conns = []

    def make(url: str | None = None, **transport_options):
        options = dict(env.transport_options, **transport_options)
        conn = kombu.Connection(url or env.url, transport_options=options)
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.release()


# ---------------------------------------------------------------------------------------------
# Celery apps written to tmp_path
# ---------------------------------------------------------------------------------------------

APP_TEMPLATE = '''\
"""A Celery app written by the test harness. The broker is configured by URL only."""
import os
import socket
import time

import psycopg
from celery import Celery

DB_URL = {db_url!r}
RUNS = {runs_table!r}

app = Celery({name!r})
app.conf.update(
    broker_url={broker_url!r},
    result_backend={result_backend!r},
    broker_transport_options={transport_options!r},
    database_table_schemas={{"task": {app_schema!r}, "group": {app_schema!r}}},
    **{extra_conf!r}
)


def record(task, label):
    """Write one row per task execution, from whatever process runs it."""
    request = task.request
    delivery_info = request.delivery_info or {{}}
    with psycopg.connect(DB_URL, autocommit=True, application_name="kp_task") as conn:
        conn.execute(
            "INSERT INTO " + RUNS + " (task_id, label, hostname, pid, redelivered, retries)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (request.id, label, request.hostname, os.getpid(),
             delivery_info.get("redelivered"), request.retries))


@app.task(bind=True)
def add(self, x, y):
    record(self, "add")
    return x + y


@app.task(bind=True)
def mark(self, label):
    record(self, label)
    return label


@app.task(bind=True)
def tsum(self, values):
    record(self, "tsum")
    return sum(values)


@app.task(bind=True)
def spawn(self, label):
    """Publishes a task from inside a task (in a prefork child: its own broker connection)."""
    record(self, label)
    return mark.delay(label + "-child").id


@app.task(bind=True)
def sleepy(self, label, seconds):
    record(self, label)
    time.sleep(seconds)
    return label


@app.task(bind=True, acks_late=True)
def slow_first_time(self, label, seconds):
    """Acked after it runs; sleeps unless it is a redelivery."""
    record(self, label)
    if not (self.request.delivery_info or {{}}).get("redelivered"):
        time.sleep(seconds)
    return label


@app.task(bind=True, acks_late=True)
def slow_on(self, label, hostname, seconds):
    """Acked after it runs; sleeps only on the worker named ``hostname``."""
    record(self, label)
    if self.request.hostname == hostname:
        time.sleep(seconds)
    return label
'''


class AppHandle:
    def __init__(self, name: str, path: Path, module, broker_url: str):
        self.name = name
        self.path = path
        self.module = module
        self.app = module.app
        self.broker_url = broker_url

    def __getattr__(self, item):  # tasks: handle.add, handle.mark, ...
        return getattr(self.module, item)

    def task_name(self, task: str) -> str:
        return f"{self.name}.{task}"


@pytest.fixture
def make_app(env, tmp_path):
    """Factory: write a Celery app module into tmp_path, import it here, return an AppHandle.

    ``make_app(visibility_timeout=2, url_params={'application_name': 'x'}, conf={...})``;
    ``extra_source`` is task code appended to the generated module.
    The result backend tables are created here, once, before any worker starts (two workers
    creating them at once would race).
    """
    handles = []
    sys.path.insert(0, str(tmp_path))

    def make(visibility_timeout: float | None = None, url_params: dict | None = None,
             conf: dict | None = None, transport_options: dict | None = None,
             broker_url: str | None = None, extra_source: str = "") -> AppHandle:
        name = unique("kpapp_")
        if callable(conf):  # conf may need the module name (task names): conf(name) -> dict
            conf = conf(name)
        options = dict(env.transport_options)
        if visibility_timeout is not None:
            options["visibility_timeout"] = visibility_timeout
        options.update(transport_options or {})
        broker_url = broker_url or env.url
        if url_params:
            broker_url = with_query(broker_url, **url_params)
        source = APP_TEMPLATE.format(
            name=name, db_url=env.url, broker_url=broker_url,
            result_backend=sqlalchemy_url(env.url), transport_options=options,
            app_schema=env.app_schema, runs_table=f'"{env.app_schema}".runs',
            extra_conf=dict(conf or {}))
        if extra_source:  # more task code, appended to the module (may use app, record, ...)
            source += "\n\n" + textwrap.dedent(extra_source)
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        module.app.backend  # creates the result tables in env.app_schema
        handle = AppHandle(name, path, module, broker_url)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.app.close()
        sys.modules.pop(handle.name, None)
    with contextlib.suppress(ValueError):
        sys.path.remove(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Subprocesses: Celery workers, beat, scripts
# ---------------------------------------------------------------------------------------------

class Proc:
    """A subprocess in its own session, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path, env: dict, name: str):
        self.args = args
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the main process only (its children, if any, are left orphaned)."""
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def kill_group(self, sig=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # the group id is our child's PID (start_new_session)

    def wait_exit(self, timeout: float) -> int:
        return wait_for(lambda: self.popen.poll() is not None and (self.popen.returncode, ),
                        timeout, what=f"{self.name} (pid {self.pid}) to exit")[0]

    def terminate(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def finish(self, deadline: float) -> None:
        """Wait for exit until ``deadline`` (monotonic), then SIGKILL the process group."""
        try:
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self.kill_group(signal.SIGKILL)  # also reaps orphaned pool children
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._log.close()


class Worker(Proc):
    def __init__(self, *args, hostname: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.hostname = hostname

    def wait_ready(self, timeout: float = 60.0) -> "Worker":
        marker = f"{self.hostname} ready."

        def ready():
            if marker in self.log():
                return True
            if not self.alive():
                raise AssertionError(f"worker {self.hostname} exited ({self.popen.returncode}) before it was ready:\n"
                                     + tail(self.log_path))
            return False

        wait_for(ready, timeout, interval=0.1, what=f"worker {self.hostname} to be ready")
        return self


class Procs:
    """Starts subprocesses for one test and always stops all of them at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.env = subprocess_env(tmp_path)
        self.started: list[Proc] = []

    def spawn(self, args: list[str], name: str, cls=Proc, **kwargs) -> Proc:
        log_path = self.tmp_path / f"{name}.log"
        proc = cls(args, log_path=log_path, cwd=self.tmp_path, env=self.env, name=name, **kwargs)
        self.started.append(proc)
        return proc

    def worker(self, app: AppHandle, name: str = "w1", pool: str = "prefork", concurrency: int = 2,
               extra_args: tuple = (), wait: bool = True, timeout: float = 60.0) -> Worker:
        hostname = f"{name}@{HOST}"
        args = [console_script("celery"), "-A", app.name, "worker", "-P", pool, "-c", str(concurrency),
                "-n", hostname, "-l", "INFO", *extra_args]
        worker = self.spawn(args, name=f"worker-{name}", cls=Worker, hostname=hostname)
        if wait:
            worker.wait_ready(timeout)
        return worker

    def celery(self, app: AppHandle, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a short ``celery -A app ...`` command to completion (bounded)."""
        return self.run([console_script("celery"), "-A", app.name, *args], timeout=timeout)

    def run(self, args: list[str], timeout: float = 60.0, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.tmp_path, env=env or self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)

    def stop_all(self, grace: float = 15.0) -> None:
        for proc in self.started:
            proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.started:
            proc.finish(deadline)

    def report(self) -> None:
        for proc in self.started:
            print(f"\n===== {proc.name} (pid {proc.pid}, exit {proc.popen.returncode}): tail of {proc.log_path} =====")
            print(tail(proc.log_path))


@pytest.fixture
def procs(tmp_path, env):
    """Start subprocesses; all are stopped by PID at teardown (before the schemas are dropped)."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
        p.report()  # shown by pytest only when the test failed


def write_script(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# ---------------------------------------------------------------------------------------------
# Servers of a test's own, for fault tests (never the shared server)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def private_server():
    """Factory of PostgreSQL servers owned by the test (kombu_pg/testing/server.py); all closed at
    teardown. Request it before ``procs`` so that workers stop before their server does."""
    from kombu_pg.testing.server import PrivateServer

    servers = []

    def make(standby_of: PrivateServer | None = None, **settings) -> PrivateServer:
        """A new server, or with ``standby_of`` a synchronous standby of that one."""
        server = standby_of.add_standby(**settings) if standby_of else PrivateServer(**settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def private_pooler():
    """Factory of PgBouncer instances owned by the test, in front of a server of its own
    (kombu_pg/testing/pooler.py): transaction pooling unless told otherwise; all stopped at
    teardown. Installs Debian's pgbouncer when it is missing; skips the test only if it cannot.
    Request it after ``private_server`` and before ``procs``, so that teardown stops the workers,
    then the pooler, then the server."""
    from kombu_pg.testing.pooler import PoolerUnavailable, PrivatePooler

    poolers = []

    def make(server, **settings) -> PrivatePooler:
        try:
            pooler = PrivatePooler(server, **settings)
        except PoolerUnavailable as exc:
            pytest.skip(f"no PgBouncer: {exc}")
        poolers.append(pooler)
        return pooler

    yield make
    for pooler in poolers:
        pooler.close()
