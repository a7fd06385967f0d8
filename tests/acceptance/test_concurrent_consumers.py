"""Competing consumers: every message delivered exactly once."""
from __future__ import annotations

import collections
import json
import sys

import pytest
from kombu import Exchange, Producer, Queue

from conftest import wait_for, write_script

CONSUMER = """
import json, os, sys, time
import kombu

url, options, queue_name, out, stop = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
seen = []
with kombu.Connection(url, transport_options=options) as conn:
    queue = kombu.Queue(queue_name, kombu.Exchange(queue_name, "direct"), routing_key=queue_name)

    def on_message(body, message):
        seen.append(body["i"])
        message.ack()

    with kombu.Consumer(conn, queues=[queue], callbacks=[on_message], accept=["json"], prefetch_count=50):
        open(out + ".ready", "w").close()
        deadline = time.monotonic() + 300  # bounded even if the test process dies
        while not os.path.exists(stop) and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
with open(out, "w") as f:
    json.dump(seen, f)
"""

TOTAL = 10_000
CONSUMERS = 4


@pytest.mark.slow
def test_four_consumers_drain_10000_messages_exactly_once(env, procs, kombu_conn, tmp_path):
    script = write_script(tmp_path, "consumer.py", CONSUMER)
    queue_name = "bulk"
    conn = kombu_conn()
    queue = Queue(queue_name, Exchange(queue_name, "direct"), routing_key=queue_name)
    queue(conn.default_channel).declare()
    stop = tmp_path / "stop"
    outs = [tmp_path / f"consumer{i}.json" for i in range(CONSUMERS)]
    consumers = [procs.spawn([sys.executable, str(script), env.url, json.dumps(env.transport_options),
                              queue_name, str(out), str(stop)], name=f"consumer{i}")
                 for i, out in enumerate(outs)]
    wait_for(lambda: all((tmp_path / f"{out.name}.ready").exists() for out in outs), 30,
             what="the consumers to start consuming")

    producer = Producer(conn.default_channel, exchange=queue.exchange, routing_key=queue_name, serializer="json")
    for i in range(TOTAL):
        producer.publish({"i": i})

    wait_for(lambda: env.message_count(queue_name) == 0, 180, interval=0.5, what="the queue to drain")
    stop.touch()
    for consumer in consumers:
        assert consumer.wait_exit(30) == 0, consumer.log()

    per_consumer = [json.loads(out.read_text()) for out in outs]
    delivered = [i for ids in per_consumer for i in ids]
    duplicates = {i: n for i, n in collections.Counter(delivered).items() if n > 1}
    assert not duplicates, f"{len(duplicates)} messages delivered more than once"
    missing = set(range(TOTAL)) - set(delivered)
    assert not missing, f"{len(missing)} messages never delivered"
    assert len(delivered) == TOTAL
    # All four took part (competing consumers, not one draining everything).
    assert all(ids for ids in per_consumer), [len(ids) for ids in per_consumer]
