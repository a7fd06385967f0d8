"""Unique tasks: while a message with a deduplication key waits or runs, another one with the same
key is dropped (or, in replace mode, replaces the waiting one)."""
from __future__ import annotations

from conftest import wait_for

KEY = "x-kombu-pg-unique-key"

UNIQUE_TASKS = '''
@app.task(bind=True, unique_key=lambda args, kwargs: f"report:{args[0]}")
def report(self, label):
    record(self, label)
    return label
'''


def test_ten_publishes_with_one_key_run_one_task(make_app, procs, env):
    app = make_app()
    for i in range(10):  # no worker yet: the first one is waiting in the queue
        app.mark.apply_async((f"dup{i}",), headers={KEY: "nightly-report"})
    app.mark.delay("other")  # no key: not deduplicated
    assert env.message_count("celery") == 2
    procs.worker(app, pool="solo")
    env.wait_runs(1, "other", timeout=30)
    wait_for(lambda: env.message_count("celery") == 0, 10, what="the queue to drain")
    runs = [r["label"] for r in env.runs() if r["label"].startswith("dup")]
    assert runs == ["dup0"]

    # Once that message is acked, the key is free again.
    app.mark.apply_async(("dup-again",), headers={KEY: "nightly-report"})
    env.wait_runs(1, "dup-again", timeout=30)


def test_replace_mode_keeps_the_latest_waiting_message(make_app, procs, env):
    app = make_app()
    for i in range(5):
        app.mark.apply_async((f"v{i}",), headers={KEY: "settings", "x-kombu-pg-unique-mode": "replace"})
    assert env.message_count("celery") == 1
    procs.worker(app, pool="solo")
    env.wait_runs(1, "v4", timeout=30)
    wait_for(lambda: env.message_count("celery") == 0, 10, what="the queue to drain")
    assert [r["label"] for r in env.runs() if r["label"].startswith("v")] == ["v4"]


def test_task_option_derives_the_key_from_arguments(make_app, procs, env):
    app = make_app(extra_source=UNIQUE_TASKS)
    for label in ("a", "a", "b", "a"):
        app.report.delay(label)
    assert sorted(m["unique_key"] for m in env.messages("celery")) == ["report:a", "report:b"]
    procs.worker(app, pool="solo")
    wait_for(lambda: env.message_count("celery") == 0, 30, what="the queue to drain")
    assert sorted(r["label"] for r in env.runs()) == ["a", "b"]
