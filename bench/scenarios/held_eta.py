"""held_eta: N tasks with countdown=3600 sent to a running worker; who holds them, at what cost.

Brokers without ETA support deliver countdown tasks at once and the worker keeps them in memory
until due; kombu-pg keeps them as invisible rows. We measure the worker main process's resident
memory (psutil RSS) before publishing and once the worker has taken in all it will (the
count of received tasks and the broker's backlog have stopped changing), and the broker's state.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import psutil

from .. import procs
from .celery_e2e import send_tasks

NAME = "held_eta"
KINDS = None
# settle: seconds without change that count as "taken in all it will"; max_wait bounds the wait
# (a RabbitMQ worker raises its prefetch by one per ETA task, and takes them in slowly).
PARAMS = {"quick": {"n": 5000, "countdown": 3600, "settle": 5.0, "max_wait": 30},
          "full": {"n": 100000, "countdown": 3600, "settle": 10.0, "max_wait": 180}}
MB = 1024 * 1024


def run(env, p) -> dict:
    queue = env.queue("eta")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, \
            procs.worker(env.endpoint, queue, "prefork", 2, Path(tmp), name=f"bench-{env.tag}-eta") as worker:
        worker.wait_ready()
        process = psutil.Process(worker.pid)
        time.sleep(1)  # let start-up allocations settle
        rss_before = process.memory_info().rss
        within = 120 + p["n"] / 50
        sent = procs.call(send_tasks, env.endpoint, queue, p["n"], countdown=p["countdown"], timeout=within)
        waited = time.monotonic()
        received, state, settled = wait_settled(env, queue, worker, p["n"], p["settle"], p["max_wait"])
        waited = time.monotonic() - waited
        rss_after = process.memory_info().rss
    return {"rss_before_mb": rss_before / MB, "rss_growth_mb": (rss_after - rss_before) / MB,
            "held_by_worker": received, "publish_per_s": p["n"] / (sent["end"] - sent["start"]),
            "settled": int(settled), "waited_s": waited,
            **{f"broker_{key}": value for key, value in state.items()}}


def wait_settled(env, queue, worker, n, settle, max_wait):
    """Wait until the worker received all ``n`` tasks, or no count changed for ``settle`` s
    (settled), or ``max_wait`` s passed (not settled)."""
    deadline = time.monotonic() + max_wait
    last, since = None, time.monotonic()
    while True:
        received = worker.recv_file.stat().st_size if worker.recv_file.exists() else 0
        state = env.state(queue)
        counts = (received, {k: v for k, v in state.items() if not k.endswith("bytes")})
        now = time.monotonic()
        if counts != last:
            last, since = counts, now
        if received >= n or now - since >= settle or now > deadline:
            if received >= n:
                time.sleep(min(settle, 3))  # the last ones received are still being scheduled
                state = env.state(queue)
            return received, state, now <= deadline
        time.sleep(0.5)
