"""Faults of the server under a consuming worker: killed connections, restarts, a frozen server.

The broker runs on a PostgreSQL server of the test's own (kombu_pg/testing/server.py), which the test
restarts, freezes and whose connections it kills; the tasks record each run in the test
database, which stays up. What must hold: no task lost, none run twice.

Faults are spread over the run by progress (after every few hundred tasks ran), not by time, so
each one hits a worker that is busy, whatever the speed of the machine.
"""
from __future__ import annotations

import datetime as dt
import re
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import wait_for

TASKS = 5000
VISIBILITY_TIMEOUT = 5  # short, so that a lease lost to a fault would show as a rerun soon


def publish(app, count: int, label: str) -> list[str]:
    return [app.mark.delay(label).id for _ in range(count)]


def run_count(env, label: str) -> int:
    return env.db.scalar(sql.SQL("SELECT count(*) FROM {}.runs WHERE label = %s").format(
        sql.Identifier(env.app_schema)), (label,))


def waiting_messages(server, env) -> int:
    with psycopg.connect(server.url, autocommit=True, application_name="kp_fault_harness") as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}.messages WHERE queue = 'celery'").format(
            sql.Identifier(env.broker_schema))).fetchone()[0]


def assert_each_ran_once(env, server, label: str, task_ids: list[str], maybe: set[str] = frozenset(),
                         settle: float = 2 * VISIBILITY_TIMEOUT):
    """Every task ran, none twice, and none comes back after its lease would have expired."""
    wait_for(lambda: run_count(env, label) >= len(task_ids), 240, interval=0.5,
             what=lambda: f"{len(task_ids)} runs (have {run_count(env, label)})")
    wait_for(lambda: waiting_messages(server, env) == 0, 60, interval=0.5, what="an empty queue")
    time.sleep(settle)  # a lost lease would have delivered its message again by now
    runs = env.db.query(sql.SQL("SELECT task_id, count(*) FROM {}.runs WHERE label = %s GROUP BY 1").format(
        sql.Identifier(env.app_schema)), (label,))
    counts = dict(runs)
    twice = {task_id: n for task_id, n in counts.items() if n > 1}
    lost = set(task_ids) - set(counts)
    unknown = set(counts) - set(task_ids) - set(maybe)
    assert not twice, f"{len(twice)} task(s) ran more than once: {list(twice.items())[:5]}"
    assert not lost, f"{len(lost)} task(s) never ran: {sorted(lost)[:5]}"
    assert not unknown, f"runs of tasks never published: {sorted(unknown)[:5]}"


def faulted_app(make_app, server, **options):
    return make_app(broker_url=server.url, visibility_timeout=VISIBILITY_TIMEOUT,
                    transport_options=options)


def run_with_faults(env, label: str, faults: list):
    """Call each fault once ``TASKS * (i + 1) / (len(faults) + 1)`` tasks have run."""
    for i, fault in enumerate(faults):
        mark = TASKS * (i + 1) // (len(faults) + 1)
        wait_for(lambda: run_count(env, label) >= mark, 120, interval=0.05,
                 what=lambda: f"{mark} runs before fault {i + 1} (have {run_count(env, label)})")
        fault()


POOLS = [("prefork", 2), ("threads", 4)]


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("pool,concurrency", POOLS)
def test_killed_connections_lose_and_duplicate_nothing(private_server, env, make_app, procs, pool, concurrency):
    server = private_server()
    app = faulted_app(make_app, server)
    task_ids = publish(app, TASKS, "killed")
    worker = procs.worker(app, pool=pool, concurrency=concurrency)
    killed = []
    run_with_faults(env, "killed", [lambda: killed.append(server.terminate_clients())] * 10)
    assert_each_ran_once(env, server, "killed", task_ids)
    assert all(killed), f"every round killed some of the worker's connections: {killed}"
    assert worker.alive()
    # The consumer noticed: its LISTEN connection comes back at once, without a consumer restart.
    assert re.search("LISTEN connection lost|Connection to broker lost", worker.log())


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("pool,concurrency", POOLS)
def test_server_restarts_lose_and_duplicate_nothing(private_server, env, make_app, procs, pool, concurrency):
    server = private_server()
    app = faulted_app(make_app, server)
    task_ids = publish(app, TASKS, "restarts")
    worker = procs.worker(app, pool=pool, concurrency=concurrency)
    run_with_faults(env, "restarts", [lambda: server.restart("fast"), lambda: server.restart("immediate")])
    assert_each_ran_once(env, server, "restarts", task_ids)
    assert worker.alive()
    # Each restart was noticed: by a consumer restart, or by the LISTEN connection's reconnect.
    assert len(re.findall("LISTEN connection lost|Connection to broker lost", worker.log())) >= 2


LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): WARNING/MainProcess\] "
                      r"consumer: Connection to broker lost", re.MULTILINE)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_frozen_server_is_reported_within_the_bound_and_nothing_runs_twice(private_server, env, make_app, procs):
    """SIGSTOP for 20 s, longer than the 10 s visibility timeout: the worker keeps its leases
    (renewed once the server answers again), producers fail fast instead of hanging."""
    server = private_server()
    # Outage noticed within statement_timeout + 2 s (the client-side deadline) + connect_timeout.
    app = make_app(broker_url=server.url, visibility_timeout=10,
                   transport_options={"statement_timeout": 2, "connect_timeout": 2})
    task_ids = publish(app, 1000, "frozen")
    worker = procs.worker(app, pool="prefork", concurrency=2)
    wait_for(lambda: run_count(env, "frozen") >= 200, 120, interval=0.05, what="200 runs")

    frozen_at = dt.datetime.now()
    server.freeze()
    try:
        started = time.monotonic()
        lost_id = str(uuid.uuid4())
        with pytest.raises(Exception) as failed:
            app.mark.apply_async(("frozen",), task_id=lost_id, retry=False)
        publish_failed_after = time.monotonic() - started
        reported = wait_for(lambda: LOG_TIME.findall(worker.log()), 15, interval=0.2,
                            what="the worker to report the lost connection")
        time.sleep(max(0.0, 20 - (time.monotonic() - started)))
    finally:
        server.thaw()
    assert publish_failed_after < 10, f"a publish to a frozen server blocked for {publish_failed_after:.1f}s"
    assert "unavailable" in str(failed.value), failed.value
    first_report = dt.datetime.strptime(reported[0], "%Y-%m-%d %H:%M:%S,%f")
    assert (first_report - frozen_at).total_seconds() < 12, "the worker noticed the frozen server too late"

    task_ids += publish(app, 200, "frozen")  # producers recover by themselves
    # The failed publish may have been stored all the same: its statement sat in the frozen
    # server's socket and ran when the server woke up (a publish whose commit is unknown).
    assert_each_ran_once(env, server, "frozen", task_ids, maybe={lost_id}, settle=20)
    assert worker.alive()
