"""kombu_consume: N messages waiting; one consumer (prefetch 100) consumes and acks them all."""
from __future__ import annotations

from .. import messaging, procs

NAME = "kombu_consume"
KINDS = None
PARAMS = {"quick": {"n": 500, "prefetch": 100}, "full": {"n": 20000, "prefetch": 100}}


def run(env, p) -> dict:
    queue = env.queue("cons")
    within = 60 + p["n"] / 20
    procs.call(messaging.publish, env.endpoint, queue, p["n"], timeout=within)  # the backlog: untimed
    result = procs.call(messaging.consume, env.endpoint, queue, p["n"], prefetch=p["prefetch"],
                        within=within, timeout=within + 30)
    env.check_settled(queue)
    return {"msgs_per_s": result["n"] / (result["end"] - result["start"])}
