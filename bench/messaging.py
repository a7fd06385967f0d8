"""Plain Kombu producers and consumers, run inside child processes by the scenarios.

Messages take the route Celery's take: a durable direct exchange named like the queue, persistent
delivery mode, JSON. Bodies are small (about 100 bytes) and carry the publisher's time.time(), so
that a consumer on the same machine can compute publish-to-receive latency.
"""
from __future__ import annotations

import socket
import time

from kombu import Exchange, Queue

PAD = "x" * 64



def paced(n: int, rate: float | None):
    """Yield 0..n-1, at ``rate`` per second if given (as fast as possible otherwise)."""
    start = time.time()
    for i in range(n):
        if rate:
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        yield i

def kombu_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def declare(endpoint, queue_name: str) -> None:
    with endpoint.connection() as conn:
        kombu_queue(queue_name)(conn.default_channel).declare()


def publish(endpoint, queue_name: str, n: int, rate: float | None = None,
            ready=None, go=None) -> dict:
    """Publish ``n`` messages, at ``rate`` per second if given, else as fast as possible.

    ``ready``/``go`` (events) let a caller start the clock once connections are set up.
    """
    queue = kombu_queue(queue_name)
    with endpoint.connection() as conn:
        channel = conn.default_channel
        queue(channel).declare()
        producer = conn.Producer(channel, serializer="json")
        if ready is not None:
            ready.set()
        if go is not None:
            go.wait()
        start = time.time()
        for i in paced(n, rate):
            producer.publish({"i": i, "t": time.time(), "pad": PAD}, exchange=queue.exchange,
                             routing_key=queue_name, delivery_mode=2, retry=False)
        end = time.time()
    return {"start": start, "end": end, "n": n}


def consume(endpoint, queue_name: str, n: int, prefetch: int = 100, within: float = 120,
            ready=None, latencies: bool = False) -> dict:
    """Consume and ack ``n`` messages.

    ``start`` is when consuming began (before the queue is declared); ``first`` is when the first
    message arrived; ``end`` is after the connection closed, since a transport may send acks in
    the background (kombu-pg batches them) and closing waits for them.
    """
    got = 0
    first = last_ack = None
    samples: list[float] = []

    def on_message(body, message):
        nonlocal got, first, last_ack
        now = time.time()
        first = first or now
        if latencies:
            samples.append(now - body["t"])
        message.ack()
        got += 1
        last_ack = time.time()

    with endpoint.connection() as conn:
        conn.ensure_connection(max_retries=3)
        start = time.time()
        with conn.Consumer(kombu_queue(queue_name), callbacks=[on_message],
                           prefetch_count=prefetch, accept=["json"]):
            if ready is not None:
                ready.set()
            deadline = time.monotonic() + within
            while got < n and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except socket.timeout:
                    pass
    end = time.time()
    if got < n:
        raise TimeoutError(f"consumed {got} of {n} messages within {within:.0f}s")
    return {"start": start, "first": first, "end": end, "last_ack": last_ack, "n": got, "latencies": samples}
