"""Transactional enqueue: a task published inside the application's transaction commits or rolls
back with it, with psycopg, SQLAlchemy and Django; the worker is woken at commit."""
from __future__ import annotations

import contextlib

import psycopg
import pytest

import kombu_pg
from conftest import sqlalchemy_url, wait_for

ATTEMPTS = 5


def commit_latencies(env, app, publish_in_transaction) -> list[float]:
    """Seconds from each commit to the start of its task, measured on the database clock."""
    latencies = []
    for i in range(ATTEMPTS):
        label = f"commit{i}"
        publish_in_transaction(lambda: app.mark.delay(label))
        committed_at = env.db.scalar("SELECT clock_timestamp()")
        [run] = env.wait_runs(1, label, timeout=10)
        latencies.append((run["started_at"] - committed_at).total_seconds())
    return latencies


def check(env, app, procs, transaction):
    """``transaction(publish, commit)``: run ``publish()`` inside a transaction, then commit or roll back."""
    procs.worker(app, pool="solo")
    app.mark.delay("warm-up")  # the worker's first task pays for its imports
    env.wait_runs(1, "warm-up", timeout=20)

    transaction(lambda: app.mark.delay("rolled-back"), commit=False)
    app.mark.delay("after-rollback")  # FIFO: once this ran, the rolled-back one would have too
    env.wait_runs(1, "after-rollback", timeout=10)
    assert env.runs("rolled-back") == []
    assert env.message_count() == 0 or wait_for(lambda: env.message_count() == 0, 5)

    latencies = commit_latencies(env, app, lambda publish: transaction(publish, commit=True))
    assert all(latency >= 0 for latency in latencies), latencies
    # Woken by the NOTIFY delivered at commit, not by a poll (1 s): the best of a few commits
    # shows it, without failing on a machine busy at one moment.
    assert min(latencies) <= 0.05, latencies


def test_psycopg_transaction(env, make_app, procs):
    app = make_app()

    def transaction(publish, commit):
        with psycopg.connect(env.url) as conn:
            with kombu_pg.enqueue_in(conn):
                conn.execute("SELECT 1")
                publish()
            conn.commit() if commit else conn.rollback()

    check(env, app, procs, transaction)


def test_sqlalchemy_session(env, make_app, procs):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    app = make_app()
    engine = sqlalchemy.create_engine(sqlalchemy_url(env.url).removeprefix("db+"))

    def transaction(publish, commit):
        with Session(engine) as session:
            session.execute(sqlalchemy.text("SELECT 1"))
            with kombu_pg.enqueue_in(session):
                publish()
            session.commit() if commit else session.rollback()

    try:
        check(env, app, procs, transaction)
    finally:
        engine.dispose()


def test_django_atomic(env, make_app, procs):
    django = pytest.importorskip("django")
    from django.conf import settings

    conninfo = psycopg.conninfo.conninfo_to_dict(env.url)
    if not settings.configured:
        settings.configure(DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": conninfo.get("dbname", "postgres"), "USER": conninfo.get("user", ""),
            "PASSWORD": conninfo.get("password", ""), "HOST": conninfo.get("host", ""),
            "PORT": conninfo.get("port", ""),
        }})
        django.setup()
    from django.db import connection, transaction as django_transaction

    class Rollback(Exception):
        pass

    app = make_app()

    def transaction(publish, commit):
        with contextlib.suppress(Rollback):
            with django_transaction.atomic(), kombu_pg.enqueue_in(connection):
                publish()
                if not commit:
                    raise Rollback

    try:
        check(env, app, procs, transaction)
    finally:
        connection.close()


def test_enqueue_in_rejects_other_objects():
    with pytest.raises(TypeError, match="psycopg 3 connection"):
        with kombu_pg.enqueue_in(object()):
            pass
