"""Workers with the gevent and eventlet pools (`celery worker -P gevent|eventlet`).

Green pools run the consumer without the event loop: the transport's drain_events, with the
lease keeper, the acker and the LISTEN connection as green threads. Skipped where the package
is not installed (the dev extras install both).
"""
from __future__ import annotations

import collections

import pytest

from conftest import unique, wait_for

POOLS = ["gevent", "eventlet"]


def green_worker(procs, app, pool: str, name: str, concurrency: int = 4, extra_args: tuple = ()):
    pytest.importorskip(pool)
    return procs.worker(app, name=name, pool=pool, concurrency=concurrency, extra_args=extra_args)


@pytest.mark.slow
@pytest.mark.parametrize("pool", POOLS)
def test_tasks_run_in_a_green_pool(make_app, procs, env, pool):
    app = make_app()
    worker = green_worker(procs, app, pool, "green")
    results = [app.add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(20)]
    # A task that publishes another one (from a greenlet, on the worker's own connections).
    child_id = app.spawn.delay("parent").get(timeout=30)
    assert app.app.AsyncResult(child_id).get(timeout=30) == "parent-child"
    assert {r["hostname"] for r in env.runs()} == {worker.hostname}
    assert f"concurrency: 4 ({pool})" in worker.log()
    env.wait_count("celery", 0)


@pytest.mark.slow
@pytest.mark.parametrize("pool", POOLS)
def test_a_long_task_keeps_its_lease_in_a_green_pool(make_app, procs, env, pool):
    # Three times the visibility timeout: without renewal, its lease would expire and the
    # other worker, idle on the same queue, would run it again.
    app = make_app(visibility_timeout=2)
    green = green_worker(procs, app, pool, "green")
    result = app.sleepy.delay("long", 6)
    env.wait_runs(1, "long")
    procs.worker(app, name="other", pool="solo", concurrency=1)
    assert result.get(timeout=30) == "long"
    [run] = env.runs("long")
    assert run["hostname"] == green.hostname and not run["redelivered"], run
    env.wait_count("celery", 0)


@pytest.mark.slow
@pytest.mark.parametrize("pool", POOLS)
def test_terminated_connections_in_a_green_pool_lose_and_duplicate_nothing(make_app, procs, env, pool):
    """pg_terminate_backend on the worker's connections twice, while tasks run and others wait
    (prefetched, or submitted to the full pool)."""
    app_name = unique("kpg_")
    app = make_app(visibility_timeout=5, url_params={"application_name": app_name})
    worker = green_worker(procs, app, pool, "green", concurrency=2)
    count = 30
    results = [app.sleepy.delay(f"t{i}", 0.3) for i in range(count)]
    ids = {r.id for r in results}

    for progress in (4, 15):
        env.wait_runs(progress, timeout=60, what=f"{progress} tasks to start")
        wait_for(lambda: env.terminate_backends(app_name), 10, interval=0.05,
                 what="a broker connection of the worker to terminate")

    wait_for(lambda: {r["task_id"] for r in env.runs()} >= ids, 90, what="every task to run")
    for r in results:
        assert r.get(timeout=30).startswith("t")
    wait_for(lambda: env.message_count("celery") == 0, 30, what="every message to be acked")
    counts = collections.Counter(r["task_id"] for r in env.runs())
    assert {k: v for k, v in counts.items() if v > 1} == {}, "tasks ran twice"
    assert set(counts) == ids
    assert worker.alive()


@pytest.mark.slow
@pytest.mark.parametrize("pool", POOLS)
def test_a_warm_shutdown_of_a_green_pool_runs_or_returns_every_task(make_app, procs, env, pool):
    # Stopped while tasks run and others wait: the running ones finish and are acked, the
    # prefetched ones are released to the next worker; none runs twice.
    app = make_app(visibility_timeout=120)
    worker = green_worker(procs, app, pool, "green", concurrency=2)
    results = [app.sleepy.delay(f"s{i}", 1) for i in range(10)]
    env.wait_runs(2)
    worker.terminate()
    assert worker.wait_exit(60) == 0
    # Released messages come back at once, not after their 120 s lease.
    procs.worker(app, name="next", pool="solo", concurrency=1)
    for r in results:
        assert r.get(timeout=60).startswith("s")
    counts = collections.Counter(r["task_id"] for r in env.runs())
    assert {k: v for k, v in counts.items() if v > 1} == {}, "tasks ran twice"
    assert set(counts) == {r.id for r in results}
