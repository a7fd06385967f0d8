"""Failover to a synchronous standby under a consuming worker and a publishing producer.

The broker runs on a primary and a streaming standby of the test's own (synchronous replication:
every commit is on the standby before it returns). The broker URL names both hosts; the test takes
the primary away mid-run (stopped, or fenced: still up but read-only, as a failover manager leaves
it before demoting it) and promotes the standby. Tasks record each run in the test database,
which stays up. What must hold: nothing lost, nothing run twice, work resumes by itself.
"""
from __future__ import annotations

import time

import pytest
from psycopg import sql

from conftest import wait_for
from test_beat import beat_conf, start_beat
from test_faults import assert_each_ran_once, publish, run_count

TASKS = 1000
VISIBILITY_TIMEOUT = 10  # longer than the outage: leases held across it must stay the worker's
RESUME_BOUND = 30  # seconds from the promote until work goes on (20 runs) on the new primary


def both_hosts(primary, standby, form: str) -> str:
    """A URL naming both servers: libpq's host list, or a Kombu failover list (url1;url2), which
    leaves target_session_attrs=read-write to the transport's default for several hosts."""
    if form == "hosts":
        return (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
                "?target_session_attrs=read-write")
    return f"{primary.url};{standby.url}"


def fence(server) -> None:
    """What a failover manager does to a primary it demotes: every session turns read-only."""
    with server.connect() as conn:
        conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        conn.execute("SELECT pg_reload_conf()")


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("failure, form", [("stopped", "hosts"), ("fenced", "failover list")])
def test_worker_and_producer_follow_a_promoted_standby(private_server, env, make_app, procs, failure, form):
    primary = private_server()
    standby = private_server(standby_of=primary)
    app = make_app(broker_url=both_hosts(primary, standby, form), visibility_timeout=VISIBILITY_TIMEOUT,
                   conf=beat_conf({"tick": ("mark", 1, ["failover-beat"])}))
    task_ids = publish(app, TASKS, "failover")
    worker = procs.worker(app, pool="prefork", concurrency=2)
    beat = start_beat(procs, app, "beat")
    wait_for(lambda: run_count(env, "failover") >= TASKS * 3 // 10, 120, interval=0.05,
             what=lambda: f"{TASKS * 3 // 10} runs before the failover (have {run_count(env, 'failover')})")

    if failure == "stopped":
        primary.stop("immediate")
    else:
        fence(primary)
    time.sleep(2)  # a failover manager's decision time: the worker finds no primary meanwhile
    standby.promote()
    promoted_at = env.db.scalar("SELECT clock_timestamp()")

    task_ids += publish(app, 200, "failover")  # the producer follows by itself
    # More runs than the worker can hold prefetched (2 processes x 4): claimed from the new primary.
    resumed = sql.SQL("SELECT started_at - %s FROM {}.runs WHERE started_at > %s ORDER BY started_at"
                      " OFFSET 19 LIMIT 1").format(sql.Identifier(env.app_schema))
    delay = wait_for(lambda: env.db.scalar(resumed, (promoted_at, promoted_at)), 120, interval=0.2,
                     what="20 task runs after the promote")
    print(f"work resumed {delay.total_seconds():.1f} s after the promote")  # shown with -rP
    assert delay.total_seconds() < RESUME_BOUND, f"work resumed {delay} after the promote"
    assert_each_ran_once(env, standby, "failover", task_ids, settle=2 * VISIBILITY_TIMEOUT)
    ticks_since = sql.SQL("SELECT count(*) FROM {}.runs WHERE label = 'failover-beat' AND started_at > %s").format(
        sql.Identifier(env.app_schema))
    assert env.db.scalar(ticks_since, (promoted_at,)) >= 5, "beat did not carry on after the failover"
    assert worker.alive() and beat.alive()
    assert "Traceback" not in worker.log() + beat.log()
