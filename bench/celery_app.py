"""The Celery app of the benchmarks: one no-op task, the same settings for every broker.

How completions are counted: the task appends one 16-byte record (publish time, start time) to
a local file opened with O_APPEND (one write(2), atomic at this size, from any pool process),
and the harness counts records by the file's size. That costs every broker the same (about a
microsecond per task) and adds no traffic to the broker under test, unlike a result backend,
a counter in Redis or Celery events would.

The worker gets its settings from BENCH_* environment variables (see bench/procs.py).
"""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from celery import Celery, signals

RECORD = struct.Struct("<dd")  # sent (publisher's clock), started (worker's clock), time.time()
TASK = "bench.noop"

_fds: dict[tuple[int, str], int] = {}


def _append(name: str, data: bytes) -> None:
    key = (os.getpid(), name)  # per process: prefork children must not share the parent's fd
    fd = _fds.get(key)
    if fd is None:
        fd = _fds[key] = os.open(Path(os.environ["BENCH_WORKDIR"]) / name,
                                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, data)


def noop(sent: float) -> None:
    _append("done", RECORD.pack(sent, time.time()))


def make_app(url: str, transport_options: dict, queue: str) -> Celery:
    app = Celery("bench", broker=url, set_as_current=True)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=queue, task_default_exchange=queue, task_default_routing_key=queue,
        # kombu-pg acks late by default; all brokers do the same work per task.
        task_acks_late=True,
        # No result backend: throughput is the broker's, not a backend's.
        task_ignore_result=True,
        worker_prefetch_multiplier=4,  # Celery's default, stated so it is on record
    )
    app.task(name=TASK)(noop)
    return app


def read_records(path: Path) -> list[tuple[float, float]]:
    data = path.read_bytes() if path.exists() else b""
    return list(RECORD.iter_unpack(data[: len(data) - len(data) % RECORD.size]))


def count_records(path: Path) -> int:
    return path.stat().st_size // RECORD.size if path.exists() else 0


if "BENCH_BROKER_URL" in os.environ:  # the worker: `celery -A bench.celery_app worker`
    app = make_app(os.environ["BENCH_BROKER_URL"], json.loads(os.environ["BENCH_TRANSPORT_OPTIONS"]),
                   os.environ["BENCH_QUEUE"])

    @signals.worker_ready.connect
    def _ready(**kwargs):
        _append("ready", b"1")

    @signals.task_received.connect
    def _received(**kwargs):
        # In the worker's main process, for every message it takes in (ETA ones included):
        # tells how many countdown tasks the worker holds in memory.
        _append("received", b"r")
