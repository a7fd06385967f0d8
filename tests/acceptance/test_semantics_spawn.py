"""The integration installs itself in pool processes started with the spawn start method too:
they import everything afresh (the .pth hook runs in them), so nothing is inherited by fork."""
from __future__ import annotations

import pytest

from conftest import wait_for

SPAWN_TASKS = '''
import billiard
import sys as _sys

billiard.set_start_method("spawn", force=True)  # the user's choice, not ours


@app.task(bind=True)
def spawned_fails(self, label):
    record(self, label)
    raise ValueError(f"spawned {label}")
'''


@pytest.mark.slow
def test_spawned_pool_processes_retry_and_dead_letter(make_app, procs, env):
    app = make_app(extra_source=SPAWN_TASKS, transport_options={"max_attempts": 2, "backoff_base": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=1)
    result = app.spawned_fails.delay("s1")
    runs = env.wait_runs(2, "s1", timeout=60)
    assert len({run["pid"] for run in runs}) == 1  # the same spawned child, retried in place

    def dead_letter():
        rows = env.db.query(f'SELECT reason, attempts FROM "{env.broker_schema}".dead_letters')
        return rows or None

    assert wait_for(dead_letter, 30, what="the dead letter") == [("max_attempts", 2)]
    assert wait_for(lambda: app.app.backend.get_task_meta(result.id, cache=False)["status"] == "FAILURE",
                    30, what="FAILURE in the result backend")
    assert "SpawnPoolWorker" in worker.log()  # the pool really used spawn
    assert len(env.runs("s1")) == 2
