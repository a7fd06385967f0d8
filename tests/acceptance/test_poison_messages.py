"""Malformed messages never stop a worker: each goes to the dead letters (``undecodable``) with
its payload as stored, and the good messages around it run exactly once.

The malformed rows are written straight into the messages table, as a producer with a bug or a
corrupted row would leave them, between good Celery tasks of the queue the worker consumes.
"""
from __future__ import annotations

import collections
import copy
import json
import time

import pytest
from kombu import Consumer, Exchange, Producer, Queue
from psycopg import sql

from conftest import console_script, dead_letters, wait_for


def _edit(change):
    """A malformed variant of a good task message: ``change(envelope)`` edits a copy."""
    def make(envelope: dict) -> str:
        envelope = copy.deepcopy(envelope)
        change(envelope)
        return json.dumps(envelope)
    return make


def _set(*path_and_value):
    *path, key, value = path_and_value

    def change(envelope):
        target = envelope
        for step in path:
            target = target[step]
        target[key] = value
    return _edit(change)


def _drop(*path):
    *path, key = path

    def change(envelope):
        target = envelope
        for step in path:
            target = target[step]
        del target[key]
    return _edit(change)


def _body(value):
    return _set("body", json.dumps(value))


#: kind -> payload text made from a good task message. The first ones cannot even become a
#: Kombu message (the transport dead-letters them); the others are Kombu messages Celery cannot
#: turn into a task request.
MALFORMED = {
    "truncated_json": lambda envelope: json.dumps(envelope)[:40],
    "json_array": lambda envelope: json.dumps([envelope["body"], envelope["headers"]]),
    "json_string": lambda envelope: json.dumps(envelope["body"]),
    "json_number": lambda envelope: "42",
    "json_null": lambda envelope: "null",
    "no_properties": _drop("properties"),
    "properties_not_object": _set("properties", "celery"),
    "delivery_info_not_object": _set("properties", "delivery_info", ["celery"]),
    "headers_not_object": _set("headers", "mark"),
    "unknown_type_marker": _set("headers", "eta", {"__type__": "frobnicator", "__value__": 1}),
    "bad_base64_body": _edit(lambda envelope: envelope.update(
        body="not*base64", properties=dict(envelope["properties"], body_encoding="base64"))),
    "unknown_body_encoding": _set("properties", "body_encoding", "rot13"),
    "no_body": _drop("body"),
    # Celery's side.
    "body_not_three_items": _body([["x"], {}]),
    "args_not_list": _body([5, {}, {}]),
    "kwargs_not_mapping": _body([["x"], ["y"], {}]),
    "embed_not_mapping": _body([["x"], {}, "callbacks"]),
    "no_id_header": _drop("headers", "id"),
    "task_header_not_string": _edit(lambda envelope: envelope["headers"].update(
        task=[envelope["headers"]["task"]])),
    "timelimit_not_pair": _set("headers", "timelimit", 30),
    "unparsable_eta": _set("headers", "eta", "next tuesday"),
    # Fails as the request goes to the pool (later, from the event loop, when the pool is busy)...
    "stamped_headers_not_list": _set("headers", "stamped_headers", 5),
    # ... or, for a task with an expiry, as Celery checks whether it was revoked, on receipt.
    "stamped_headers_not_list_expiring": _edit(lambda envelope: envelope["headers"].update(
        stamped_headers=5, expires="2999-01-01T00:00:00+00:00")),
}
GOOD = 200


def insert_row(env, queue: str, payload: str, task_id: str, task_name: str) -> None:
    env.db.query(sql.SQL("INSERT INTO {} (queue, payload, task_id, task_name) VALUES (%s, %s, %s, %s)")
                 .format(env.t("messages")), (queue, payload, task_id, task_name))


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_malformed_messages_are_dead_lettered_and_never_stop_the_worker(make_app, procs, env, pool):
    app = make_app()
    # A good task message as the app publishes it, parked in a queue nobody consumes.
    app.mark.apply_async(("template",), queue="template")
    [template] = env.messages("template")
    envelope = json.loads(template["payload"])
    env.db.query(sql.SQL("DELETE FROM {} WHERE queue = 'template'").format(env.t("messages")))

    bad = {f"bad-{kind}": make(envelope) for kind, make in MALFORMED.items()}
    # Spread among the good ones, so that claims take both together.
    after_good = {int((k + 0.5) * GOOD / len(bad)): row for k, row in enumerate(bad.items())}
    for i in range(GOOD):
        app.mark.delay(f"good{i}")
        if i in after_good:
            task_id, payload = after_good[i]
            insert_row(env, "celery", payload, task_id, template["task_name"])

    worker = procs.worker(app, pool=pool, concurrency=1 if pool == "solo" else 2)
    env.wait_runs(GOOD, timeout=120, what=f"the {GOOD} good tasks to run")
    letters = wait_for(lambda: (lambda rows: rows if len(rows) >= len(bad) else None)(dead_letters(env)),
                       30, what=lambda: f"{len(bad)} dead letters (have {len(dead_letters(env))})")
    env.wait_count(None, 0, timeout=30)  # everything settled, nothing left leased

    log = worker.log()
    assert worker.alive(), log[-3000:]
    assert "Unrecoverable error" not in log
    assert "lost the lease" not in log
    runs = collections.Counter(row["label"] for row in env.runs())
    assert runs == {f"good{i}": 1 for i in range(GOOD)}, "every good task exactly once"

    assert {row["task_id"] for row in letters} == set(bad), "only the malformed ones, each once"
    for row in letters:
        assert row["reason"] == "undecodable", row
        assert row["payload"] == bad[row["task_id"]], row  # kept as stored
        assert row["queue"] == "celery" and row["attempts"] == 1, row
        error = row["errors"][-1]
        assert error["type"] and error["message"], row

    # The operator's commands read them, whatever they hold.
    kombu_pg = [console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema]
    listed = procs.run([*kombu_pg, "dlq", "list", "--reason", "undecodable", "--json", "--limit", "100"])
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == len(bad)
    by_task = {row["task_id"]: row["id"] for row in letters}
    for task_id in ("bad-truncated_json", "bad-json_array", "bad-args_not_list"):
        shown = procs.run([*kombu_pg, "dlq", "show", str(by_task[task_id])])
        assert shown.returncode == 0, shown.stderr
        letter = json.loads(shown.stdout)
        if task_id == "bad-args_not_list":  # a JSON object: shown as the message
            assert letter["message"] == json.loads(bad[task_id]) and letter["raw_payload"] is None
        else:
            assert letter["message"] is None and letter["raw_payload"] == bad[task_id]


@pytest.mark.parametrize("no_ack", [False, True], ids=["acking", "no_ack"])
def test_kombu_consumer_gets_the_good_messages_of_a_claim_with_undecodable_rows(env, kombu_conn, no_ack):
    """A plain Kombu consumer, acking or not (a no-ack claim deletes the rows it takes), gets
    every good message; the rows claimed with them that are not messages are dead-lettered."""
    conn = kombu_conn()
    queue = Queue("mixed", Exchange("mixed", "direct"), routing_key="mixed")
    queue(conn.default_channel).declare()
    producer = Producer(conn.default_channel)
    for i in range(3):
        producer.publish({"i": i}, exchange=queue.exchange, routing_key="mixed", serializer="json")
        insert_row(env, "mixed", '{"body": "half a mess', f"bad{i}", None)
    received = []

    def on_message(body, message):
        received.append(body["i"])
        if not no_ack:
            message.ack()

    consumer = Consumer(conn.default_channel, queues=[queue], accept=["json"], callbacks=[on_message],
                        no_ack=no_ack, prefetch_count=10)
    consumer.consume()
    deadline = time.monotonic() + 10
    while len(received) < 3 and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    consumer.cancel()
    assert sorted(received) == [0, 1, 2]
    letters = dead_letters(env)
    # A no-ack claim does not return the row's task id (the payload could not tell it either).
    assert [row["task_id"] for row in letters] == ([None] * 3 if no_ack else ["bad0", "bad1", "bad2"])
    for row in letters:
        assert (row["reason"], row["queue"], row["payload"], row["attempts"]) == \
            ("undecodable", "mixed", '{"body": "half a mess', 1), row
        assert row["errors"][-1]["type"] == "JSONDecodeError", row
    env.wait_count("mixed", 0)
