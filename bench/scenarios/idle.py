"""idle: what idle consumers cost the PostgreSQL server, in transactions and CPU time.

The scenario starts a PostgreSQL server of its own with stock settings (kombu_pg.testing.server),
then `consumers` plain Kombu consumers spread over `processes` processes, each consumer a
connection of its own (its own LISTEN session) consuming a shared queue and one of its own, as
a Celery worker consumes its task queue and its remote-control queue. After they settled for `settle`
seconds (the safety-net poll backs off to max_polling_interval), it measures over `window` seconds the
server's transactions (pg_stat_database, this database) and the CPU time of the server's
processes (postmaster, backends, background processes: utime + stime from /proc), against the
same measurement with no consumer running.
"""
from __future__ import annotations

import subprocess
import sys
import time

import psycopg

NAME = "idle"
KINDS = {"kombu-pg"}
PARAMS = {"quick": {"consumers": 20, "processes": 2, "settle": 10, "window": 20},
          "full": {"consumers": 200, "processes": 4, "settle": 45, "window": 120}}

CONSUMER = r'''
import sys, threading, kombu
url, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()

def consume(n):
    with kombu.Connection(url, transport_options={"schema": "bench_idle"}) as conn:
        queues = [kombu.Queue("idle"), kombu.Queue(f"idle.{n}")]
        with conn.Consumer(queues, callbacks=[lambda body, message: message.ack()]):
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass

threads = [threading.Thread(target=consume, args=(n,), daemon=True) for n in range(first, first + count)]
for thread in threads:
    thread.start()
sys.stdin.read()  # until the bench closes our stdin
stop.set()
for thread in threads:
    thread.join(10)
'''


def measure(conn, server, seconds: float) -> tuple[float, float]:
    """Server transactions per second and share of a core over ``seconds``."""
    def xacts():
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                            " WHERE datname = current_database()").fetchone()[0]

    before, cpu, started = xacts(), server.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    time.sleep(1.5)  # sessions report their statistics when idle, at most once a second
    elapsed = time.monotonic() - started - 1.5
    return (xacts() - before) / elapsed, (server.cpu_seconds() - cpu) / elapsed


def run(env, p):
    """Measured on a server of the scenario's own (``env``'s server is not used)."""
    from kombu_pg.testing.server import PrivateServer

    server = PrivateServer(max_connections=p["consumers"] + 50)
    procs = []
    try:
        with psycopg.connect(server.url, autocommit=True, application_name="bench_idle") as conn:
            info = {"server_version": conn.execute("SHOW server_version").fetchone()[0],
                    "started_by": "the bench: initdb defaults (stock settings)"}
            print(f"    {env.broker.name}: idle consumers on a PostgreSQL {info['server_version']} "
                  f"server started by the bench with stock settings, port {server.port}", flush=True)
            baseline, baseline_cpu = measure(conn, server, p["window"])
            per = -(-p["consumers"] // p["processes"])
            for first in range(0, p["consumers"], per):
                procs.append(subprocess.Popen([sys.executable, "-c", CONSUMER, server.url, str(first),
                                               str(min(per, p["consumers"] - first))],
                                              stdin=subprocess.PIPE, start_new_session=True))
            deadline = time.monotonic() + 120
            while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'"
                               ).fetchone()[0] < p["consumers"]:
                if time.monotonic() > deadline:
                    raise TimeoutError("the consumers did not all start listening within 120 s")
                time.sleep(0.5)
            time.sleep(p["settle"])
            idle, idle_cpu = measure(conn, server, p["window"])
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.close()
    metrics = {"consumers": p["consumers"],
               "server_tx_rate_per_consumer": (idle - baseline) / p["consumers"],
               "server_tx_rate": idle - baseline,
               "server_cpu_pct_of_core": 100 * (idle_cpu - baseline_cpu),
               "baseline_tx_rate": baseline,
               "baseline_cpu_pct_of_core": 100 * baseline_cpu}
    return metrics, {"server": info}
