"""The scenarios, one module each. A scenario module has:

NAME, KINDS (the broker kinds it applies to, None for all), PARAMS ({"quick": {...}, "full": {...}})
and run(env, params) -> {metric: number}, measuring one broker in the isolated ``env`` of
bench/brokers.py. Metric names ending in _per_s are throughputs (higher is better); the others
(latencies in ms, memory in MB, counts) are better low or are context.
"""
from . import (celery_e2e, deep_queue, held_eta, kombu_concurrent, kombu_consume, kombu_publish,
               latency, pgbench_limit)

SCENARIOS = {module.NAME: module for module in (
    kombu_publish, kombu_consume, kombu_concurrent, latency, celery_e2e, deep_queue, held_eta,
    pgbench_limit)}
