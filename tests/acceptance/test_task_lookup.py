"""``kombu-pg task ID`` (and ``Admin.task``): where a task is."""
from __future__ import annotations

import datetime as dt
import json
import uuid

import psycopg
from psycopg import sql

from conftest import console_script, dead_letters, wait_for
from kombu_pg import migrate
from kombu_pg.store import store_for

TASKS = '''
@app.task(bind=True)
def boom(self, label):
    record(self, label)
    raise RuntimeError(f"boom {label}")


@app.task(bind=True, max_attempts=1)
def boom_once(self, label):
    record(self, label)
    raise RuntimeError(f"boom {label}")
'''


def lookup(procs, env, task_id: str) -> dict:
    out = procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema,
                     "task", task_id, "--json"])
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def text(procs, app, task_id: str) -> str:
    out = procs.celery(app, "pg", "task", task_id)  # the same, for the app's broker
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_task_lookup_through_a_tasks_life(make_app, procs, env):
    # A failed attempt is retried in half an hour or so: the lookup sees it waiting, with its error.
    app = make_app(transport_options={"backoff_base": 3600, "backoff_cap": 3600}, extra_source=TASKS)
    unknown = str(uuid.uuid4())

    delayed = app.mark.apply_async(("delayed",), countdown=3600, priority=3)
    ready = app.mark.delay("ready")  # no worker yet
    found = lookup(procs, env, delayed.id)
    assert found["state"] == "delayed"
    [message] = found["messages"]
    assert message["queue"] == "celery" and message["task_name"] == app.task_name("mark")
    assert message["priority"] == 3 and message["attempts"] == 0 and message["max_attempts"] == 5
    until = dt.datetime.fromisoformat(message["visible_at"])
    assert until > dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=50)
    assert f"task {delayed.id}: delayed" in text(procs, app, delayed.id)
    assert lookup(procs, env, ready.id)["state"] == "ready"
    assert "waiting since" in text(procs, app, ready.id)

    gone = lookup(procs, env, unknown)
    assert gone["state"] == "not_found" and gone["messages"] == [] and gone["dead_letters"] == []
    assert "acked (done), or never published" in text(procs, app, unknown)

    worker = procs.worker(app, name="w1", pool="prefork", concurrency=2)
    assert ready.get(timeout=30) == "ready"
    wait_for(lambda: lookup(procs, env, ready.id)["state"] == "not_found", 30, what="the ack")

    running = app.sleepy.delay("running", 60)
    env.wait_runs(1, "running")
    found = lookup(procs, env, running.id)
    assert found["state"] == "leased"
    [message] = found["messages"]
    # The worker's node name and its main process (the one that holds and renews the lease).
    assert message["leased_by"] == f"{worker.hostname}[{worker.pid}]"
    assert message["attempts"] == 1 and message["leased_at"] and message["leased_until"]
    shown = text(procs, app, running.id)
    assert f"leased by {worker.hostname} (pid {worker.pid}) since" in shown and "attempt 1 of 5" in shown

    failing = app.boom.delay("x")
    wait_for(lambda: lookup(procs, env, failing.id)["state"] == "delayed", 30,
             what="the failed attempt to be scheduled for a retry")
    [message] = lookup(procs, env, failing.id)["messages"]
    assert message["attempts"] == 1
    [error] = message["errors"]
    assert error["type"] == "RuntimeError" and error["message"] == "boom x"
    shown = text(procs, app, failing.id)
    assert "1 attempt(s) made of 5" in shown and "RuntimeError: boom x" in shown

    dead = app.boom_once.delay("y")
    wait_for(lambda: any(d["task_id"] == dead.id for d in dead_letters(env)), 30, what="the dead letter")
    found = lookup(procs, env, dead.id)
    assert found["state"] == "dead_lettered" and found["messages"] == []
    [letter] = found["dead_letters"]
    assert letter["reason"] == "max_attempts" and letter["last_error"] == "boom y"
    assert "max_attempts after 1 attempt(s)" in text(procs, app, dead.id)

    out = procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema,
                     "revoke", unknown])
    assert out.returncode == 0, out.stdout + out.stderr
    found = lookup(procs, env, unknown)
    assert found["state"] == "revoked" and found["revoked"]["expires_at"]
    assert "revoked" in text(procs, app, unknown)


def test_the_claim_records_its_holder_in_hot_updates(env):
    """Who holds a lease costs the claim no index entry: every claim stays a HOT update."""
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, env.broker_schema)
    q = store_for(env.broker_schema).sql
    table = f'"{env.broker_schema}".messages'
    with psycopg.connect(env.url) as conn:  # one transaction: its own statistics, rolled back
        conn.execute(sql.SQL("INSERT INTO {} (queue, payload, task_id) "
                             "SELECT 'q', 'x', 't' || i FROM generate_series(1, 20) AS i").format(env.t("messages")))
        rows = conn.execute(q["claim"], {"queue": "q", "limit": 50, "default_max_attempts": 5, "lease_seconds": 30,
                                      "held": [], "synchronous_commit": "on", "holder": "w9@h[7]"}).fetchall()
        assert len(rows) == 20 and not any(row[-1] for row in rows)  # none revoked
        updated, hot = conn.execute("SELECT pg_stat_get_xact_tuples_updated(%s::regclass), "
                                    "pg_stat_get_xact_tuples_hot_updated(%s::regclass)", (table, table)).fetchone()
        assert updated == hot == 20
        assert conn.execute(sql.SQL("SELECT DISTINCT leased_by, leased_at IS NOT NULL FROM {}").format(
            env.t("messages"))).fetchall() == [("w9@h[7]", True)]
        conn.rollback()
