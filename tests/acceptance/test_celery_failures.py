"""Failures: a worker killed with SIGKILL, database connections terminated mid-run."""
from __future__ import annotations

import collections
import json

import pytest

from conftest import dead_letters, unique, wait_for

TIME_LIMITED = '''
@app.task(bind=True, time_limit=1, max_attempts=2)
def stuck(self, label):
    record(self, label)
    time.sleep(30)
'''


def task_id_of(row) -> str:
    return json.loads(row["payload"])["headers"]["id"]


@pytest.mark.slow
def test_sigkilled_worker_leases_are_redelivered(make_app, procs, env):
    """Kill -9 a worker holding leased messages: another worker gets every one, redelivered."""
    app = make_app(visibility_timeout=2)
    count = 4
    # prefork -c 1 prefetches up to 4 (the default multiplier): one runs (and sleeps), others wait.
    w1 = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    results = [app.slow_on.delay(f"job{i}", w1.hostname, 60) for i in range(count)]
    ids = {r.id for r in results}

    def leased_by_w1() -> set[str]:
        leased = {task_id_of(r) for r in env.messages("celery") if r["lease_token"] is not None}
        return leased if len(leased) >= 2 else set()  # the running task and a prefetched one

    wait_for(lambda: [r for r in env.runs() if r["hostname"] == w1.hostname], 20, what="w1 to start a task")
    wait_for(leased_by_w1, 20, what="w1 to hold a prefetched message too")
    w1.kill9()  # the main process only; its pool child is orphaned (reaped at teardown)
    held = {task_id_of(r) for r in env.messages("celery") if r["lease_token"] is not None}
    [running] = [r["task_id"] for r in env.runs() if r["hostname"] == w1.hostname]
    assert running in held and len(held) >= 2

    w2 = procs.worker(app, name="w2", pool="prefork", concurrency=2)
    for r in results:
        r.get(timeout=30)
    runs_w2 = [r for r in env.runs() if r["hostname"] == w2.hostname]
    assert sorted(r["task_id"] for r in runs_w2) == sorted(ids), "each message exactly once on w2"
    # Every message w1 held comes back marked redelivered (the others were never delivered).
    redelivered = {r["task_id"] for r in runs_w2 if r["redelivered"]}
    assert redelivered == held, runs_w2
    env.wait_count("celery", 0)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_terminated_connections_lose_and_duplicate_nothing(make_app, procs, env, pool):
    """pg_terminate_backend on the worker's broker connections, twice, mid-run."""
    app_name = unique("kpb_")
    app = make_app(visibility_timeout=5, url_params={"application_name": app_name})
    worker = procs.worker(app, name="w1", pool=pool, concurrency=4)
    count = 40
    results = [app.sleepy.delay(f"t{i}", 0.25) for i in range(count)]
    ids = {r.id for r in results}

    for progress in (5, 20):
        env.wait_runs(progress, timeout=60, what=f"{progress} tasks to start")
        # At least one of the worker's broker connections (found by its application_name).
        wait_for(lambda: env.terminate_backends(app_name), 10, interval=0.05,
                 what="a broker connection of the worker to terminate")

    wait_for(lambda: {r["task_id"] for r in env.runs()} >= ids, 90, what="every task to run")
    for r in results:
        assert r.get(timeout=30).startswith("t")
    # Nothing left that could still be delivered again.
    wait_for(lambda: env.message_count("celery") == 0, 30, what="every message to be acked")
    counts = collections.Counter(r["task_id"] for r in env.runs())
    assert {k: v for k, v in counts.items() if v > 1} == {}, "tasks ran twice"
    assert set(counts) == ids
    assert worker.alive()


@pytest.mark.slow
def test_hard_time_limit_is_a_failed_attempt(make_app, procs, env):
    """Celery requeues a task killed at its hard time limit; that is recorded as a failed
    attempt (retried after backoff, not redelivered at once as a plain requeue is), and the
    message is dead-lettered once it used up its attempts."""
    app = make_app(extra_source=TIME_LIMITED,
                   transport_options={"backoff_base": 0.2, "polling_interval": 0.2})
    worker = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    app.stuck.delay("stuck")
    [letter] = wait_for(lambda: dead_letters(env), 60, what="the stuck task to be dead-lettered")
    assert letter["reason"] == "max_attempts" and letter["attempts"] == 2, letter
    assert [e["type"] for e in letter["errors"]] == ["TimeLimitExceeded"] * 2, letter["errors"]
    assert len(env.runs("stuck")) == 2
    assert worker.alive()
    env.wait_count(None, 0)
