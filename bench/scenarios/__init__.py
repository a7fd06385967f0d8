"""The scenarios, one module each. A scenario module has:

NAME, KINDS (the broker kinds it applies to, None for all), PARAMS ({"quick": {...}, "full": {...}})
and run(env, params) -> {metric: number}, measuring one broker in the isolated ``env`` of
bench/brokers.py; or -> ({metric: number}, details), details being JSON kept with the run
(per-window series; a "server" entry describes a server the scenario started for itself). Metric names ending in _per_s are throughputs (higher is better); the others
(latencies in ms, memory in MB, counts) are better low or are context.
"""
from . import (celery_e2e, deep_queue, held_eta, idle, kombu_concurrent, kombu_consume,
               kombu_publish, latency, pgbench_limit, producers, soak)

SCENARIOS = {module.NAME: module for module in (
    kombu_publish, kombu_consume, kombu_concurrent, latency, celery_e2e, producers, deep_queue,
    held_eta, pgbench_limit, soak, idle)}
