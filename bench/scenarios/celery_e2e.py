"""celery_e2e: no-op tasks through a real `celery worker` (prefork -c 2, solo, threads -c 2).

Per pool, two phases against the same running worker:
- burst: one process sends N tasks as fast as it can while the worker consumes; tasks/s is N
  over the time from the first publish to the start of the last task (the task body is empty);
- paced: M tasks at a low fixed rate; publish-to-start latency of each task (its argument is
  the publish time, the worker records when it started), for a worker that is mostly idle.
Completions are counted with a local file, not the broker (see bench/celery_app.py).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import celery_app, messaging, procs, stats

NAME = "celery_e2e"
KINDS = None
POOLS = {"prefork": 2, "solo": 1, "threads": 2}
PARAMS = {"quick": {"n": 300, "paced_n": 50, "paced_rate": 50, "pools": list(POOLS)},
          "full": {"n": 10000, "paced_n": 500, "paced_rate": 50, "pools": list(POOLS)}}


def send_tasks(endpoint, queue: str, n: int, rate: float | None = None,
               countdown: float | None = None) -> dict:
    """Publisher process: ``n`` tasks through Celery's normal send path."""
    app = celery_app.make_app(endpoint.url, endpoint.transport_options, queue)
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)  # connecting is not publishing
        start = time.time()
        for _ in messaging.paced(n, rate):
            app.send_task(celery_app.TASK, args=(time.time(),), countdown=countdown, producer=producer)
        end = time.time()
    return {"start": start, "end": end, "n": n}


def run(env, p) -> dict:
    metrics = {}
    for pool in p["pools"]:
        queue = env.queue(f"e2e_{pool}")
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp, \
                procs.worker(env.endpoint, queue, pool, POOLS[pool], Path(tmp),
                             name=f"bench-{env.tag}-{pool}") as worker:
            worker.wait_ready()
            within = 60 + p["n"] / 20

            def completed(count):
                def check():
                    if worker.proc.poll() is not None:
                        raise procs.ChildError(f"worker exited:\n{worker.log_tail()}")
                    return celery_app.count_records(worker.done_file) >= count
                return check

            sent = procs.call(send_tasks, env.endpoint, queue, p["n"], timeout=within)
            procs.wait_for(completed(p["n"]), within, f"{p['n']} tasks to run")
            records = celery_app.read_records(worker.done_file)
            last_start = max(started for _, started in records)
            metrics[f"{pool}.tasks_per_s"] = p["n"] / (last_start - sent["start"])
            metrics[f"{pool}.publish_per_s"] = p["n"] / (sent["end"] - sent["start"])

            procs.call(send_tasks, env.endpoint, queue, p["paced_n"], rate=p["paced_rate"], timeout=within)
            procs.wait_for(completed(p["n"] + p["paced_n"]), 60, f"{p['paced_n']} paced tasks to run")
            paced = celery_app.read_records(worker.done_file)[p["n"]:]
            metrics.update({f"{pool}.{k}": v for k, v in
                            stats.latency_ms([started - sent for sent, started in paced], "start").items()})
    return metrics
