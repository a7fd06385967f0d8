"""What idle consumers cost the PostgreSQL server: transactions and CPU time.

    python -m bench.idle [--consumers 200] [--processes 4] [--settle 45] [--window 120]

Starts a PostgreSQL server of its own with stock settings (kombu_pg.testing.server), then
``--consumers`` plain Kombu consumers spread over ``--processes`` processes, each consumer a
connection of its own (its own LISTEN session) consuming a shared queue and one of its own, as
a Celery worker consumes its task queue and its remote-control queue. After they settled (the
safety-net poll backs off to max_polling_interval), it measures over ``--window`` seconds the
server's transactions (pg_stat_database, this database) and the CPU time of the server's
processes (postmaster, backends, background processes: utime + stime from /proc), against the
same measurement with no consumer running.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psycopg

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consumers", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--settle", type=float, default=45)
    parser.add_argument("--window", type=float, default=120)
    args = parser.parse_args()

    from kombu_pg.testing.server import PrivateServer

    server = PrivateServer(max_connections=args.consumers + 50)
    procs = []
    try:
        with psycopg.connect(server.url, autocommit=True, application_name="bench_idle") as conn:
            baseline, baseline_cpu = measure(conn, server, args.window)
            per = -(-args.consumers // args.processes)
            for first in range(0, args.consumers, per):
                procs.append(subprocess.Popen([sys.executable, "-c", CONSUMER, server.url, str(first),
                                               str(min(per, args.consumers - first))],
                                              stdin=subprocess.PIPE, start_new_session=True))
            deadline = time.monotonic() + 120
            while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'"
                               ).fetchone()[0] < args.consumers:
                if time.monotonic() > deadline:
                    sys.exit("bench.idle: the consumers did not all start listening within 120 s")
                time.sleep(0.5)
            time.sleep(args.settle)
            idle, idle_cpu = measure(conn, server, args.window)
            backends = conn.execute("SELECT count(*) FROM pg_stat_activity"
                                    " WHERE backend_type = 'client backend'").fetchone()[0]
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.close()
    cost = idle - baseline
    print(f"{args.consumers} idle Kombu consumers in {args.processes} processes, {backends} server sessions, "
          f"{args.window:g} s window after {args.settle:g} s settling")
    print(f"server transactions/s: {baseline:.2f} without consumers, {idle:.2f} with: "
          f"{cost:.2f} ({cost / args.consumers:.3f} per consumer)")
    print(f"server CPU: {baseline_cpu:.2%} of a core without consumers, {idle_cpu:.2%} with: "
          f"{idle_cpu - baseline_cpu:.2%} of a core for {args.consumers} idle consumers")


if __name__ == "__main__":
    main()
