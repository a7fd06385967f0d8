"""Celery's ``expires``: a task that expires while it waits in the table still reaches a worker,
which marks it REVOKED as on other brokers; one nobody takes goes to the dead letters (reason
``expired``) and is marked REVOKED too. Plain Kombu messages keep Kombu's TTL: dropped."""
from __future__ import annotations

import pytest
from celery.exceptions import TaskRevokedError
from kombu import Queue

from conftest import dead_letters, wait_for


# The queue's x-message-ttl expires a task as Celery's expires does.
QUEUE_TTL = """
from kombu import Queue
app.conf.task_queues = [Queue("celery", message_ttl=1.0)]
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["expires", "queue_ttl"])
def test_task_expired_while_waiting_is_revoked_by_the_worker(make_app, procs, env, how):
    # One process, one message at a time (prefetch 1, late acks): the second task waits in the
    # table, not in the worker's memory, while the first one sleeps.
    app = make_app(conf={"worker_prefetch_multiplier": 1},
                   extra_source=QUEUE_TTL if how == "queue_ttl" else "")
    worker = procs.worker(app, pool="prefork", concurrency=1)
    busy = app.sleepy.delay("busy", 4)
    env.wait_runs(1, "busy", timeout=30)
    late = app.mark.apply_async(("late",), expires=1) if how == "expires" else app.mark.delay("late")
    assert busy.get(timeout=30) == "busy"

    with pytest.raises(TaskRevokedError):
        late.get(timeout=20)
    assert late.state == "REVOKED"
    assert env.runs("late") == []
    env.wait_count(None, 0)  # acked, not left behind
    assert dead_letters(env) == []
    assert f"Discarding revoked task: {app.task_name('mark')}[{late.id}]" in worker.log()


@pytest.mark.slow
def test_expired_task_nobody_takes_is_dead_lettered_and_revoked(make_app, procs, env, kombu_conn):
    app = make_app(transport_options={"sweep_interval": 0.5, "expired_task_grace": 1})
    procs.worker(app, pool="solo", concurrency=1)  # consumes "celery" (and sweeps), not "nobody"
    lost = app.mark.apply_async(("lost",), queue="nobody", expires=1)
    # A plain message with a TTL in the same queue: dropped, as Kombu's TTL means.
    conn = kombu_conn()
    conn.Producer().publish({"plain": True}, routing_key="nobody", serializer="json", expiration=0.5,
                            declare=[Queue("nobody")])

    [letter] = wait_for(lambda: dead_letters(env), 30, what="the expired task's dead letter")
    assert (letter["task_id"], letter["reason"], letter["queue"]) == (lost.id, "expired", "nobody")
    assert letter["errors"][-1]["type"] == "Expired", letter["errors"]
    wait_for(lambda: lost.state == "REVOKED", 10, what=lambda: f"{lost.id} to be REVOKED (is {lost.state})")
    with pytest.raises(TaskRevokedError):
        lost.get(timeout=1)
    assert env.message_count("nobody") == 0
    assert env.runs("lost") == []
