"""Names users choose: any valid schema name works (a % in it too), and a queue name too long for
the wake-up notification is refused when the queue is declared, in one line naming the limit."""
from __future__ import annotations

import json

import pytest
from kombu import Queue

from conftest import _close_transport_pools, _drop_schema, console_script, unique, wait_for

# NOTIFY payloads are "<ms until visible> <queue>" and must be shorter than 8000 bytes.
MAX_QUEUE_BYTES = 7979


@pytest.fixture
def percent_schema(env):
    """A broker schema whose name holds a %, with which placeholders start in statement texts."""
    schema = unique("t_50%_off_")
    yield schema
    _close_transport_pools(schema)
    _drop_schema(env.db, schema)


def test_schema_name_with_percent_sign_round_trip(percent_schema, make_app, procs, env):
    app = make_app(transport_options={"schema": percent_schema, "sweep_interval": 0.2})
    worker = procs.worker(app, pool="prefork", concurrency=1)
    assert [app.add.delay(i, i).get(timeout=30) for i in range(3)] == [0, 2, 4]
    assert env.db.table_exists(percent_schema, "messages")
    # An unregistered task is dead-lettered (the dead-letter statement), then listed and
    # replayed by the CLI (the operator statements), and the stats read.
    app.app.send_task("gone.task", args=(1,))
    kombu_pg = [console_script("kombu-pg"), "--url", env.url, "--schema", percent_schema]

    def letters():
        out = procs.run([*kombu_pg, "dlq", "list", "--json"])
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    [letter] = wait_for(letters, 30, what="the dead letter")
    assert letter["reason"] == "unregistered"
    out = procs.run([*kombu_pg, "dlq", "replay", str(letter["id"])])
    assert out.returncode == 0 and "replayed 1 dead letter(s)" in out.stdout, out.stderr
    wait_for(lambda: len(letters()) == 2, 30, what="the replayed message to be dead-lettered again")
    out = procs.run([*kombu_pg, "stats", "--json"])
    assert out.returncode == 0, out.stderr
    assert "unregistered" in out.stdout
    # The beat schedule's statements too.
    out = procs.run([*kombu_pg, "beat", "add", "nightly", "--task", app.task_name("add"), "--every", "1h"])
    assert out.returncode == 0, out.stderr
    out = procs.run([*kombu_pg, "beat", "list", "--json"])
    assert out.returncode == 0, out.stderr
    assert [entry["name"] for entry in json.loads(out.stdout)["entries"]] == ["nightly"]
    assert worker.alive()
    assert "ProgrammingError" not in worker.log()


def test_queue_name_too_long_for_a_wake_up_is_refused_at_declare(env, kombu_conn):
    conn = kombu_conn()
    fits = "q" * (MAX_QUEUE_BYTES - 2) + "é"  # MAX_QUEUE_BYTES bytes, fewer characters
    Queue(fits, routing_key=fits)(conn.default_channel).declare()
    producer = conn.Producer()
    producer.publish({"n": 1}, routing_key=fits, serializer="json")
    assert env.message_count(fits) == 1

    too_long = "q" * (MAX_QUEUE_BYTES - 1) + "é"  # one byte more, still MAX_QUEUE_BYTES characters
    assert len(too_long) == MAX_QUEUE_BYTES
    with pytest.raises(ValueError) as caught:
        Queue(too_long, routing_key=too_long)(conn.default_channel).declare()
    message = str(caught.value)
    assert "\n" not in message and str(MAX_QUEUE_BYTES) in message and "bytes" in message, message
    assert too_long not in env.queue_names()


def test_celery_queue_name_too_long_is_refused_before_anything_is_stored(env, make_app):
    app = make_app()
    too_long = "c" * (MAX_QUEUE_BYTES + 1)
    with pytest.raises(ValueError) as caught:
        app.add.apply_async((1, 2), queue=too_long)
    message = str(caught.value)
    assert "\n" not in message and str(MAX_QUEUE_BYTES) in message, message
    assert env.message_count() == 0
    assert too_long not in env.queue_names()
