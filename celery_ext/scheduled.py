"""``celery inspect scheduled`` for workers on this broker.

Celery lists the ETA and countdown tasks a worker holds in memory. Here the broker holds them
(a row stays invisible until due), so no worker does, and the command would answer ``[]``.
The worker's command therefore also lists, from the table, the delayed tasks (ETA, countdown,
retry backoff) of the queues it consumes, soonest first, in Celery's format, after those it
holds itself. Every worker consuming a queue lists its delayed tasks: any of them may run them.
"""
from __future__ import annotations

import base64
import json
import logging

from celery.worker import control
from kombu.serialization import loads, prepare_accept_content

from kombu_pg.transport import Transport

from . import patches

logger = logging.getLogger(__name__)

#: Delayed tasks listed per worker, at most (the reply is one message).
LIMIT = 1000


def list_delayed_tasks() -> None:
    """Replace the ``scheduled`` remote control command (celery_ext.patches)."""
    original = control.Panel.data.get("scheduled")
    if original is None or patches.is_ours(original):
        return

    def scheduled(state, **kwargs):
        held = original(state, **kwargs)
        transport = getattr(getattr(state.consumer, "connection", None), "transport", None)
        if not isinstance(transport, Transport):
            return held
        try:
            return held + from_table(state, transport, {entry["request"]["id"] for entry in held})
        except Exception as exc:  # the command still answers what the worker holds
            logger.warning("kombu_pg: inspect scheduled could not read the delayed tasks: %s", exc)
            return held

    scheduled.__doc__ = original.__doc__
    patches.mark(scheduled)
    # Panel.data is the registry every worker's pidbox dispatches from (and the alias's entry).
    for name, fun in list(control.Panel.data.items()):
        if fun is original:
            control.Panel.data[name] = scheduled


def from_table(state, transport, skip: set) -> list[dict]:
    consumer = state.consumer
    queues = sorted(q.name for q in consumer.task_consumer.queues) if consumer.task_consumer else []
    if not queues:
        return []
    db = transport.db
    rows = db.store.scheduled(db, queues=queues, limit=LIMIT)
    accept = prepare_accept_content(state.app.conf.accept_content)
    entries = []
    for message_id, queue, priority, visible_at, payload, delivery_count in rows:
        try:
            entry = _entry(json.loads(payload), queue, priority, visible_at, delivery_count,
                           consumer.hostname, accept)
        except Exception as exc:  # a row the worker would dead-letter when due
            logger.debug("kombu_pg: inspect scheduled skips message %s: %s", message_id, exc)
            continue
        if entry["request"]["id"] not in skip:
            entries.append(entry)
    return entries


def _entry(message: dict, queue, priority, visible_at, delivery_count, hostname, accept) -> dict:
    """As Celery's ``scheduled`` reports a request it holds (Request.info): the ETA is when the
    row becomes visible, the priority the message's."""
    headers, props = message.get("headers") or {}, message.get("properties") or {}
    args, kwargs = _arguments(message, headers, accept)
    info = props.get("delivery_info") or {}
    return {
        "eta": visible_at.isoformat(),
        "priority": priority,
        "request": {
            "id": headers["id"],
            "name": headers.get("task"),
            "args": args,
            "kwargs": kwargs,
            "type": headers.get("task"),
            "hostname": hostname,
            "time_start": None,
            "acknowledged": False,
            "delivery_info": {"exchange": info.get("exchange"), "routing_key": info.get("routing_key"),
                              "priority": props.get("priority"), "redelivered": delivery_count > 0,
                              "queue": queue},
            "worker_pid": None,
        },
    }


def _arguments(message: dict, headers: dict, accept):
    """The task's args and kwargs, decoded as the worker would (only the app's accepted content
    types: nothing else is unpickled here); their reprs if that fails."""
    try:
        body = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = loads(body, message.get("content-type"), message.get("content-encoding"),
                        accept=accept)
        if isinstance(decoded, (list, tuple)) and len(decoded) == 3:  # protocol 2
            return decoded[0], decoded[1]
        return decoded.get("args"), decoded.get("kwargs")  # protocol 1
    except Exception:
        return headers.get("argsrepr"), headers.get("kwargsrepr")
