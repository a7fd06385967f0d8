"""kombu_publish: one producer process publishes N small persistent messages as fast as it can."""
from __future__ import annotations

from .. import messaging, procs

NAME = "kombu_publish"
KINDS = None  # every broker
PARAMS = {"quick": {"n": 500}, "full": {"n": 20000}}


def run(env, p) -> dict:
    queue = env.queue("pub")
    result = procs.call(messaging.publish, env.endpoint, queue, p["n"], timeout=60 + p["n"] / 20)
    return {"msgs_per_s": result["n"] / (result["end"] - result["start"])}
