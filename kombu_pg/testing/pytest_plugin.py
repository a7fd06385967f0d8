"""pytest fixtures for testing your own Celery tasks against a real kombu-pg broker.

Registered as a pytest plugin (entry point ``pytest11``) when kombu-pg is installed. It only
defines fixtures: nothing starts, connects or changes unless a test asks for one of them.

``kombu_pg_broker``
    A fresh, migrated broker schema for one test, dropped (with everything in it) afterwards.
    The server is ``KOMBU_PG_TEST_URL`` when set, else an embedded throw-away server (the
    ``embedded`` extra), started on first use and stopped at the end of the session. It offers
    ``url``, ``schema``, ``celery_config``, ``admin`` (:class:`kombu_pg.admin.Admin`),
    ``dead_letters()`` and ``wait_for_dead_letters(count)``.
``kombu_pg_celery_config``
    The broker settings for ``celery.contrib.pytest``: return them from your ``celery_config``
    fixture and its ``celery_app`` and ``celery_worker`` (a worker thread, solo pool) use the
    test's schema.
``kombu_pg_worker``
    ``kombu_pg_worker("proj.celery:app", "-c", "2")`` starts a real ``celery worker`` process of
    your app (prefork pool by default: leases, redelivery after a killed child) on the test's
    schema, waits until it is ready, and stops it after the test.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

#: Where the tests' databases are, when not on an embedded server of the session's own.
URL_VARIABLE = "KOMBU_PG_TEST_URL"


@pytest.fixture(scope="session")
def kombu_pg_server_url():
    """The URL of the PostgreSQL server the broker fixtures use (a role that may create schemas)."""
    url = os.environ.get(URL_VARIABLE)
    if url:
        yield url
        return
    from kombu_pg import embedded

    try:
        server = embedded.start()
    except ImportError as exc:
        pytest.fail(f"{exc}, or set {URL_VARIABLE}=postgresql://...", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


class Broker:
    """One test's broker: a schema of its own on the test server."""

    def __init__(self, url: str, schema: str):
        from kombu_pg.admin import Admin

        self.url = url
        self.schema = schema
        self.admin = Admin(url, schema, role="test")

    @property
    def transport_options(self) -> dict:
        return {"schema": self.schema}

    @property
    def celery_config(self) -> dict:
        return {"broker_url": self.url, "broker_transport_options": self.transport_options}

    def dead_letters(self, **filters) -> list:
        """Every dead letter (matching ``queue=``, ``task=``, ``reason=``...), oldest first, with
        its message and error history (:class:`kombu_pg.admin.DeadLetter`)."""
        summaries = self.admin.dead_letters(limit=10_000, **filters)
        return [self.admin.dead_letter(summary.id) for summary in summaries]

    def wait_for_dead_letters(self, count: int = 1, timeout: float = 30.0, **filters) -> list:
        """Wait until at least ``count`` dead letters match, then return them all."""
        deadline = time.monotonic() + timeout
        while True:
            letters = self.dead_letters(**filters)
            if len(letters) >= count:
                return letters
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(letters)} dead letter(s) after {timeout:g}s, expected "
                                     f"{count}: {[(l.task_name, l.reason) for l in letters]}")
            time.sleep(0.1)

    def migrate(self) -> None:
        from kombu_pg import migrate

        with self.admin.connect() as conn:
            migrate.migrate(conn, self.schema)

    def drop(self) -> None:
        from psycopg import sql

        from kombu_pg import database

        database.close_schema(self.schema)  # this process's transport pools for the schema
        with self.admin.connect() as conn:
            conn.execute("SET lock_timeout = '20s'")  # a leftover session must not hang teardown
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))

    def __repr__(self) -> str:
        return f"<kombu_pg Broker schema={self.schema}>"


@pytest.fixture
def kombu_pg_broker(kombu_pg_server_url):
    """A fresh, migrated broker schema for this test; dropped with its contents afterwards."""
    broker = Broker(kombu_pg_server_url, f"kp_test_{uuid.uuid4().hex[:12]}")
    broker.migrate()
    yield broker
    broker.drop()


@pytest.fixture
def kombu_pg_celery_config(kombu_pg_broker) -> dict:
    """``broker_url`` and ``broker_transport_options`` for the test's schema."""
    return kombu_pg_broker.celery_config


class WorkerProcess:
    """A ``celery worker`` subprocess of the user's app, in a process group of its own."""

    def __init__(self, args: list[str], env: dict, cwd: Path, log_path: Path, ready_path: Path):
        self.log_path = log_path
        self._ready_path = ready_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready_path.exists():
            if self.popen.poll() is not None:
                raise AssertionError(f"the worker exited ({self.popen.returncode}) before it was ready:\n"
                                     + self.log()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker was not ready after {timeout:g}s:\n" + self.log()[-3000:])
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Warm shutdown (SIGTERM); after ``timeout``, SIGKILL to its process group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # also any pool process left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        return self.popen.returncode


@pytest.fixture
def kombu_pg_worker(kombu_pg_broker, request, tmp_path_factory):
    """Factory: ``kombu_pg_worker(app, *worker_options, settings=None, timeout=60)`` starts a
    ``celery worker`` of ``app`` ("module", "module:app") on the test's broker schema (plus
    ``settings``, laid over the app's configuration), waits until it consumes, and returns a
    :class:`WorkerProcess` (``log()``, ``stop()``). Every worker is stopped after the test."""
    workers: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("kombu_pg_worker")

    def start(app: str, *options: str, settings: dict | None = None, timeout: float = 60.0) -> WorkerProcess:
        name = f"w{len(workers) + 1}"
        ready = log_dir / f"{name}.ready"
        env = dict(os.environ)
        # The test process's own import path entries (not the interpreter's, which the worker
        # has anyway), so that the app and its tasks import as they do here.
        own = [p for p in sys.path if p and not p.startswith((sys.prefix, sys.base_prefix))]
        env["PYTHONPATH"] = os.pathsep.join([str(request.config.rootpath), *own])
        env["PYTHONUNBUFFERED"] = "1"
        env["KOMBU_PG_TEST_SETTINGS"] = json.dumps({**kombu_pg_broker.celery_config, **(settings or {})})
        env["KOMBU_PG_TEST_READY"] = str(ready)
        env.pop("CELERY_BROKER_URL", None)  # it would win over the test's broker_url
        args = [sys.executable, "-m", "celery_ext.testing", app, "-n", f"{name}@%h", "-l", "INFO", *options]
        worker = WorkerProcess(args, env, request.config.rootpath, log_dir / f"{name}.log", ready)
        workers.append(worker)
        worker.wait_ready(timeout)
        return worker

    yield start
    for worker in workers:
        code = worker.stop()
        # Shown by pytest when the test failed.
        print(f"--- kombu_pg_worker {worker.log_path.stem} (pid {worker.pid}, exit {code}) ---\n"
              + "\n".join(worker.log().splitlines()[-40:]))
