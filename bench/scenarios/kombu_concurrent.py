"""kombu_concurrent: one producer and one consumer process at once; end-to-end msgs/s.

The clock runs from the producer's first publish to the consumer's last ack; both processes
are connected (and the consumer subscribed) before the producer is let go.
"""
from __future__ import annotations

from .. import messaging, procs

NAME = "kombu_concurrent"
KINDS = None
PARAMS = {"quick": {"n": 500, "prefetch": 100}, "full": {"n": 20000, "prefetch": 100}}


def run(env, p) -> dict:
    queue = env.queue("conc")
    messaging.declare(env.endpoint, queue)
    within = 60 + p["n"] / 20
    consumer_ready, producer_ready, go = procs.CTX.Event(), procs.CTX.Event(), procs.CTX.Event()
    with procs.child(messaging.consume, env.endpoint, queue, p["n"], prefetch=p["prefetch"],
                     within=within, ready=consumer_ready) as consumer, \
         procs.child(messaging.publish, env.endpoint, queue, p["n"], ready=producer_ready, go=go) as producer:
        for event in (consumer_ready, producer_ready):
            if not event.wait(60):
                raise TimeoutError("producer or consumer not ready within 60s")
        go.set()
        sent = producer.result(within)
        got = consumer.result(within + 30)
    env.check_settled(queue)
    elapsed = got["end"] - sent["start"]
    return {"msgs_per_s": p["n"] / elapsed,
            "publish_per_s": p["n"] / (sent["end"] - sent["start"])}
