"""The dead-letter command line: ``kombu-pg dlq list/show/replay/purge`` and the same commands
as ``celery -A app pg dlq ...`` (the app's broker URL and schema)."""
from __future__ import annotations

import json

import psycopg.rows
import pytest
from psycopg import sql

from conftest import INTEGRATION_LINE, console_script, dead_letters, wait_for


# The task reads a flag in the database: failing while it says "broken", as with a bug that is
# fixed later (the flag is flipped), after which the dead letters are replayed.
TASKS = '''
FLAGS = RUNS.rsplit(".", 1)[0] + ".flags"


@app.task(bind=True)
def flaky(self, label):
    record(self, label)
    with psycopg.connect(DB_URL, autocommit=True, application_name="kp_task") as conn:
        broken = conn.execute("SELECT broken FROM " + FLAGS + " WHERE name = 'flaky'").fetchone()[0]
    if broken:
        raise RuntimeError(f"still broken ({label})")
    return f"fixed {label}"
'''



def kombu_pg(procs, env, *args, ok: bool = True):
    out = procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema, *args])
    if ok:
        assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


def listed(procs, env, *filters) -> list[dict]:
    out = kombu_pg(procs, env, "dlq", "list", "--json", *filters)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def set_broken(env, broken: bool) -> None:
    env.db.query(sql.SQL("UPDATE {}.flags SET broken = %s WHERE name = 'flaky'").format(
        sql.Identifier(env.app_schema)), (broken,))


@pytest.mark.slow
def test_replay_after_the_bug_is_fixed(make_app, procs, env):
    env.db.query(sql.SQL("CREATE TABLE {}.flags (name text PRIMARY KEY, broken boolean NOT NULL)").format(
        sql.Identifier(env.app_schema)))
    env.db.query(sql.SQL("INSERT INTO {}.flags VALUES ('flaky', true)").format(sql.Identifier(env.app_schema)))
    app = make_app(visibility_timeout=3, extra_source=TASKS, transport_options={
        "max_attempts": 2, "backoff_base": 0.2, "polling_interval": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=2)
    assert "kombu_pg" not in app.path.read_text() and "celery_ext" not in app.path.read_text()
    results = [app.flaky.delay(f"job{i}") for i in range(3)]
    for r in results:
        wait_for(lambda: r.state == "FAILURE", 30, what=f"{r.id} to fail")
    letters = listed(procs, env)
    assert sorted(l["task_id"] for l in letters) == sorted(r.id for r in results)
    assert all(l["reason"] == "max_attempts" and l["attempts"] == 2 and l["replayed_at"] is None for l in letters)
    first, *rest = letters

    # Replayed while still broken: it runs max_attempts times again (attempts start over) and
    # comes back as a new dead letter whose history holds all four failures.
    out = kombu_pg(procs, env, "dlq", "replay", str(first["id"]))
    assert "replayed 1 dead letter(s)" in out.stdout

    def second_letter():
        rows = [r for r in dead_letters(env) if r["task_id"] == first["task_id"]]
        return rows if len(rows) == 2 else None

    old, new = wait_for(second_letter, 30, what="the replayed message to be dead-lettered again")
    assert old["replayed_at"] is not None and new["replayed_at"] is None
    assert new["attempts"] == 2, new
    assert len(new["errors"]) == 4 and all(e["type"] == "RuntimeError" for e in new["errors"]), new["errors"]
    assert sum(1 for r in env.runs() if r["task_id"] == first["task_id"]) == 4

    # The bug is fixed; replay everything not yet replayed through the app's own CLI.
    set_broken(env, False)
    out = procs.celery(app, "pg", "dlq", "replay", "--all", "--task", app.task_name("flaky"))
    assert out.returncode == 0, out.stderr
    assert "replayed 3 dead letter(s)" in out.stdout, out.stdout
    # Uncached reads: Celery's result backend caches the first ready state it reads (FAILURE).
    def meta(task_id):
        return app.app.backend.get_task_meta(task_id, cache=False)

    for r in results:
        wait_for(lambda: meta(r.id)["status"] == "SUCCESS", 30, what=f"{r.id} to succeed after the replay")
    assert sorted(meta(r.id)["result"] for r in results) == ["fixed job0", "fixed job1", "fixed job2"]
    wait_for(lambda: env.message_count() == 0, 10, what="the replayed messages to be acked")

    rows = dead_letters(env)
    assert len(rows) == 4 and all(row["replayed_at"] is not None for row in rows), rows
    assert listed(procs, env, "--not-replayed") == []
    assert len(listed(procs, env, "--replayed")) == 4
    out = kombu_pg(procs, env, "dlq", "replay", "--all")  # nothing left to replay
    assert "replayed 0 dead letter(s)" in out.stdout
    assert kombu_pg(procs, env, "dlq", "replay", ok=False).returncode == 2  # ids or --all needed
    assert sum(1 for r in env.runs() if r["label"].startswith("job")) == 4 + 2 + 2 + 3
    assert INTEGRATION_LINE in worker.log()


def test_show_and_list_filters(make_app, procs, env):
    app = make_app(visibility_timeout=3, transport_options={"max_attempts": 2})
    procs.worker(app, pool="solo", concurrency=1)
    unknown = [app.app.send_task(f"gone.task{i}", args=(i,)) for i in range(3)]
    wait_for(lambda: len(dead_letters(env)) == 3, 30, what="three dead letters")

    letters = listed(procs, env)
    assert [l["task_id"] for l in letters] == [r.id for r in unknown]  # oldest first
    assert [l["task_id"] for l in listed(procs, env, "--task", "gone.task1")] == [unknown[1].id]
    assert listed(procs, env, "--reason", "max_attempts") == []
    assert len(listed(procs, env, "--reason", "unregistered", "--queue", "celery")) == 3
    page = listed(procs, env, "--limit", "2")
    assert len(page) == 2
    assert [l["id"] for l in listed(procs, env, "--after", str(page[-1]["id"]))] == [letters[2]["id"]]
    table = kombu_pg(procs, env, "dlq", "list", "--limit", "2").stdout
    assert f"--after {page[-1]['id']}" in table

    shown = json.loads(kombu_pg(procs, env, "dlq", "show", str(letters[0]["id"])).stdout)
    assert shown["reason"] == "unregistered" and shown["task_name"] == "gone.task0"
    assert shown["message"]["headers"]["id"] == unknown[0].id
    same = procs.celery(app, "pg", "dlq", "show", str(letters[0]["id"]))
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout) == shown
    same = procs.celery(app, "pg", "dlq", "list", "--json", "--reason", "unregistered")
    assert same.returncode == 0, same.stderr
    assert [json.loads(line) for line in same.stdout.splitlines() if line.strip()] == letters
    missing = kombu_pg(procs, env, "dlq", "show", "999999", ok=False)
    assert missing.returncode != 0 and "999999" in missing.stderr


def test_purge_removes_only_what_it_says(make_app, procs, env, kombu_conn):
    # Dead letters made by consumers rejecting messages (without requeue), in two queues.
    conn = kombu_conn()
    ids = {}
    for queue, count in (("purge_a", 5), ("purge_b", 1)):
        simple = conn.SimpleQueue(queue)
        for i in range(count):
            simple.put({"n": i})
        for i in range(count):
            message = simple.get(timeout=10)
            message.reject(requeue=False)
        simple.close()
    rows = dead_letters(env)
    assert len(rows) == 6 and all(r["reason"] == "rejected" for r in rows)
    a = [r["id"] for r in rows if r["queue"] == "purge_a"]
    [b] = [r["id"] for r in rows if r["queue"] == "purge_b"]
    table = sql.SQL("{}.dead_letters").format(sql.Identifier(env.broker_schema))
    age = sql.SQL("UPDATE {} SET dead_lettered_at = now() - %s::interval WHERE id = ANY(%s)").format(table)
    env.db.query(age, ("3 hours", [a[0], a[1], b]))
    env.db.query(age, ("1 hour", [a[2]]))

    def remaining() -> list[int]:
        return [r["id"] for r in dead_letters(env)]

    # list shows the same selections purge acts on.
    assert [l["id"] for l in listed(procs, env, "--older-than", "2h")] == [a[0], a[1], b]
    assert [l["id"] for l in listed(procs, env, "--newer-than", "10m")] == a[3:]
    assert [l["id"] for l in listed(procs, env, "--older-than", "30m", "--newer-than", "2h")] == [a[2]]

    out = kombu_pg(procs, env, "dlq", "purge", ok=False)  # a selection is required
    assert out.returncode == 2 and len(remaining()) == 6

    out = kombu_pg(procs, env, "dlq", "purge", "--older-than", "2h", "--queue", "purge_b")
    assert "purged 1 dead letter(s)" in out.stdout
    assert remaining() == a

    out = kombu_pg(procs, env, "dlq", "purge", "--older-than", "2h")
    assert "purged 2 dead letter(s)" in out.stdout
    assert remaining() == a[2:]

    # Replay one (its message goes back to its queue), then purge only the replayed ones.
    out = kombu_pg(procs, env, "dlq", "replay", str(a[3]))
    assert "replayed 1 dead letter(s)" in out.stdout
    assert env.message_count("purge_a") == 1
    out = kombu_pg(procs, env, "dlq", "purge", "--replayed")
    assert "purged 1 dead letter(s)" in out.stdout
    assert remaining() == [a[2], a[4]]

    out = kombu_pg(procs, env, "dlq", "purge", "--older-than", "30m")
    assert "purged 1 dead letter(s)" in out.stdout
    assert remaining() == [a[4]]
    assert env.message_count("purge_a") == 1  # purging dead letters never touches messages

    app = make_app()
    out = procs.celery(app, "pg", "dlq", "purge", "--all")
    assert out.returncode == 0, out.stderr
    assert "purged 1 dead letter(s)" in out.stdout
    assert remaining() == []


# The task fails on its first run and succeeds when replayed: each run is recorded in the
# runs table (started_at = clock_timestamp() when it starts).
FIRST_RUN_FAILS = '''
@app.task(bind=True)
def fails_first_run(self, label):
    record(self, label)
    with psycopg.connect(DB_URL, autocommit=True, application_name="kp_task") as conn:
        runs = conn.execute("SELECT count(*) FROM " + RUNS + " WHERE task_id = %s", (self.request.id,)).fetchone()[0]
    if runs == 1:
        raise RuntimeError(f"first run of {label}")
    return label
'''


@pytest.mark.slow
def test_replayed_dead_letter_starts_within_100ms_on_an_idle_worker(make_app, procs, env):
    """Acceptance bound: a replay wakes the consumers of its queues at once, as a publish does
    (median of 5 replays under 100 ms, from the replay's transaction to the task's start), not
    at their next safety-net poll (polling_interval, 1 s by default)."""
    replays, bound_s = 5, 0.100
    app = make_app(extra_source=FIRST_RUN_FAILS, transport_options={"max_attempts": 1})
    procs.worker(app, pool="solo", concurrency=1)
    results = [app.fails_first_run.delay(f"replay{i}") for i in range(replays)]
    wait_for(lambda: len(dead_letters(env)) == replays, 30, what=f"{replays} dead letters")
    letters = {row["task_id"]: row["id"] for row in dead_letters(env)}

    latencies = []
    for i, result in enumerate(results):
        kombu_pg(procs, env, "dlq", "replay", str(letters[result.id]))
        [run] = env.wait_runs(2, f"replay{i}", timeout=10)[1:]
        # replayed_at is the replay transaction's now(): its start, so at or before its commit.
        replayed_at = env.db.scalar(sql.SQL("SELECT replayed_at FROM {}.dead_letters WHERE id = %s").format(
            sql.Identifier(env.broker_schema)), (letters[result.id],))
        latencies.append((run["started_at"] - replayed_at).total_seconds())
    latencies.sort()
    assert latencies[replays // 2] < bound_s, f"replay-to-start latencies (s): {latencies}"
