"""A worker drains a burst on its own, with the safety-net poll out of the picture: every claim
that fills its batch makes the event loop come round again (notably in the solo pool, which has
no other socket to wake it)."""
from __future__ import annotations

import pytest

from conftest import wait_for


@pytest.mark.parametrize("pool", ["solo", "prefork", "threads"])
def test_burst_drains_without_polling(make_app, procs, env, pool):
    app = make_app(transport_options={"polling_interval": 300})  # one poll per 5 minutes
    procs.worker(app, pool=pool, concurrency=1)  # prefetch 4: a claim per second would take 75 s
    app.mark.delay("first")
    env.wait_runs(1, "first", timeout=30)
    for i in range(300):
        app.mark.delay(f"burst{i}")
    # With a poll every 5 minutes, only wake-ups can drain 300 messages (4 per claim) in time.
    wait_for(lambda: len(env.runs()) == 301, 40, what="the burst to be processed")
    wait_for(lambda: env.message_count("celery") == 0, 10, what="the burst to be acked")
