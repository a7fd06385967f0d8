"""producers: 4 and 16 publisher processes sending Celery tasks at once into one worker.

Per pool (prefork -c 2, threads -c 8), one worker; for each number of producers, `n` no-op tasks
in all, split evenly, sent as fast as each process can through Celery's normal send path (one
held producer per process, as in celery_e2e). The producers connect first and are let go
together. Per case:
- tasks/s: `n` over the time from the first publish to the start of the last task;
- publish/s: `n` over the time from the first publish to the last one returning, all producers;
- publish latency p50/p99: the duration of each apply_async call, over all producers;
- CPU per task (ms), where the machine's two cores went: the producer processes (their own
  process time over the publish loop), the worker (main process and pool children), and the
  broker's server (PostgreSQL's postmaster and its children, beam.smp, redis-server), each
  summed from the first publish to the last start, processes that exited meanwhile included.
"""
from __future__ import annotations

import array
import contextlib
import tempfile
import time
from pathlib import Path

import psutil

from .. import brokers, celery_app, procs, stats

NAME = "producers"
KINDS = {"kombu-pg", "redis", "rabbitmq"}
PARAMS = {"quick": {"n": 800, "producers": [4, 16], "pools": {"prefork": 2, "threads": 8}},
          "full": {"n": 20000, "producers": [4, 16], "pools": {"prefork": 2, "threads": 8}}}


def send_timed(endpoint, queue: str, n: int, ready, go) -> dict:
    """Producer process: ``n`` tasks through apply_async; the duration of each call."""
    app = celery_app.make_app(endpoint.url, endpoint.transport_options, queue)
    task = app.tasks[celery_app.TASK]
    durations = array.array("d")
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)  # connecting is not publishing
        ready.set()
        go.wait()
        start, cpu = time.time(), time.process_time()
        for _ in range(n):
            began = time.perf_counter()
            task.apply_async(args=(time.time(),), producer=producer)
            durations.append(time.perf_counter() - began)
        end, cpu = time.time(), time.process_time() - cpu
    return {"start": start, "end": end, "cpu": cpu, "durations": durations.tobytes()}


def publish_together(endpoint, queue: str, n: int, producers: int, within: float) -> list[dict]:
    """``producers`` processes, ``n`` tasks in all; the clock starts once all are connected."""
    go = procs.CTX.Event()
    readies = [procs.CTX.Event() for _ in range(producers)]
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(procs.child(send_timed, endpoint, queue, share, ready, go))
                    for share, ready in zip(shares(n, producers), readies)]
        for ready in readies:
            if not ready.wait(120):
                raise TimeoutError("a producer was not connected within 120s")
        go.set()
        return [child.result(within) for child in children]


def shares(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


#: The broker's server process, by name (PostgreSQL's is found through a session of its own).
SERVER_PROCESS = {"redis": "redis-server", "rabbitmq": "beam.smp"}


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU time of ``root`` and its descendants so far, those that exited included: a process
    that ended was reaped by its parent, which adds its time to the parent's children times
    (PostgreSQL's backends of producers that disconnected, a worker's pool children)."""
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def server_root(env) -> psutil.Process:
    if env.kind == "kombu-pg":  # the postmaster: the parent of any of its sessions
        with brokers.pg_connect(env.broker.url) as conn:
            return psutil.Process(conn.info.backend_pid).parent()
    name = SERVER_PROCESS[env.kind]
    return next(process for process in psutil.process_iter(["name"]) if process.info["name"] == name)


def run(env, p) -> dict:
    metrics = {}
    for pool, concurrency in p["pools"].items():
        queue = env.queue(f"prod_{pool}")
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp, \
                procs.worker(env.endpoint, queue, pool, concurrency, Path(tmp),
                             name=f"bench-{env.tag}-{pool}") as worker:
            worker.wait_ready()
            done = 0
            for producers in p["producers"]:
                within = 60 + p["n"] / 20
                server, tree = server_root(env), psutil.Process(worker.pid)
                cpu_before = tree_cpu_seconds(server), tree_cpu_seconds(tree)
                sent = publish_together(env.endpoint, queue, p["n"], producers, within)
                done += p["n"]
                worker.wait_started(done, within)
                cpu_server, cpu_worker = (tree_cpu_seconds(server) - cpu_before[0],
                                          tree_cpu_seconds(tree) - cpu_before[1])
                starts = [started for _, started in celery_app.read_records(worker.done_file)[done - p["n"]:]]
                first = min(s["start"] for s in sent)
                durations = [d for s in sent for d in array.array("d", s["durations"])]
                key = f"{pool}.p{producers}"
                metrics[f"{key}.tasks_per_s"] = p["n"] / (max(starts) - first)
                metrics[f"{key}.publish_per_s"] = p["n"] / (max(s["end"] for s in sent) - first)
                latency = stats.latency_ms(durations, "publish")
                metrics[f"{key}.publish_p50_ms"] = latency["publish_p50_ms"]
                metrics[f"{key}.publish_p99_ms"] = latency["publish_p99_ms"]
                per_task_ms = 1000 / p["n"]
                metrics[f"{key}.cpu_ms_per_task_producers"] = sum(s["cpu"] for s in sent) * per_task_ms
                metrics[f"{key}.cpu_ms_per_task_worker"] = cpu_worker * per_task_ms
                metrics[f"{key}.cpu_ms_per_task_server"] = cpu_server * per_task_ms
    return metrics
