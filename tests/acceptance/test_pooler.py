"""Behind PgBouncer in transaction pooling: workers, retries and dead letters, the CLI and beat
work through it, what needs a session goes over direct_url, and the server side stays within
the pooler's pool.

Each test runs a PostgreSQL server of its own with a PgBouncer of its own in front of it
(kombu_pg/testing/). The broker tables live on that server; the tasks record their runs and
results in the test database, so the server sees only the broker's own connections.
"""
from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
from psycopg import sql

from conftest import console_script, wait_for, with_query
from test_beat import beat_conf, start_beat, wait_log

TASKS = '''
@app.task(bind=True)
def fails(self, label, times):
    """Raises on its first ``times`` runs."""
    record(self, label)
    with psycopg.connect(DB_URL, autocommit=True, application_name="kp_task") as conn:
        runs = conn.execute("SELECT count(*) FROM " + RUNS + " WHERE label = %s", (label,)).fetchone()[0]
    if runs <= times:
        raise RuntimeError(f"{label}: failing run {runs}")
    return runs
'''


def on_server(server, query, params=None) -> list[tuple]:
    """A statement on the server itself (not through the pooler)."""
    with psycopg.connect(server.url, autocommit=True, application_name="kp_pooler_probe") as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def broker_table(env, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(env.broker_schema), sql.Identifier(table))


def waiting(server, env) -> int:
    return on_server(server, sql.SQL("SELECT count(*) FROM {}").format(broker_table(env, "messages")))[0][0]


def assert_each_ran_once(env, label: str, task_ids: list[str]) -> None:
    counts = dict(env.db.query(sql.SQL("SELECT task_id, count(*) FROM {}.runs WHERE label = %s GROUP BY 1")
                               .format(sql.Identifier(env.app_schema)), (label,)))
    twice = {task_id: n for task_id, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} task(s) ran more than once: {list(twice.items())[:5]}"
    assert set(counts) == set(task_ids), f"{len(set(task_ids) - set(counts))} task(s) never ran"


def alive_while(worker, predicate):
    """``predicate``, failing at once if the worker died meanwhile."""
    def check():
        assert worker.alive(), f"{worker.name} exited ({worker.popen.returncode})"
        return predicate()
    return check


def kombu_pg(procs, url: str, env, *args: str):
    result = procs.run([console_script("kombu-pg"), "--url", url, "--schema", env.broker_schema, *args])
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_behind_pgbouncer_runs_each_task_once(private_server, private_pooler, env, make_app, procs):
    server = private_server()
    bouncer = private_pooler(server)
    # Nothing says there is a pooler: the transport finds out. No direct_url either: it polls.
    app = make_app(broker_url=bouncer.url)
    worker = procs.worker(app, pool="prefork", concurrency=2)
    # Tasks that publish from the prefork child, through the pooler too.
    spawned = [app.spawn.delay("spawner").id for _ in range(20)]
    ids = [app.mark.delay("bounced").id for _ in range(480)]
    wait_for(alive_while(worker, lambda: len(env.runs("bounced")) >= 480
                         and len(env.runs("spawner-child")) >= 20), 180,
             what=lambda: f"500 runs (have {len(env.runs('bounced'))} + {len(env.runs('spawner-child'))})")
    wait_for(alive_while(worker, lambda: waiting(server, env) == 0), 30, what="an empty queue")
    time.sleep(2)  # a message run twice would have come back by now
    assert_each_ran_once(env, "bounced", ids)
    assert_each_ran_once(env, "spawner", spawned)
    assert len(env.runs("spawner-child")) == 20
    log = worker.log()
    assert "leads to a pooler" in log and "poll every" in log, log[-3000:]
    assert "PreparedStatement" not in log and "ERROR" not in log, log[-3000:]


@pytest.mark.timeout(120)
def test_nothing_prepared_or_set_reaches_other_clients_of_the_pooler(private_server, private_pooler, env,
                                                                     kombu_conn, procs):
    server = private_server()
    bouncer = private_pooler(server, pool_size=1)  # every client gets the same server connection
    conn = kombu_conn(bouncer.url)
    queue = conn.SimpleQueue("shared")
    for i in range(20):
        queue.put({"n": i})
    for _ in range(20):
        queue.get(timeout=10).ack()
    queue.close()
    kombu_pg(procs, bouncer.url, env, "stats")
    kombu_pg(procs, bouncer.url, env, "dlq", "list")
    wait_for(lambda: waiting(server, env) == 0, 10, what="the acks to land")
    # What another client of the pooler finds on that server connection.
    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as other:
        assert other.execute("SELECT name FROM pg_prepared_statements").fetchall() == []
        assert other.execute("SHOW statement_timeout").fetchone()[0] == "0"


def test_pooler_option_is_checked(env, kombu_conn):
    conn = kombu_conn(pooler="sometimes")
    with pytest.raises(ValueError) as info:
        conn.connect()
    assert "'pooler' must be one of 'auto', 'transaction', 'none'" in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_retries_dead_letters_and_cli_through_pgbouncer(private_server, private_pooler, env, make_app, procs):
    server = private_server()
    bouncer = private_pooler(server)
    direct = with_query(server.url, application_name="kp_direct")
    app = make_app(broker_url=bouncer.url, extra_source=TASKS, transport_options={
        "pooler": "transaction", "direct_url": direct, "max_attempts": 3, "backoff_base": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=2)
    # LISTEN goes straight to the server, over direct_url.
    assert on_server(server, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kp_direct'"
                             " AND query LIKE 'LISTEN %'")[0][0] >= 1

    retried = app.fails.delay("once", 1)
    doomed = app.fails.delay("always", 99)
    assert retried.get(timeout=60) == 2  # failed once, retried, succeeded
    wait_for(alive_while(worker, lambda: len(env.runs("always")) >= 3), 60, what="three runs of the doomed task")

    def letters() -> list[dict]:
        out = kombu_pg(procs, bouncer.url, env, "dlq", "list", "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    listed = wait_for(letters, 30, what="a dead letter listed through the pooler")
    assert [(d["task_id"], d["reason"], d["attempts"]) for d in listed] == [(doomed.id, "max_attempts", 3)]
    assert "RuntimeError" in listed[0]["last_error_type"]
    stats = json.loads(kombu_pg(procs, bouncer.url, env, "stats", "--json").stdout)
    assert {"queue": "celery", "reason": "max_attempts", "count": 1} in stats["dead_letters"]
    via_app = procs.celery(app, "pg", "stats")  # the app's broker URL: the pooler
    assert via_app.returncode == 0 and "max_attempts" in via_app.stdout, via_app.stderr

    replayed = kombu_pg(procs, bouncer.url, env, "dlq", "replay", str(listed[0]["id"]))
    assert "replayed 1 dead letter(s)" in replayed.stdout
    wait_for(alive_while(worker, lambda: len(env.runs("always")) >= 6), 60, what="the replayed task to run again")
    wait_for(lambda: len(letters()) == 2, 30, what="the replayed task dead-lettered again")
    assert len(env.runs("once")) == 2
    assert "PreparedStatement" not in worker.log()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_beat_sends_through_pgbouncer_with_a_direct_url(private_server, private_pooler, env, make_app, procs):
    server = private_server()
    bouncer = private_pooler(server)
    app = make_app(broker_url=bouncer.url, transport_options={"direct_url": server.url},
                   conf=beat_conf({"tick": ("mark", 1.0, ("beat-tick",))}))
    procs.worker(app, pool="solo", concurrency=1)
    beat = start_beat(procs, app, "beat")
    wait_log(beat, "is now the leader")
    env.wait_runs(3, "beat-tick", timeout=30, what="three periodic tasks sent by beat")
    rows = on_server(server, sql.SQL("SELECT entry, task_id FROM {} ORDER BY scheduled_at").format(
        broker_table(env, "beat_ticks")))
    assert len(rows) >= 3 and {entry for entry, _ in rows} == {"tick"}
    assert {run["task_id"] for run in env.runs("beat-tick")} <= {task_id for _, task_id in rows}
    assert "Traceback" not in beat.log() and "lost" not in beat.log()
    listed = kombu_pg(procs, bouncer.url, env, "beat", "list")  # the schedule, through the pooler
    assert "tick" in listed.stdout


@pytest.mark.timeout(120)
def test_beat_without_a_direct_url_says_so_in_one_line(private_server, private_pooler, env, make_app, procs):
    server = private_server()
    bouncer = private_pooler(server)
    app = make_app(broker_url=bouncer.url, conf=beat_conf({"tick": ("mark", 1.0, ("beat-tick",))}))
    beat = start_beat(procs, app, "beat")
    assert beat.wait_exit(60) != 0
    log = beat.log()
    [line] = [line for line in log.splitlines() if "cannot use the broker" in line]
    assert "needs a database session of its own" in line and "direct_url" in line, line
    assert "Traceback" not in log, log


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_twenty_workers_stay_within_the_pool_of_pgbouncer(private_server, private_pooler, env, make_app, procs):
    """The server connections of 20 workers behind PgBouncer: at most its pool size."""
    server = private_server()
    bouncer = private_pooler(server, pool_size=5)
    app = make_app(broker_url=bouncer.url, transport_options={"pooler": "transaction", "polling_interval": 0.5})
    workers = [procs.worker(app, name=f"w{i}", pool="solo", concurrency=1, wait=False) for i in range(20)]
    for worker in workers:
        worker.wait_ready(timeout=240)

    most, stop = [0], threading.Event()

    def sample():  # client backends on the server, but for these samples of our own
        with psycopg.connect(server.url, autocommit=True, application_name="kp_pooler_probe") as conn:
            while not stop.is_set():
                count = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                                     " AND application_name <> 'kp_pooler_probe'").fetchone()[0]
                most[0] = max(most[0], count)
                stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ids = [app.mark.delay("budget").id for _ in range(400)]
        wait_for(lambda: len(env.runs("budget")) >= 400, 240,
                 what=lambda: f"400 runs (have {len(env.runs('budget'))})")
        clients = sum(pool["cl_active"] + pool["cl_waiting"] for pool in bouncer.show("pools")
                      if pool["database"] == "postgres")
    finally:
        stop.set()
        sampler.join(10)
    assert_each_ran_once(env, "budget", ids)
    hosts = {run["hostname"] for run in env.runs("budget")}
    assert len(hosts) > 1, hosts  # the tasks were spread over the workers
    assert clients >= 20, clients  # every worker holds at least one connection to the pooler
    assert 0 < most[0] <= bouncer.pool_size, most[0]
