"""Kombu-level semantics: priority, expiration, counts, purge, delete, reject/requeue."""
from __future__ import annotations

import datetime
import json
import time
from queue import Empty

import pytest
from kombu import Consumer, Exchange, Producer, Queue

from conftest import dead_letters


def declare(conn, name: str, **kwargs) -> Queue:
    queue = Queue(name, Exchange(name, "direct"), routing_key=name, **kwargs)
    queue(conn.default_channel).declare()
    return queue


def publish(conn, queue: Queue, body, **kwargs) -> None:
    Producer(conn.default_channel).publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                                           serializer="json", **kwargs)


def take(conn, queue: Queue, count: int, timeout: float = 10.0, prefetch: int | None = None) -> list:
    """Receive ``count`` messages on a consumer without acking them (they stay leased)."""
    received = []
    consume_until(conn, queue, lambda body, message: received.append(message), prefetch,
                  lambda: len(received) >= count, timeout)
    assert len(received) >= count, f"received {len(received)} of {count} messages"
    return received


def consume_until(conn, queue: Queue, on_message, prefetch: int | None, done, timeout: float = 60) -> None:
    """Run a consumer calling ``on_message(body, message)`` until ``done()``, then cancel it."""
    consumer = Consumer(conn.default_channel, queues=[queue], accept=["json"], callbacks=[on_message],
                        prefetch_count=prefetch)
    consumer.consume()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
    consumer.cancel()


def ready_count(conn, queue: Queue) -> int:
    return conn.default_channel.queue_declare(queue=queue.name, passive=True).message_count


def test_priority_higher_first(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "prio")
    for priority in (1, 9, 0, 5, 9, 3):
        publish(conn, queue, {"p": priority}, priority=priority)
    simple = conn.SimpleQueue(queue)
    order = []
    for _ in range(6):
        message = simple.get(timeout=5)
        order.append(message.payload["p"])
        message.ack()
    assert order == [9, 9, 5, 3, 1, 0]
    env.wait_count("prio", 0)


def test_message_round_trips_unchanged(env, kombu_conn):
    """Body, headers and properties come back as sent: non-ASCII text, quotes, backslashes,
    numbers, booleans, NULLs, through both the direct and the routed publish."""
    conn = kombu_conn()
    queue = declare(conn, "round")
    body = {"text": "héllo 'wörld' \\ \"ok\" \u2603 \U0001f600", "n": 10 ** 15, "f": 0.1, "b": False,
            "none": None, "list": [1, "二"]}
    # A datetime goes through Kombu's JSON as a typed object and must come back a datetime.
    headers = {"h": "ünïcode", "n": 3, "nested": {"k": [True, None]},
               "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)}
    publish(conn, queue, body, headers=headers, priority=7, expiration=60)
    Producer(conn.default_channel).publish(body, routing_key="round", serializer="json")  # direct
    simple = conn.SimpleQueue(queue)
    for routed in (True, False):
        message = simple.get(timeout=5)
        assert message.payload == body
        if routed:
            assert message.headers == headers
            assert message.properties["priority"] == 7
        message.ack()
    env.wait_count("round", 0)


def test_text_bodies_stored_as_text_binary_ones_as_base64(env, kombu_conn):
    """A JSON body goes into the stored envelope as it is; a binary one (compressed) as base64.
    Both come back as sent."""
    conn = kombu_conn()
    queue = declare(conn, "bodies")
    publish(conn, queue, {"plain": "é"})
    publish(conn, queue, {"zipped": "é" * 100}, compression="zlib")
    stored = [json.loads(row["payload"]) for row in env.messages("bodies")]
    assert [m["properties"]["body_encoding"] for m in stored] == [None, "base64"]
    assert json.loads(stored[0]["body"]) == {"plain": "é"}
    simple = conn.SimpleQueue(queue)
    got = [simple.get(timeout=5) for _ in range(2)]
    assert [m.payload for m in got] == [{"plain": "é"}, {"zipped": "é" * 100}]
    for message in got:
        message.ack()


def test_message_expiration(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "ttl")
    publish(conn, queue, "short", expiration=0.5)
    publish(conn, queue, "long")
    publish(conn, queue, "longer", expiration=60)
    time.sleep(1.0)  # the condition under test is the passing of time
    simple = conn.SimpleQueue(queue)
    got = []
    for _ in range(2):
        message = simple.get(timeout=5)
        got.append(message.payload)
        message.ack()
    assert sorted(got) == ["long", "longer"]
    with pytest.raises(Empty):
        simple.get(timeout=0.5)


def test_queue_declare_counts_ready_messages(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "counts")
    assert ready_count(conn, queue) == 0
    for i in range(5):
        publish(conn, queue, i)
    assert ready_count(conn, queue) == 5
    other = kombu_conn()
    held = take(other, queue, 2, prefetch=2)
    # Like AMQP's message_count: leased (unacked) messages are not counted.
    assert ready_count(conn, queue) == 3
    env.wait_count("counts", 5)
    for message in held:
        message.ack()
    assert ready_count(conn, queue) == 3
    env.wait_count("counts", 3)


def test_purge_removes_ready_only(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "purgeq")
    for i in range(6):
        publish(conn, queue, i)
    other = kombu_conn()
    held = take(other, queue, 2, prefetch=2)
    purged = queue(conn.default_channel).purge()
    assert purged == 4
    rows = env.messages("purgeq")
    assert len(rows) == 2
    assert all(row["lease_token"] is not None for row in rows)
    # The leased ones are still the consumer's to settle.
    for message in held:
        message.ack()
    env.wait_count("purgeq", 0)


def test_queue_delete(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "gone")
    for i in range(3):
        publish(conn, queue, i)
    assert "gone" in env.queue_names()
    queue(conn.default_channel).delete()
    assert "gone" not in env.queue_names()
    env.wait_count("gone", 0)
    # The binding went with the queue: a new publish is not stored for it.
    publish(conn, queue, "late")
    env.wait_count("gone", 0)
    with pytest.raises(Exception):
        conn.default_channel.queue_declare(queue="gone", passive=True)


def test_reject_requeue_releases_same_row(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "requeue")
    publish(conn, queue, "once")
    [before] = env.messages("requeue")
    simple = conn.SimpleQueue(queue)
    message = simple.get(timeout=5)
    assert message.delivery_info.get("redelivered") is False
    [leased] = env.messages("requeue")
    assert leased["id"] == before["id"] and leased["lease_token"] is not None and leased["invisible"]
    message.reject(requeue=True)
    rows = env.messages("requeue")
    assert len(rows) == 1, rows
    assert rows[0]["id"] == before["id"]
    # Kombu's requeue is an immediate redelivery: the same row, visible again at once.
    assert rows[0]["lease_token"] is None and not rows[0]["invisible"], rows
    assert rows[0]["delivery_count"] == 1 and rows[0]["errors"] == []  # counted, not a failure
    again = simple.get(timeout=15)
    assert again.payload == "once"
    assert again.delivery_info.get("redelivered") is True
    again.ack()
    env.wait_count("requeue", 0)
    with pytest.raises(Empty):
        simple.get(timeout=0.3)


def test_requeued_message_is_redelivered_at_once(env, kombu_conn):
    """A plain Kombu consumer that requeues a message gets it back within 50 ms (median of 5
    tries, from the requeue call to the redelivery), flagged redelivered."""
    conn = kombu_conn()
    queue = declare(conn, "again")
    latencies, redelivered = [], []
    for attempt in range(5):
        publish(conn, queue, {"attempt": attempt})
        requeued_at: list[float] = []

        def on_message(body, message):
            if not requeued_at:
                requeued_at.append(time.monotonic())
                message.requeue()
            else:
                latencies.append(time.monotonic() - requeued_at[0])
                redelivered.append(message.delivery_info["redelivered"])
                message.ack()

        consume_until(conn, queue, on_message, 10, lambda: len(latencies) > attempt, timeout=10)
        assert len(latencies) == attempt + 1, f"try {attempt}: the requeued message did not come back"
    assert redelivered == [True] * 5
    assert sorted(latencies)[2] < 0.050, latencies
    env.wait_count("again", 0)


def test_consumer_that_always_requeues_ends_in_dead_letters(env, kombu_conn):
    """A requeue counts as a delivery: a consumer that requeues at every delivery stops
    getting the message after max_attempts deliveries, and it is in the dead letters."""
    conn = kombu_conn(max_attempts=3)
    queue = declare(conn, "loop")
    publish(conn, queue, "boomerang")
    deliveries = []

    def on_message(body, message):
        deliveries.append(message.delivery_info["kombu_pg"]["delivery_count"])
        message.requeue()

    consume_until(conn, queue, on_message, 1, lambda: dead_letters(env), timeout=10)
    [letter] = dead_letters(env)
    assert letter["reason"] == "max_attempts" and letter["queue"] == "loop"
    assert letter["attempts"] == 3 and letter["max_attempts"] == 3
    assert [e["type"] for e in letter["errors"]] == ["Requeued"]
    assert "requeued by the consumer" in letter["errors"][-1]["message"]
    assert json.loads(json.loads(letter["payload"])["body"]) == "boomerang"
    # Nothing is left to deliver: the consumer saw the message exactly max_attempts times.
    with pytest.raises(Empty):
        conn.SimpleQueue(queue).get(timeout=0.5)
    assert deliveries == [1, 2, 3]
    assert env.message_count("loop") == 0


def test_reject_without_requeue_deletes(env, kombu_conn):
    conn = kombu_conn()
    queue = declare(conn, "dead")
    publish(conn, queue, "x")
    simple = conn.SimpleQueue(queue)
    simple.get(timeout=5).reject()
    env.wait_count("dead", 0)


def test_closing_connection_gives_unacked_message_back(env, kombu_conn):
    conn = kombu_conn(visibility_timeout=1)
    queue = declare(conn, "vt")
    publish(conn, queue, "lease")
    first = kombu_conn(visibility_timeout=1)
    take(first, queue, 1, prefetch=1)
    first.release()  # closing gives the message back: released in place, no copy
    assert len(env.messages("vt")) == 1
    second = kombu_conn(visibility_timeout=1)
    simple = second.SimpleQueue(queue)
    message = simple.get(timeout=10)
    assert message.payload == "lease"
    assert message.delivery_info.get("redelivered") is True
    message.ack()
    env.wait_count("vt", 0)


def test_publish_survives_deallocated_statements(env, kombu_conn):
    """The publish statement is prepared once per connection; a session that lost it (DISCARD
    ALL by a pooler, DEALLOCATE ALL) prepares it again instead of failing the publish."""
    conn = kombu_conn(max_connections=1)  # the pool's one connection is the publisher's
    queue = declare(conn, "dealloc")
    publish(conn, queue, {"i": 1})
    with conn.default_channel.db.pool.connection() as pooled:
        pooled.execute("DEALLOCATE ALL")
    publish(conn, queue, {"i": 2})
    simple = conn.SimpleQueue(queue)
    got = sorted(simple.get(timeout=5).payload["i"] for _ in range(2))
    assert got == [1, 2]


def publish_many(conn, queue: Queue, count: int) -> None:
    producer = Producer(conn.default_channel)
    for i in range(count):
        producer.publish({"i": i}, exchange=queue.exchange, routing_key=queue.routing_key, serializer="json")


def test_consumer_holds_no_more_than_its_prefetch(env, kombu_conn):
    """A consumer that acks as it goes claims its next batch while delivering the current one;
    leased and not yet acked messages still never exceed the prefetch count."""
    conn = kombu_conn()
    queue = declare(conn, "window")
    publish_many(conn, queue, 600)
    acked: list[int] = []
    outstanding: list[int] = []

    def on_message(body, message):
        leased = [row["id"] for row in env.messages("window", where="lease_token IS NOT NULL")]
        outstanding.append(len(set(leased) - set(acked)))
        message.ack()
        acked.append(message.delivery_info["kombu_pg"]["id"])

    consume_until(conn, queue, on_message, 40, lambda: len(acked) >= 600)
    assert len(set(acked)) == len(acked) == 600  # each exactly once
    assert max(outstanding) <= 40
    env.wait_count("window", 0)


def test_cancelling_a_consumer_gives_back_what_it_claimed_ahead(env, kombu_conn):
    """Messages claimed for a consumer but not handed to it go back to the queue when it is
    cancelled, with the connection still open (not at the lease's expiry)."""
    conn = kombu_conn()
    queue = declare(conn, "cancelled")
    publish_many(conn, queue, 500)
    received = []

    def on_message(body, message):
        message.ack()
        received.append(body["i"])

    consume_until(conn, queue, on_message, 100, lambda: len(received) >= 130)
    env.wait_count("cancelled", 500 - len(received))
    left = env.messages("cancelled")
    assert all(row["lease_token"] is None and not row["invisible"] for row in left)
    rest = [message.payload["i"] for message in take(kombu_conn(), queue, len(left))]
    assert sorted(received + rest) == list(range(500))


def test_connecting_readies_the_pool_so_publishes_share_one_connection(env, kombu_conn):
    # Connecting waits for the pool's first server connection. Were the first publish to ask
    # for it while it is still being opened, the pool would open a second one meanwhile.
    conn = kombu_conn()
    conn.connect()
    queue = declare(conn, "first_publish")
    for n in range(3):
        publish(conn, queue, {"n": n})
    assert conn.transport.db.pool.get_stats()["pool_size"] == 1
    assert ready_count(conn, queue) == 3
