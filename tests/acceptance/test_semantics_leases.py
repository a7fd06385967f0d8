"""Delivery semantics of leases: long tasks run once, killed workers' tasks come back, expired
leases at the delivery cap are reaped to the dead letters, and ``kombu-pg stats`` counts them.

Everything goes through the public path: a Celery app configured by its broker URL only, real
worker subprocesses, plain Kombu consumers in subprocesses, and the ``kombu-pg`` command line.
"""
from __future__ import annotations

import datetime as dt
import json

import kombu
import pytest

from conftest import PY, assert_automatic, console_script, dead_letters, wait_for, write_script





# --- 1. a task much longer than the visibility timeout runs exactly once ------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_task_ten_times_the_visibility_timeout_runs_once(make_app, procs, env, pool):
    visibility_timeout, seconds = 1.5, 15
    app = make_app(visibility_timeout=visibility_timeout)
    worker = procs.worker(app, pool=pool, concurrency=1)
    result = app.sleepy.delay("long", seconds)

    # While it runs: one lease (one token), one delivery, always invisible to other consumers.
    tokens, counts = set(), set()

    def done():
        for row in env.messages("celery"):
            if row["lease_token"] is not None:
                tokens.add(row["lease_token"])
                counts.add(row["delivery_count"])
                assert row["invisible"], "a held lease lapsed: the message was visible again"
        return result.ready()

    wait_for(done, seconds + 20, interval=0.2, what="the long task to finish")
    assert result.get(timeout=5) == "long"
    runs = env.runs("long")
    assert len(runs) == 1, runs
    assert runs[0]["redelivered"] is False
    assert len(tokens) == 1, f"the message was leased {len(tokens)} times"
    assert counts == {1}, counts
    wait_for(lambda: env.message_count() == 0, 10, what="the message to be acked")
    assert dead_letters(env) == []
    log = worker.log()
    assert "redelivered message" not in log and "lost the lease" not in log
    assert_automatic(app, worker)


# --- 2. kill -9 of the worker's main process mid-task ------------------------------------------

@pytest.mark.slow
def test_sigkill_of_worker_main_process_mid_task_another_worker_finishes(make_app, procs, env):
    app = make_app(visibility_timeout=2)
    w1 = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    slow = app.slow_first_time.delay("slow", 120)  # sleeps only on its first delivery
    others = [app.add.delay(i, 100) for i in range(3)]  # prefetched behind it by w1
    wait_for(lambda: env.runs("slow"), 20, what="w1 to start the slow task")
    wait_for(lambda: sum(r["lease_token"] is not None for r in env.messages("celery")) >= 2, 20,
             what="w1 to prefetch an add task behind the slow one")
    w1.kill9()
    held_by_w1 = {r["task_id"] for r in env.messages("celery") if r["lease_token"] is not None}
    assert slow.id in held_by_w1
    assert not slow.ready()

    w2 = procs.worker(app, name="w2", pool="solo", concurrency=1)
    assert slow.get(timeout=30) == "slow"
    assert [r.get(timeout=30) for r in others] == [100, 101, 102]

    slow_runs = env.runs("slow")
    assert [(r["hostname"], r["redelivered"]) for r in slow_runs] == [(w1.hostname, False), (w2.hostname, True)]
    add_runs = env.runs("add")
    assert sorted(r["task_id"] for r in add_runs) == sorted(r.id for r in others), "each add exactly once"
    assert all(r["hostname"] == w2.hostname for r in add_runs), add_runs
    # Those w1 held come back flagged as redelivered; any it had not taken yet are first deliveries.
    assert {r["task_id"]: r["redelivered"] for r in add_runs} == {r.id: r.id in held_by_w1 for r in others}
    wait_for(lambda: env.message_count() == 0, 10, what="every message to be acked")
    assert dead_letters(env) == []
    assert_automatic(app, w1, w2)


# --- expired leases at the delivery cap go to the dead letters (reason lease_expired) ----------

HOLDER = """\
import json, sys, time
import kombu

url, options = sys.argv[1], json.loads(sys.argv[2])
conn = kombu.Connection(url, transport_options=options)
queue = conn.SimpleQueue("reapq")
message = queue.get(timeout=30)  # taken, never acked: the process is SIGKILLed holding it
info = message.delivery_info
print("GOT", info["kombu_pg"]["delivery_count"], info["redelivered"], json.dumps(message.payload), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_expired_lease_at_max_attempts_is_reaped_to_dead_letters(env, procs, kombu_conn, tmp_path):
    options = dict(env.transport_options, visibility_timeout=2, max_attempts=2, sweep_interval=0.5)
    script = write_script(tmp_path, "holder.py", HOLDER)
    publisher = kombu_conn(**options)

    def state():
        return [{k: row[k] for k in ("id", "lease_token", "delivery_count", "invisible", "errors")}
                for row in env.messages()]

    publisher.SimpleQueue("reapq").put({"n": 1})

    for attempt in (1, 2):
        holder = procs.spawn([PY, str(script), env.url, json.dumps(options)], name=f"holder{attempt}")
        line = wait_for(lambda: next((l for l in holder.log().splitlines() if l.startswith("GOT")), None),
                        30, what=lambda: f"holder {attempt} to take the message; rows: {state()}")
        assert line == f'GOT {attempt} {attempt > 1} {{"n": 1}}', line
        holder.kill9()

    # Expired at its cap: no consumer may take it again; the reaper of a consumer moves it.
    reaper = kombu_conn(**options)
    simple = reaper.SimpleQueue("reapq")

    def reaped():
        try:
            message = simple.get(timeout=0.3)
        except simple.Empty:
            return dead_letters(env)
        raise AssertionError(f"a message at its delivery cap was delivered again: {message.payload}")

    [letter] = wait_for(reaped, 20, interval=0.05,
                        what=lambda: f"the expired lease to be dead-lettered; rows: {state()}")
    assert letter["reason"] == "lease_expired"
    assert letter["queue"] == "reapq"
    assert letter["attempts"] == 2 and letter["max_attempts"] == 2
    assert letter["errors"] and letter["errors"][-1]["type"] == "LeaseExpired"
    assert json.loads(letter["payload"])["body"]  # the original message is kept
    assert env.message_count() == 0


# --- kombu-pg stats -----------------------------------------------------------------------------

def test_stats_counts_ready_delayed_leased_and_dead_letters(env, procs, kombu_conn):
    conn = kombu_conn(visibility_timeout=60)
    exchange = kombu.Exchange("statx", type="direct")
    queue = kombu.Queue("statq", exchange, routing_key="statq")
    producer = kombu.Producer(conn, exchange=exchange, routing_key="statq")
    producer.declare()
    queue(conn.default_channel).declare()
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    for i in range(5):
        producer.publish({"i": i})
    for i in range(2):
        producer.publish({"later": i}, headers={"eta": later})  # delayed until then
    bound = queue(conn.default_channel)
    held = bound.get()  # leased by this connection (renewed while held)
    rejected = bound.get()
    rejected.reject(requeue=False)  # -> dead letters, reason "rejected"
    assert held is not None and rejected is not None
    # Now: 3 ready, 2 delayed, 1 leased, 1 dead letter.

    kombu_pg = console_script("kombu-pg")
    out = procs.run([kombu_pg, "--url", env.url, "--schema", env.broker_schema, "stats", "--json"])
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    [stat] = [q for q in data["queues"] if q["queue"] == "statq"]
    assert (stat["ready"], stat["delayed"], stat["leased"]) == (3, 2, 1), stat
    assert stat["oldest_ready_age_s"] is not None and stat["oldest_ready_age_s"] >= 0
    assert data["dead_letters"] == [{"queue": "statq", "reason": "rejected", "count": 1}]

    table = procs.run([kombu_pg, "--url", env.url, "--schema", env.broker_schema, "stats"])
    assert table.returncode == 0, table.stderr
    queues_section = table.stdout.split("DEAD LETTERS")[0]
    [row] = [line.split() for line in queues_section.splitlines() if line.startswith("statq ")]
    assert row[1:4] == ["3", "2", "1"], table.stdout
    assert any(line.split() == ["statq", "rejected", "1"] for line in table.stdout.splitlines()), table.stdout

    held.ack()
    out = procs.run([kombu_pg, "--url", env.url, "--schema", env.broker_schema, "stats", "--json"])
    [stat] = [q for q in json.loads(out.stdout)["queues"] if q["queue"] == "statq"]
    assert (stat["ready"], stat["delayed"], stat["leased"]) == (3, 2, 0), stat
