"""latency: an idle subscribed consumer; messages published at a fixed rate; publish-to-receive.

The consumer is left idle for a moment before the first message, so that what is measured is
how fast a waiting consumer is woken (LISTEN/NOTIFY for kombu-pg, polling for SQLAlchemy).
"""
from __future__ import annotations

import time

from .. import messaging, procs, stats

NAME = "latency"
KINDS = None
PARAMS = {"quick": {"rate": 100, "seconds": 2, "idle": 1.0},
          "full": {"rate": 100, "seconds": 10, "idle": 2.0}}


def run(env, p) -> dict:
    queue = env.queue("lat")
    messaging.declare(env.endpoint, queue)
    n = int(p["rate"] * p["seconds"])
    ready = procs.CTX.Event()
    with procs.child(messaging.consume, env.endpoint, queue, n, prefetch=100,
                     within=p["seconds"] + 60, ready=ready, latencies=True) as consumer:
        if not ready.wait(60):
            raise TimeoutError("consumer not ready within 60s")
        time.sleep(p["idle"])
        procs.call(messaging.publish, env.endpoint, queue, n, rate=p["rate"], timeout=p["seconds"] + 60)
        got = consumer.result(90)
    env.check_settled(queue)
    return stats.latency_ms(got["latencies"])
