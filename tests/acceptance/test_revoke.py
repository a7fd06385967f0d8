"""Durable revokes: ``app.control.revoke`` / ``celery control revoke`` / ``kombu-pg revoke``
remove a revoked task's waiting message and record its id, so that workers started later, or
restarted, drop it too; ``terminate=True`` keeps Celery's meaning."""
from __future__ import annotations

import uuid

from psycopg import sql

from conftest import console_script, wait_for


def kombu_pg(procs, env, *args, ok: bool = True):
    out = procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema, *args])
    if ok:
        assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


def revoked_ids(env) -> set[str]:
    return {row[0] for row in env.db.query(sql.SQL("SELECT task_id FROM {}").format(env.t("revoked")))}


def rows_of(env, task_id: str) -> list[dict]:
    return env.messages(where=f"task_id = '{task_id}'")


def state(app, task_id: str) -> str:
    return app.app.AsyncResult(task_id).state


def test_revoked_tasks_are_removed_and_a_worker_started_later_drops_them(make_app, procs, env):
    app = make_app()
    delayed = app.mark.apply_async(("delayed",), countdown=3600)
    ready = app.mark.delay("ready")
    kept = app.mark.delay("kept")
    env.wait_count(None, 3)

    # No worker runs: the broadcast reaches nobody, the database does.
    app.app.control.revoke([delayed.id, ready.id])
    assert rows_of(env, delayed.id) == [] and rows_of(env, ready.id) == []
    assert len(rows_of(env, kept.id)) == 1
    assert {delayed.id, ready.id} <= revoked_ids(env)
    # Marked as a worker receiving the revoke would have.
    assert state(app, delayed.id) == "REVOKED" and state(app, ready.id) == "REVOKED"

    # The command, for the app: marks what it removed at once.
    other = app.mark.delay("other")
    out = procs.celery(app, "pg", "revoke", other.id)
    assert out.returncode == 0 and f"{other.id}: removed its ready message" in out.stdout, out.stdout + out.stderr
    assert rows_of(env, other.id) == [] and state(app, other.id) == "REVOKED"

    # A task published again under a revoked id (as Celery's retry does) reaches the table, and
    # the worker started now drops it: it never runs, and its row is settled.
    again = app.mark.apply_async(("again",), task_id=ready.id)
    assert len(rows_of(env, again.id)) == 1
    worker = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    assert kept.get(timeout=30) == "kept"
    wait_for(lambda: rows_of(env, again.id) == [], 30, what="the revoked task's row to be settled")
    assert env.runs("again") == [] and env.runs("ready") == [] and env.runs("delayed") == []
    assert env.runs("other") == []
    assert state(app, again.id) == "REVOKED"
    assert f"Discarding revoked task: {app.task_name('mark')}[{again.id}]" in worker.log()
    assert worker.alive()


def test_celery_control_revoke_removes_a_delayed_task_and_terminate_keeps_its_meaning(make_app, procs, env):
    app = make_app()
    worker = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    delayed = app.mark.apply_async(("delayed",), countdown=3600)
    env.wait_count(None, 1)

    out = procs.celery(app, "control", "revoke", delayed.id, "--timeout", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert rows_of(env, delayed.id) == [] and delayed.id in revoked_ids(env)
    assert state(app, delayed.id) == "REVOKED"
    # Celery's in-memory revoke as before: the worker lists the id.
    listed = procs.celery(app, "inspect", "revoked", "--timeout", "5")
    assert delayed.id in listed.stdout, listed.stdout + listed.stderr

    # terminate=True: the running task's process is killed, the task REVOKED, and it does not
    # come back (its message is settled, whatever the pool reports about the killed process).
    running = app.sleepy.delay("running", 60)
    env.wait_runs(1, "running")
    app.app.control.revoke(running.id, terminate=True)
    wait_for(lambda: rows_of(env, running.id) == [], 30, what="the terminated task's row to be settled")
    assert state(app, running.id) == "REVOKED"
    assert len(env.runs("running")) == 1
    assert app.add.delay(2, 3).get(timeout=30) == 5  # the worker carries on
    assert worker.alive()


def test_kombu_pg_revoke_and_a_restarted_worker_drops_the_leased_one(make_app, procs, env):
    app = make_app(visibility_timeout=2)
    first = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    app.sleepy.delay("busy", 60)
    env.wait_runs(1, "busy")
    held = app.mark.delay("held")  # prefetched by w1, whose only process is busy: leased, not run
    wait_for(lambda: [r["leased_by"] for r in rows_of(env, held.id)] == [f"{first.hostname}[{first.pid}]"],
             30, what="w1 to lease the second task")
    waiting = app.mark.apply_async(("waiting",), countdown=3600)

    never = str(uuid.uuid4())
    out = kombu_pg(procs, env, "revoke", held.id, waiting.id, never)
    assert f"{held.id}: message" in out.stdout and f"is leased by {first.hostname}[{first.pid}]" in out.stdout, out.stdout
    assert f"{waiting.id}: removed its delayed message" in out.stdout, out.stdout
    assert f"{never}: no waiting message" in out.stdout, out.stdout
    assert {held.id, waiting.id, never} <= revoked_ids(env)
    assert rows_of(env, waiting.id) == [] and len(rows_of(env, held.id)) == 1

    # w1 (which got no broadcast) dies with the lease; a new worker takes the message once the
    # lease runs out, and drops it: the claim flags the revoked task.
    first.kill_group()
    first.wait_exit(30)
    second = procs.worker(app, name="w2", pool="prefork", concurrency=2)
    wait_for(lambda: rows_of(env, held.id) == [], 60, what="the revoked leased task's row to be settled")
    assert env.runs("held") == [] and env.runs("waiting") == []
    assert state(app, held.id) == "REVOKED"
    assert f"Discarding revoked task: {app.task_name('mark')}[{held.id}]" in second.log()
    # The task the command removed is marked REVOKED by the housekeeping worker (the command
    # has no result backend).
    wait_for(lambda: state(app, waiting.id) == "REVOKED", 60, what="the removed task to be marked REVOKED")


def test_revoke_command_errors_are_one_line(procs, env):
    out = kombu_pg(procs, env, "revoke", "x", "--expires", "0", ok=False)
    assert out.returncode == 2 and "--expires must be more than 0" in out.stderr, out.stderr
    out = kombu_pg(procs, env, "revoke", ok=False)
    assert out.returncode == 2 and "Missing argument" in out.stderr, out.stderr
