"""A Celery app whose only broker setting is broker_url, with real worker processes."""
from __future__ import annotations

import pytest
from celery import chain, chord, group

from conftest import wait_for

TIMEOUT = 30


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_tasks_run_on_each_pool(make_app, procs, env, pool):
    app = make_app()
    procs.worker(app, pool=pool, concurrency=1 if pool == "solo" else 2)
    results = [app.add.delay(i, i) for i in range(5)]
    assert [r.get(timeout=TIMEOUT) for r in results] == [0, 2, 4, 6, 8]
    runs = env.runs("add")
    assert sorted(r["task_id"] for r in runs) == sorted(r.id for r in results)
    assert all(r["redelivered"] is False for r in runs)
    wait_for(lambda: env.message_count("celery") == 0, 10, what="all task messages acked")


def test_canvas_chain_group_chord(make_app, procs, env):
    app = make_app()
    procs.worker(app, pool="prefork", concurrency=2)
    assert chain(app.add.s(1, 2), app.add.s(3), app.add.s(4)).apply_async().get(timeout=TIMEOUT) == 10
    assert group(app.add.s(i, 1) for i in range(4)).apply_async().get(timeout=TIMEOUT) == [1, 2, 3, 4]
    assert chord((app.add.s(i, i) for i in range(4)), app.tsum.s()).apply_async().get(timeout=TIMEOUT) == 12


def test_task_published_from_prefork_child(make_app, procs, env):
    app = make_app()
    worker = procs.worker(app, pool="prefork", concurrency=2)
    child_id = app.spawn.delay("parent").get(timeout=TIMEOUT)
    [parent] = env.runs("parent")
    assert parent["pid"] != worker.pid  # it ran in a pool child, which published the new task
    [child] = env.wait_runs(1, "parent-child", what="the task published by a task")
    assert child["task_id"] == child_id
    assert app.app.AsyncResult(child_id).get(timeout=TIMEOUT) == "parent-child"
