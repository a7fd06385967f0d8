"""Idle workers are nearly free for the server, and a DBA can tell their connections apart.

With LISTEN working, an idle consumer's safety-net poll backs off to max_polling_interval (one
statement for all its queues, which also keeps them alive and elects the housekeeper); the
cluster-wide housekeeping runs in one elected process; Celery's heartbeat events, which no
queue takes unless a monitor runs, are not sent to the server again and again. What stays
bounded: a message whose worker died is handed to an idle worker soon after its lease expired
(the housekeeper returns it and wakes the queue), and housekeeping goes on when the process
running it is killed. Measured on a PostgreSQL server the test starts itself.
"""
from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conftest import console_script, dead_letters, unique, wait_for

IDLE_WORKERS = 5
SETTLE_SECONDS = 40  # the poll backs off 1, 2, 4, 8, 16 s, then stays at 30 s
WINDOW_SECONDS = 60
BASELINE_SECONDS = 30
#: The target: server transactions per second per idle worker, LISTEN working.
MAX_IDLE_XACTS_PER_WORKER = 0.2


def server_xacts(conn: psycopg.Connection) -> int:
    """Transactions the server committed or rolled back in this database so far (each call is
    one more, the same number in every window measured)."""
    return conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                        " WHERE datname = current_database()").fetchone()[0]


def server_cpu_seconds(server) -> float:
    """User and system CPU time of the server's processes (postmaster, backends, background
    workers; exited backends are not counted, and idle workers' sessions do not exit)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in server._server_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def rate(conn, server, seconds: float) -> tuple[float, float]:
    """Server transactions per second and CPU share of a core over ``seconds``."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    xacts, cpu, started = server_xacts(conn), server_cpu_seconds(server), time.monotonic()
    time.sleep(seconds)
    time.sleep(1.5)  # the sessions report their statistics when idle, at most once a second
    elapsed = time.monotonic() - started - 1.5
    return (server_xacts(conn) - xacts) / elapsed, (server_cpu_seconds(server) - cpu) / elapsed


def app_on(make_app, server, **transport_options):
    return make_app(broker_url=server.url, transport_options=transport_options)


def broker(server, env) -> psycopg.Connection:
    return psycopg.connect(server.url, autocommit=True, application_name="kp_test_harness")


@pytest.mark.slow
def test_idle_workers_cost_the_server_almost_nothing(make_app, private_server, procs, env):
    server = private_server()
    app = app_on(make_app, server)
    with broker(server, env) as conn:
        baseline, baseline_cpu = rate(conn, server, BASELINE_SECONDS)
        workers = [procs.worker(app, name=f"idle{i}", pool="prefork", concurrency=1, wait=False)
                   for i in range(IDLE_WORKERS)]
        for worker in workers:
            worker.wait_ready(120)
        # LISTEN works for every worker (else it would poll every polling_interval).
        listening = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE"
                                 " 'kombu-pg listen idle%%' AND query LIKE 'LISTEN %%'").fetchone()[0]
        assert listening == IDLE_WORKERS, listening
        time.sleep(SETTLE_SECONDS)
        busy, busy_cpu = rate(conn, server, WINDOW_SECONDS)
    per_worker = (busy - baseline) / IDLE_WORKERS
    print(f"\nserver transactions/s: {baseline:.3f} without workers, {busy:.3f} with {IDLE_WORKERS} idle "
          f"workers: {per_worker:.3f} per worker; server CPU: {baseline_cpu:.2%} of a core without, "
          f"{busy_cpu:.2%} with")
    assert per_worker <= MAX_IDLE_XACTS_PER_WORKER, f"{per_worker:.3f} transactions/s per idle worker"
    # They were idle, not gone: each one still takes work.
    results = [app.add.delay(i, i) for i in range(IDLE_WORKERS * 2)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(IDLE_WORKERS * 2)]
