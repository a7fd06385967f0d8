"""Messages a worker cannot run are dead-lettered with their reason, never dropped: an
unregistered task name, a body that cannot be decoded, an explicit ``Reject(requeue=False)``.
"""
from __future__ import annotations

import base64
import json
import uuid

import kombu
import psycopg.rows
import pytest

from conftest import assert_automatic, dead_letters, wait_for


TASKS = '''
from celery.exceptions import Reject


@app.task(bind=True)
def refuses(self, label):
    record(self, label)
    raise Reject(f"no thanks {label}", requeue=False)
'''




@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_unregistered_and_undecodable_messages_are_dead_lettered(make_app, procs, env, pool):
    app = make_app(visibility_timeout=3, extra_source=TASKS, transport_options={"max_attempts": 3})
    worker = procs.worker(app, pool=pool, concurrency=1 if pool == "solo" else 2)

    unknown = app.app.send_task("no_such_module.no_such_task", args=(1,))
    corrupt_id = f"corrupt-{uuid.uuid4().hex[:8]}"
    with app.app.connection_for_write() as conn:
        kombu.Producer(conn).publish(
            b"{{{not json", exchange="celery", routing_key="celery",
            content_type="application/json", content_encoding="utf-8",
            headers={"task": app.task_name("add"), "id": corrupt_id})
    refused = app.refuses.delay("refused")
    fine = app.add.delay(2, 3)

    def three_letters():
        rows = dead_letters(env)
        return rows if len(rows) >= 3 else None

    letters = wait_for(three_letters, 30, what="three dead letters")
    by_task = {row["task_id"]: row for row in letters}
    assert set(by_task) == {unknown.id, corrupt_id, refused.id}, letters
    assert by_task[unknown.id]["reason"] == "unregistered"
    assert by_task[unknown.id]["task_name"] == "no_such_module.no_such_task"
    assert by_task[corrupt_id]["reason"] == "undecodable"
    assert by_task[corrupt_id]["task_name"] == app.task_name("add")
    assert by_task[refused.id]["reason"] == "rejected"
    for row in letters:
        assert row["errors"], row  # why it is there
        assert row["attempts"] == 1, row
        assert json.loads(row["payload"])["headers"]["id"] == row["task_id"]
    # The corrupt body is kept as it came, for inspection.
    stored = json.loads(by_task[corrupt_id]["payload"])
    body = stored["body"]
    if stored["properties"].get("body_encoding") == "base64":  # Kombu's virtual transport encoding
        body = base64.b64decode(body).decode()
    assert body == "{{{not json"

    # The worker goes on: a good task published alongside and another one afterwards succeed.
    assert fine.get(timeout=30) == 5
    assert app.add.delay(1, 1).get(timeout=30) == 2
    assert worker.alive()
    assert len(env.runs("refused")) == 1
    wait_for(lambda: env.message_count() == 0, 10, what="every message to be settled")
    assert len(dead_letters(env)) == 3
    assert_automatic(app, worker)
