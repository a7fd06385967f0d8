"""Delayed tasks (countdown/ETA) and celery beat."""
from __future__ import annotations

import time

import pytest

from conftest import console_script, wait_for

COUNTDOWN = 3.0


def db_now(env):
    return env.db.scalar("SELECT clock_timestamp()")


def test_countdown_is_held_in_the_database_until_due(make_app, procs, env):
    app = make_app()
    procs.worker(app, pool="prefork", concurrency=1)
    before = db_now(env)
    result = app.mark.apply_async(("later",), countdown=COUNTDOWN)
    after = db_now(env)

    # While it is not due, the row is invisible and nobody holds it.
    [row] = wait_for(lambda: env.messages("celery"), 5, interval=0.05, what="the delayed message row")
    assert row["invisible"], row
    assert row["lease_token"] is None and row["delivery_count"] == 0, row
    remaining = (row["visible_at"] - db_now(env)).total_seconds()
    assert 0 < remaining <= COUNTDOWN + 0.5
    mid = time.monotonic() + 1.5
    while time.monotonic() < mid:  # still invisible and untouched during the countdown
        [row] = env.messages("celery")
        assert row["lease_token"] is None and row["invisible"], row
        assert not env.runs("later")
        assert result.state == "PENDING"
        time.sleep(0.2)

    [run] = env.wait_runs(1, "later", timeout=COUNTDOWN + 10)
    started_after = (run["started_at"] - before).total_seconds()
    started_late_by = (run["started_at"] - after).total_seconds() - COUNTDOWN
    assert started_after >= COUNTDOWN, f"started {started_after:.3f}s after publishing"
    assert started_late_by <= 1.0, f"started {started_late_by:.3f}s after the countdown"
    assert result.get(timeout=10) == "later"
    wait_for(lambda: env.message_count("celery") == 0, 10, what="the delayed message to be acked")


@pytest.mark.slow
def test_beat_publishes_and_tasks_run(make_app, procs, env, tmp_path):
    app = make_app(conf=lambda name: {"beat_schedule": {
        "tick": {"task": f"{name}.mark", "schedule": 1.0, "args": ("beat",)}}})
    procs.worker(app, pool="solo", concurrency=1)
    procs.spawn([console_script("celery"), "-A", app.name, "beat", "-l", "INFO",
                 "--schedule", str(tmp_path / "beat-schedule"), "--max-interval", "1"], name="beat")
    runs = env.wait_runs(3, "beat", timeout=30, what="three scheduled runs")
    assert len({r["task_id"] for r in runs}) == len(runs)
