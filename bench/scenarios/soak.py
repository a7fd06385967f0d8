"""soak: a steady rate of Celery tasks for minutes; does the broker keep up, and what piles up?

Per broker, first the burst capacity of one worker (prefork -c 2, no-op task): `burst_n` tasks
sent as fast as one process can, tasks/s from the first publish to the last task start, as in
celery_e2e (`burst_tasks_per_s`). Then a paced publisher process offers a fixed rate for
`minutes` into a fresh worker of the same kind: `fraction` of kombu-pg's burst capacity, the
same absolute rate for every broker, so that all carry the same load (`offered_per_s`; a broker
measured before any kombu-pg run gets `fraction` of its own capacity; `rate` sets it outright).

Per window of `window` seconds: offered and consumed rate (tasks published, tasks started in the
window), backlog at its end (published, not yet started), p50/p99 publish-to-start latency of
the tasks started in it; for kombu-pg also the `messages` table's size with its indexes
(pg_total_relation_size), its dead tuples (n_dead_tup), the share of its row updates that were
HOT (n_tup_hot_upd / n_tup_upd over the window) and autovacuum's passes over it. Summary:
`min_consumed_ratio` (the lowest consumed/offered of any window), `max_p99_ms` (the highest
window p99), `max_backlog`; after the last window the backlog drains (at most `drain` s), then
`final_backlog`, `final_table_mb`, `final_dead_tuples`, `table_updates` and `hot_ratio` (over the
whole soak), `autovacuum_runs`. The per-window series are plotted below.

kombu-pg's soak runs on a PostgreSQL server the bench starts itself (initdb, stock settings:
autovacuum on, fsync on; version and settings in the machine table), not on the server given
with --broker: what a long run leaves behind depends on autovacuum, which CI and shared servers
often turn off.

It takes about `minutes` + 1 minutes per broker and repetition: run it on its own, e.g.
`python -m bench.run --scenario soak --repeat 1 --merge`.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import struct
import tempfile
import time
from pathlib import Path

from psycopg import sql

from .. import brokers, celery_app, messaging, procs, stats
from .celery_e2e import send_tasks

NAME = "soak"
KINDS = {"kombu-pg", "redis", "rabbitmq"}
PARAMS = {"quick": {"burst_n": 1000, "fraction": 0.6, "rate": None, "minutes": 1, "window": 10,
                    "drain": 30},
          "full": {"burst_n": 10000, "fraction": 0.6, "rate": None, "minutes": 10, "window": 60,
                   "drain": 120}}
MB = 1024 * 1024
SENT = struct.Struct("<d")  # the publisher appends each task's publish time to a file
SETTINGS = ("server_version", "autovacuum", "fsync", "synchronous_commit", "full_page_writes",
            "wal_sync_method", "shared_buffers", "max_wal_size", "checkpoint_timeout",
            "autovacuum_naptime", "autovacuum_vacuum_scale_factor",
            "autovacuum_vacuum_insert_scale_factor", "autovacuum_vacuum_cost_limit")
TABLE_STATS = sql.SQL(
    "SELECT pg_total_relation_size(relid), n_dead_tup, n_live_tup, n_tup_upd, n_tup_hot_upd,"
    " autovacuum_count FROM pg_stat_user_tables WHERE relid = %s::regclass")

#: kombu-pg's latest burst capacity: the rate offered to the brokers measured after it.
_reference_capacity: dict[str, float] = {}


def run(env, p):
    with contextlib.ExitStack() as stack:
        details = {}
        if env.kind == "kombu-pg":
            broker, details["server"] = stack.enter_context(stock_server(env.broker.name))
            with broker.session() as burst_env:  # its own schema: the soak starts on an empty table
                capacity = burst(burst_env, p["burst_n"])
            soak_env = stack.enter_context(broker.session())
            details["server"]["messages_reloptions"] = reloptions(soak_env)
        else:
            capacity = burst(env, p["burst_n"])
            soak_env = env
        rate, details["rate_basis"] = offered_rate(env.broker.name, capacity, p)
        print(f"    {env.broker.name}: burst {capacity:.0f} tasks/s; offering {rate:.0f} tasks/s "
              f"({details['rate_basis']}) for {p['minutes']} min", flush=True)
        windows, final = soak(soak_env, p, rate)
    details.update(windows=windows, final=final)
    metrics = {"burst_tasks_per_s": capacity, "offered_per_s": rate,
               "min_consumed_ratio": min(w["consumed_per_s"] / w["offered_per_s"]
                                         for w in windows if w["offered_per_s"]),
               "max_p50_ms": max(w["p50_ms"] or float("inf") for w in windows),
               "max_p99_ms": max(w["p99_ms"] or float("inf") for w in windows),
               "max_backlog": max(w["backlog"] for w in windows), "final_backlog": final["backlog"]}
    if "table_mb" in final:
        metrics.update(final_table_mb=final["table_mb"], max_table_mb=max(w["table_mb"] for w in windows),
                       final_dead_tuples=final["dead_tuples"], table_updates=final["updates"],
                       autovacuum_runs=final["autovacuum_runs"])
        if final["hot_ratio"] is not None:
            metrics["hot_ratio"] = final["hot_ratio"]
    return metrics, details


@contextlib.contextmanager
def stock_server(name: str):
    """A broker on a PostgreSQL server of the bench's own, stock settings; stopped on exit."""
    try:
        from kombu_pg.testing.server import PrivateServer
    except ImportError as exc:  # pgserver ships the binaries
        raise RuntimeError(f"the soak starts its own PostgreSQL server ({exc}): "
                           "pip install 'kombu-pg[bench,embedded]'") from None
    server = PrivateServer()
    try:
        with brokers.pg_connect(server.url) as conn:
            info = {key: conn.execute(f"SHOW {key}").fetchone()[0] for key in SETTINGS}
        info["started_by"] = "the bench: initdb defaults (stock settings)"
        print(f"    {name}: soak on a PostgreSQL {info['server_version']} server started by the bench "
              f"with stock settings (autovacuum={info['autovacuum']}, fsync={info['fsync']}), "
              f"port {server.port}", flush=True)
        yield brokers.Broker(name, server.url), info
    finally:
        server.close()


def reloptions(env) -> list[str] | None:
    with env.sql() as conn:
        return conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                            (env.table().as_string(conn),)).fetchone()[0]


def offered_rate(name: str, capacity: float, p) -> tuple[float, str]:
    if name == brokers.REFERENCE:
        _reference_capacity["tasks_per_s"] = capacity
    if p["rate"]:
        return float(p["rate"]), "the rate parameter"
    if "tasks_per_s" in _reference_capacity:
        return p["fraction"] * _reference_capacity["tasks_per_s"], \
            f"{p['fraction']:.0%} of {brokers.REFERENCE}'s burst capacity"
    return p["fraction"] * capacity, f"{p['fraction']:.0%} of its own burst capacity " \
        f"(no {brokers.REFERENCE} run before it)"


def burst(env, n: int) -> float:
    """Tasks/s of one prefork -c 2 worker while one process publishes ``n`` as fast as it can."""
    queue = env.queue("burst")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, \
            procs.worker(env.endpoint, queue, "prefork", 2, Path(tmp), name=f"bench-{env.tag}-burst") as worker:
        worker.wait_ready()
        within = 60 + n / 20
        sent = procs.call(send_tasks, env.endpoint, queue, n, timeout=within)
        worker.wait_started(n, within)
        last_start = max(started for _, started in celery_app.read_records(worker.done_file))
    return n / (last_start - sent["start"])


def publish_paced(endpoint, queue: str, n: int, rate: float, sent_file: Path, ready, go) -> dict:
    """Publisher process: ``n`` tasks at ``rate``/s (catching up when behind) through Celery's
    send path; appends each publish time to ``sent_file``."""
    app = celery_app.make_app(endpoint.url, endpoint.transport_options, queue)
    fd = os.open(sent_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)  # connecting is not publishing
            ready.set()
            go.wait()
            start = time.time()
            for _ in messaging.paced(n, rate):
                sent = time.time()
                app.send_task(celery_app.TASK, args=(sent,), producer=producer)
                os.write(fd, SENT.pack(sent))
    finally:
        os.close(fd)
    return {"start": start, "end": time.time()}


def soak(env, p, rate: float) -> tuple[list[dict], dict]:
    queue = env.queue("soak")
    width, seconds = p["window"], p["minutes"] * 60
    count, n = round(seconds / width), round(rate * seconds)
    with contextlib.ExitStack() as stack:
        table = stack.enter_context(TableStats(env)) if env.kind == "kombu-pg" else None
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        worker = stack.enter_context(procs.worker(env.endpoint, queue, "prefork", 2, tmp,
                                                  name=f"bench-{env.tag}-soak"))
        worker.wait_ready()
        sent_file = tmp / "sent"
        ready, go = procs.CTX.Event(), procs.CTX.Event()
        with procs.child(publish_paced, env.endpoint, queue, n, rate, sent_file, ready, go) as publisher:
            if not ready.wait(120):
                raise TimeoutError("the publisher was not connected within 120s")
            samples = [table.sample() if table else {}]
            go.set()
            clock = time.time()
            for k in range(1, count + 1):
                while time.time() < clock + k * width:
                    worker.started()  # raises if the worker died
                    time.sleep(min(0.5, max(0.0, clock + k * width - time.time())))
                samples.append(table.sample() if table else {})
                progress(env.broker.name, k * width, sent_file, worker, samples[-1])
            timing = publisher.result(seconds + 120)
        deadline = time.monotonic() + p["drain"]
        while worker.started() < n and time.monotonic() < deadline:
            time.sleep(0.2)
        if table:
            time.sleep(1.5)  # backends report table statistics about once a second
        last = table.sample() if table else {}
        records = celery_app.read_records(worker.done_file)
        sent_times = sorted(t for (t,) in SENT.iter_unpack(sent_file.read_bytes()))
    windows = series(timing["start"], width, count, sent_times, records, samples)
    return windows, {"backlog": len(sent_times) - len(records), **table_delta(samples[0], last)}


def progress(name: str, at: float, sent_file: Path, worker, sample: dict) -> None:
    sent = sent_file.stat().st_size // SENT.size if sent_file.exists() else 0
    started = worker.started()
    text = f"      {name} {at / 60:4.1f} min: published {sent}, started {started}"
    if sample:
        text += (f", messages {sample['bytes'] / MB:.1f} MB, {sample['dead']} dead tuples, "
                 f"autovacuum x{sample['autovacuums']}")
    print(text, flush=True)


def series(start: float, width: float, count: int, sent_times: list[float],
           records: list[tuple[float, float]], samples: list[dict]) -> list[dict]:
    """Per window: rates, backlog at its end, latencies of the tasks started in it, table stats."""
    latencies: list[list[float]] = [[] for _ in range(count)]
    for sent, started in records:
        k = int((started - start) // width)
        if 0 <= k < count:
            latencies[k].append((started - sent) * 1000)
    starts = sorted(started for _, started in records)
    windows = []
    for k in range(count):
        low, high = start + k * width, start + (k + 1) * width
        offered = bisect.bisect_left(sent_times, high) - bisect.bisect_left(sent_times, low)
        window = {"end_s": (k + 1) * width, "offered_per_s": offered / width,
                  "consumed_per_s": len(latencies[k]) / width,
                  "backlog": bisect.bisect_left(sent_times, high) - bisect.bisect_left(starts, high)}
        values = sorted(latencies[k])  # none when no task started: the consumed rate says so
        window.update(p50_ms=round(stats.quantile(values, 0.5), 3) if values else None,
                      p99_ms=round(stats.quantile(values, 0.99), 3) if values else None)
        window.update(table_delta(samples[k], samples[k + 1]))
        windows.append(window)
    return windows


class TableStats:
    """kombu-pg's `messages` table as the server's statistics see it, on one connection."""

    def __init__(self, env):
        self.env = env

    def __enter__(self):
        self.conn = self.env.sql()
        self.name = self.env.table().as_string(self.conn)
        return self

    def __exit__(self, *exc):
        self.conn.close()

    def sample(self) -> dict:
        size, dead, live, updates, hot, autovacuums = self.conn.execute(TABLE_STATS, (self.name,)).fetchone()
        return {"bytes": size, "dead": dead, "live": live, "updates": updates, "hot": hot,
                "autovacuums": autovacuums}


def table_delta(before: dict, after: dict) -> dict:
    """The table at the end of a stretch of time, and its updates and vacuums during it."""
    if not after:
        return {}
    updates = after["updates"] - before["updates"]
    return {"table_mb": round(after["bytes"] / MB, 3), "dead_tuples": after["dead"], "live_tuples": after["live"],
            "updates": updates, "hot_ratio": round((after["hot"] - before["hot"]) / updates, 4) if updates else None,
            "autovacuum_runs": after["autovacuums"] - before["autovacuums"]}
