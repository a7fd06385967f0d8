"""Exchanges and bindings are stored in PostgreSQL: a binding declared in one process routes
messages published in another (Kombu level, separate OS processes)."""
from __future__ import annotations

import json
import sys

import pytest
from kombu import Exchange, Producer

from conftest import write_script

DECLARE = """
import json, sys
import kombu

url, options, spec = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
with kombu.Connection(url, transport_options=options) as conn:
    channel = conn.default_channel
    exchange = kombu.Exchange(spec["exchange"], spec["type"])
    for queue_name, routing_key in spec["bindings"]:
        kombu.Queue(queue_name, exchange, routing_key=routing_key)(channel).declare()
print("declared", flush=True)
"""

CONSUME = """
import json, sys
import kombu

url, options, queue_name, count = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
got = []
with kombu.Connection(url, transport_options=options) as conn:
    simple = conn.SimpleQueue(kombu.Queue(queue_name, no_declare=True))
    for _ in range(count):
        message = simple.get(timeout=10)
        got.append(message.payload)
        message.ack()
    try:
        extra = simple.get(timeout=0.5)
        got.append(extra.payload)
        extra.ack()
    except simple.Empty:
        pass
print(json.dumps(got), flush=True)
"""


def run_script(procs, env, script, *args) -> str:
    result = procs.run([sys.executable, str(script), env.url, json.dumps(env.transport_options), *args], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture
def scripts(tmp_path):
    return write_script(tmp_path, "declare.py", DECLARE), write_script(tmp_path, "consume.py", CONSUME)


def consume_elsewhere(procs, env, consume, queue: str, count: int) -> list:
    return json.loads(run_script(procs, env, consume, queue, str(count)).strip().splitlines()[-1])


def test_direct_binding_from_another_process(env, procs, kombu_conn, scripts):
    declare, consume = scripts
    run_script(procs, env, declare, json.dumps(
        {"exchange": "orders", "type": "direct", "bindings": [["orders.eu", "eu"], ["orders.us", "us"]]}))
    conn = kombu_conn()  # this process declared nothing: the routing comes from the database
    producer = Producer(conn.default_channel)
    producer.publish({"n": 1}, exchange="orders", routing_key="eu", serializer="json")
    producer.publish({"n": 2}, exchange="orders", routing_key="us", serializer="json")
    producer.publish({"n": 3}, exchange="orders", routing_key="nowhere", serializer="json")
    assert consume_elsewhere(procs, env, consume, "orders.eu", 1) == [{"n": 1}]
    assert consume_elsewhere(procs, env, consume, "orders.us", 1) == [{"n": 2}]
    env.wait_count(None, 0)


def test_topic_binding_from_another_process(env, procs, kombu_conn, scripts):
    declare, consume = scripts
    run_script(procs, env, declare, json.dumps(
        {"exchange": "logs", "type": "topic",
         "bindings": [["logs.errors", "*.error"], ["logs.eu", "eu.#"], ["logs.all", "#"]]}))
    conn = kombu_conn()
    producer = Producer(conn.default_channel)
    for key in ("eu.error", "us.error", "eu.db.info", "us.info"):
        producer.publish(key, exchange="logs", routing_key=key, serializer="json")
    assert sorted(consume_elsewhere(procs, env, consume, "logs.errors", 2)) == ["eu.error", "us.error"]
    assert sorted(consume_elsewhere(procs, env, consume, "logs.eu", 2)) == ["eu.db.info", "eu.error"]
    assert sorted(consume_elsewhere(procs, env, consume, "logs.all", 4)) == sorted(
        ["eu.error", "us.error", "eu.db.info", "us.info"])
    env.wait_count(None, 0)


def test_fanout_binding_from_another_process(env, procs, kombu_conn, scripts):
    declare, consume = scripts
    run_script(procs, env, declare, json.dumps(
        {"exchange": "news", "type": "fanout", "bindings": [["news.a", ""], ["news.b", ""], ["news.c", ""]]}))
    conn = kombu_conn()
    # The publisher knows the exchange only by name and type, none of its queues.
    Producer(conn.default_channel, exchange=Exchange("news", "fanout")).publish("hello", serializer="json")
    for queue in ("news.a", "news.b", "news.c"):
        assert consume_elsewhere(procs, env, consume, queue, 1) == ["hello"]
    env.wait_count(None, 0)
