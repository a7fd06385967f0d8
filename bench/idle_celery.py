"""What idle Celery workers cost the PostgreSQL server, with mingle and gossip as they run.

    python -m bench.idle_celery [--workers 20] [--settle 45] [--window 120] [--without-gossip]

Starts a PostgreSQL server of its own with stock settings (kombu_pg.testing.server), measures
its transactions and CPU time over ``--window`` seconds with no worker, then starts
``--workers`` Celery workers (solo pool: the pool costs the broker nothing while idle), waits
until every one listens, lets them settle (the safety-net poll backs off to
max_polling_interval) and measures again. With gossip (the default for workers on this
broker), every worker's heartbeat (every 10 s on this broker) reaches every worker's gossip
queue as a notification (kombu_pg/broadcasts.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from .scenarios.idle import measure

APP = '''
from celery import Celery
app = Celery("idle", broker={url!r})
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--settle", type=float, default=45)
    parser.add_argument("--window", type=float, default=120)
    parser.add_argument("--without-gossip", action="store_true", help="start the workers with "
                        "--without-gossip --without-mingle")
    args = parser.parse_args()

    from kombu_pg.testing.server import PrivateServer

    server = PrivateServer(max_connections=4 * args.workers + 50)
    workdir = Path(tempfile.mkdtemp(prefix="bench_idle_celery_"))
    (workdir / "idle_app.py").write_text(APP.format(url=server.url))
    celery = str(Path(sys.executable).with_name("celery"))
    extra = ["--without-gossip", "--without-mingle"] if args.without_gossip else []
    procs = []
    try:
        with psycopg.connect(server.url, autocommit=True, application_name="bench_idle") as conn:
            baseline, baseline_cpu = measure(conn, server, args.window)
            for n in range(args.workers):
                log = open(workdir / f"w{n}.log", "wb")
                procs.append(subprocess.Popen(
                    [celery, "-A", "idle_app", "worker", "-P", "solo", "-n", f"idle{n}@bench", "-l", "INFO",
                     *extra], cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))
            deadline = time.monotonic() + 180
            while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'"
                               ).fetchone()[0] < args.workers:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    sys.exit(f"bench.idle_celery: the workers did not all start listening (logs in {workdir})")
                time.sleep(0.5)
            time.sleep(args.settle)
            idle, idle_cpu = measure(conn, server, args.window)
            backends = conn.execute("SELECT count(*) FROM pg_stat_activity"
                                    " WHERE backend_type = 'client backend'").fetchone()[0]
            gossip_queues = conn.execute("SELECT count(*) FROM kombu_pg.queues WHERE name LIKE 'celeryev.%'"
                                         ).fetchone()[0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    cost = idle - baseline
    print(f"{args.workers} idle Celery workers (solo), gossip and mingle "
          f"{'off' if args.without_gossip else 'on'} ({gossip_queues} gossip queues), {backends} server "
          f"sessions, {args.window:g} s window after {args.settle:g} s settling")
    print(f"server transactions/s: {baseline:.2f} without workers, {idle:.2f} with: "
          f"{cost:.2f} ({cost / args.workers:.3f} per worker)")
    print(f"server CPU: {baseline_cpu:.2%} of a core without workers, {idle_cpu:.2%} with: "
          f"{idle_cpu - baseline_cpu:.2%} of a core for {args.workers} idle workers")


if __name__ == "__main__":
    main()
