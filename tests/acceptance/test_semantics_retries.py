"""Failures of task code: bounded server-side retries with backoff, then the dead letters.

Covers a task that always raises, a task whose pool process dies (``os._exit``), Celery's own
``self.retry`` (which must behave as on Redis), and per-task ``max_attempts`` overrides. The task
code below is plain Celery: nothing imports this package.
"""
from __future__ import annotations

import datetime as dt
import json
import os

import psycopg.rows
import pytest

from conftest import assert_automatic, console_script, dead_letters, wait_for


TASKS = '''
import os as _os

from celery.exceptions import Reject


@app.task(bind=True)
def always_fails(self, label):
    record(self, label)
    raise ValueError(f"boom {label} #{self.request.retries}")


@app.task(bind=True, max_attempts=2)
def fails_twice_max(self, label):
    record(self, label)
    raise RuntimeError(f"capped {label}")


@app.task(bind=True)
def fails_annotated(self, label):
    record(self, label)
    raise RuntimeError(f"annotated {label}")


@app.task(bind=True)
def dies(self, label):
    record(self, label)
    _os._exit(1)


@app.task(bind=True)
def pid(self, label):
    record(self, label)
    return _os.getpid()


@app.task(bind=True)
def retries_itself(self, label):
    record(self, label)
    try:
        raise KeyError(f"not yet {label}")
    except KeyError:
        raise self.retry(countdown=1, max_retries=2)


@app.task(bind=True)
def retries_itself_exc(self, label):
    record(self, label)
    try:
        raise KeyError(f"not yet {label}")
    except KeyError as exc:
        raise self.retry(exc=exc, countdown=1, max_retries=2)
'''




def wait_state(result, state: str, timeout: float, seen: set | None = None) -> None:
    """Poll the result backend until ``state``, collecting every state observed on the way."""
    def check():
        current = result.state
        if seen is not None:
            seen.add(current)
        return current == state

    wait_for(check, timeout, interval=0.05, what=lambda: f"task {result.id} to be {state} (is {result.state})")


def cli(procs, env, *args) -> str:
    out = procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema, *args])
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


# --- 3. a task that always raises ---------------------------------------------------------------

@pytest.mark.slow
def test_always_failing_task_retried_with_growing_backoff_then_dead_lettered(make_app, procs, env):
    base, attempts = 0.5, 3
    app = make_app(visibility_timeout=3, extra_source=TASKS, transport_options={
        "max_attempts": attempts, "backoff_base": base, "polling_interval": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=2)
    result = app.always_fails.delay("doomed")
    seen: set[str] = set()
    wait_state(result, "FAILURE", 30, seen)
    assert "RETRY" in seen, f"RETRY was never observed: {seen}"
    assert isinstance(result.result, ValueError)

    runs = env.runs("doomed")
    assert len(runs) == attempts, runs
    # Server-side retries redeliver the same message: Celery's own retry counter stays 0.
    assert [r["redelivered"] for r in runs] == [False, True, True]

    # The CLI lists it, with one error-history entry per attempt.
    [listed] = [json.loads(line) for line in cli(procs, env, "dlq", "list", "--json").splitlines()]
    assert listed["reason"] == "max_attempts" and listed["attempts"] == attempts
    assert listed["task_id"] == result.id and listed["task_name"] == app.task_name("always_fails")
    assert listed["last_error_type"] == "ValueError"
    table = cli(procs, env, "dlq", "list", "--reason", "max_attempts")
    assert app.task_name("always_fails")[:30] in table and "max_attempts" in table

    shown = json.loads(cli(procs, env, "dlq", "show", str(listed["id"])))
    errors = shown["errors"]
    assert len(errors) == attempts, errors
    for entry in errors:
        assert set(entry) >= {"at", "worker", "type", "message", "traceback"}, entry
        assert entry["type"] == "ValueError" and "boom doomed" in entry["message"]
        assert "ValueError" in entry["traceback"]
        assert entry["worker"] == worker.hostname
    # Growing delays (loosely): the retry after attempt k is due no sooner than half of
    # base * 2^(k-1) (the jitter's lower bound), a bound that doubles per attempt; and the waits
    # grow, give or take the wake-up latency (polling_interval; jitter ranges of consecutive
    # attempts touch at their ends, so equal waits are possible).
    times = [dt.datetime.fromisoformat(e["at"]) for e in errors]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    for k, gap in enumerate(gaps, start=1):
        assert gap >= 0.5 * base * 2 ** (k - 1) - 0.05, gaps
    assert gaps[1] >= gaps[0] - 0.35, gaps
    assert shown["message"]["headers"]["id"] == result.id
    assert env.message_count() == 0
    assert_automatic(app, worker)


# --- 4. os._exit in a task: each lost worker is an attempt ------------------------------------

@pytest.mark.slow
def test_task_killing_its_pool_process_is_dead_lettered_and_worker_keeps_going(make_app, procs, env):
    app = make_app(visibility_timeout=3, extra_source=TASKS, transport_options={
        "max_attempts": 3, "backoff_base": 0.2, "polling_interval": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=2)
    doomed = app.dies.delay("dies")
    normal = [app.add.delay(i, 1) for i in range(6)]
    assert [r.get(timeout=30) for r in normal] == [i + 1 for i in range(6)]
    wait_state(doomed, "FAILURE", 60)
    assert "WorkerLostError" in type(doomed.result).__name__ or "WorkerLostError" in repr(doomed.result)

    assert len(env.runs("dies")) == 3
    [letter] = dead_letters(env)
    assert letter["reason"] == "max_attempts" and letter["attempts"] == 3
    assert letter["task_id"] == doomed.id
    assert [e["type"] for e in letter["errors"]] == ["WorkerLostError"] * 3, letter["errors"]

    # The same worker process is alive and still working, with fresh pool processes.
    assert worker.alive()
    os.kill(worker.pid, 0)
    after = [app.pid.delay(f"after{i}") for i in range(4)]
    pids = {r.get(timeout=30) for r in after}
    assert worker.pid not in pids
    assert {r["pid"] for r in env.runs("dies")}.isdisjoint(pids)  # those processes are gone
    wait_for(lambda: env.message_count() == 0, 10, what="every message to be settled")
    assert len(dead_letters(env)) == 1
    assert_automatic(app, worker)


# --- 7. self.retry(countdown=1, max_retries=2) behaves as on Redis -----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("task", ["retries_itself", "retries_itself_exc"])
def test_self_retry_behaves_as_on_redis(make_app, procs, env, task):
    # A broker max_attempts below Celery's retry count must not cut Celery's retries short:
    # each self.retry() publishes a new message (with its own delivery count).
    app = make_app(visibility_timeout=3, extra_source=TASKS, transport_options={
        "max_attempts": 3, "backoff_base": 0.2, "polling_interval": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=2)
    result = getattr(app, task).delay("again")
    seen: set[str] = set()
    wait_state(result, "FAILURE", 30, seen)
    assert "RETRY" in seen, seen

    runs = env.runs("again")
    assert [r["retries"] for r in runs] == [0, 1, 2], runs
    assert len({r["task_id"] for r in runs}) == 1
    starts = [r["started_at"] for r in runs]
    assert all((b - a).total_seconds() >= 0.9 for a, b in zip(starts, starts[1:])), starts  # countdown=1

    [letter] = wait_for(lambda: dead_letters(env), 10, what="the dead letter")
    assert letter["reason"] == "max_retries", letter
    assert letter["task_id"] == result.id
    expected = "MaxRetriesExceededError" if task == "retries_itself" else "KeyError"
    assert type(result.result).__name__ == expected, repr(result.result)
    assert letter["errors"][-1]["type"] == expected, letter["errors"]
    wait_for(lambda: env.message_count() == 0, 10, what="every message to be settled")
    assert len(dead_letters(env)) == 1 and len(env.runs("again")) == 3
    assert_automatic(app, worker)


# --- 8. per-task max_attempts overrides the global one -----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["attribute", "annotation"])
def test_per_task_max_attempts_overrides_global(make_app, procs, env, how):
    conf = (lambda name: {"task_annotations": {f"{name}.fails_annotated": {"max_attempts": 2}}})
    app = make_app(visibility_timeout=3, extra_source=TASKS, conf=conf, transport_options={
        "max_attempts": 4, "backoff_base": 0.2, "polling_interval": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=2)
    capped_task = app.fails_twice_max if how == "attribute" else app.fails_annotated
    capped = capped_task.delay("capped")
    default = app.always_fails.delay("global")  # no override: the global 4
    wait_state(capped, "FAILURE", 30)
    wait_state(default, "FAILURE", 30)

    assert len(env.runs("capped")) == 2
    assert len(env.runs("global")) == 4
    letters = {row["task_id"]: row for row in dead_letters(env)}
    assert (letters[capped.id]["attempts"], letters[capped.id]["max_attempts"]) == (2, 2)
    assert (letters[default.id]["attempts"], letters[default.id]["max_attempts"]) == (4, 4)
    assert all(row["reason"] == "max_attempts" for row in letters.values())
    assert len(letters[capped.id]["errors"]) == 2
    assert_automatic(app, worker)
