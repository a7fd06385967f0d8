"""How a Kombu message lives in a row: the statement parameters of a publish, and the message
a claimed row becomes again (delivery tag, delivery info, checks of what the row holds).

Pure functions over the JSON envelope Kombu builds; the channel runs the statements.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Mapping

from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

MAX_PRIORITY = 255
#: Header carrying a per-message delivery cap (the Celery integration sets it from the task).
MAX_ATTEMPTS_HEADER = "x-kombu-pg-max-attempts"
#: Deduplication: while a message with this key waits or runs in the queue, another one with
#: the same key is dropped, or, with the mode header set to "replace", replaces the waiting one.
UNIQUE_KEY_HEADER = "x-kombu-pg-unique-key"
UNIQUE_MODE_HEADER = "x-kombu-pg-unique-mode"

JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


class UndecodableMessage(ValueError):
    """A stored row that cannot become a Kombu message (a producer bug or a corrupted row)."""


class Claimed(list):
    """The messages of one claim. ``rows`` counts every row it took, undecodable ones included:
    a claim that came back full means more may be waiting, whatever became of its rows."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows


def parse_tag(delivery_tag: str) -> tuple[int, str | None]:
    """Delivery tags are ``<row id>:<lease token>``: acks need no channel state, so they still
    apply after a reconnect, and only the holder of the lease can settle it."""
    message_id, _, token = str(delivery_tag).partition(":")
    return int(message_id), (token if token and token != "-" else None)


# -- publishing -----------------------------------------------------------------------------

def parse_eta(value) -> dt.datetime | None:
    if not value:
        return None
    try:
        eta = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        logger.warning("kombu_pg: ignoring unparsable eta header %r: message is visible now", value)
        return None
    return eta if eta.tzinfo else eta.replace(tzinfo=dt.timezone.utc)


def publish_params(message: dict, notify_channel: str) -> dict[str, Any]:
    """The parameters of a publish statement for Kombu's ``message`` (its envelope)."""
    props = message["properties"]
    try:
        priority = min(max(int(props.get("priority") or 0), 0), MAX_PRIORITY)
    except (TypeError, ValueError):
        priority = 0
    expiration = props.get("expiration")
    headers = message.get("headers") or {}
    max_attempts = headers.get(MAX_ATTEMPTS_HEADER)
    unique_key = headers.get(UNIQUE_KEY_HEADER, props.get(UNIQUE_KEY_HEADER))
    return {
        "unique_key": str(unique_key) if unique_key is not None else None,
        "unique_replace": (headers.get(UNIQUE_MODE_HEADER) or props.get(UNIQUE_MODE_HEADER)) == "replace",
        "task_id": headers.get("id"),
        "task_name": headers.get("task"),
        "max_attempts": int(max_attempts) if max_attempts else None,
        "priority": priority,
        # Celery's eta/countdown: the row stays invisible until due, so no worker holds it.
        "eta": parse_eta((message.get("headers") or {}).get("eta")),
        "ttl_ms": float(expiration) if expiration is not None else None,
        "payload": dumps(message),
        "channel": notify_channel,
    }


# -- consuming ------------------------------------------------------------------------------

def load_envelope(payload: str) -> dict:
    # Kombu's loads() builds a decoder and calls a Python hook for every object, to revive the
    # {"__type__": ..., "__value__": ...} objects its dumps() writes for datetimes, UUIDs and
    # the like. Envelopes rarely hold one (the body is a string inside): decode them plainly
    # unless the marker appears as a key.
    return loads(payload) if '"__type__"' in payload else json.loads(payload)


def mark_expired(message: dict, expired_for: float) -> None:
    """A Celery task the database found expired ``expired_for`` seconds ago. Celery's worker
    marks a task REVOKED when its ``expires`` header has passed by the worker's own clock: the
    header says when, in that clock, so that a clock behind the database's cannot make it run.
    (A task expired by the queue's x-message-ttl gets the header it lacked.)"""
    expired_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=expired_for)
    message.setdefault("headers", {})["expires"] = expired_at.isoformat()


def check_envelope(message, codecs: Mapping[str, Any]) -> None:
    """Raise UndecodableMessage unless ``message`` can become a Kombu message (``codecs``: the
    channel's body encodings)."""
    if not isinstance(message, dict):
        kind = JSON_TYPES.get(type(message), type(message).__name__)
        raise UndecodableMessage(f"the payload is a JSON {kind}, not an object")
    props = message.get("properties")
    if not isinstance(props, dict):
        raise UndecodableMessage("'properties' is missing or not an object")
    if props.get("delivery_info") is not None and not isinstance(props["delivery_info"], dict):
        raise UndecodableMessage("'properties.delivery_info' is not an object")
    if message.get("headers") is not None and not isinstance(message["headers"], dict):
        raise UndecodableMessage("'headers' is not an object")
    for key in ("content-type", "content-encoding"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise UndecodableMessage(f"'{key}' is not a string")
    body, encoding = message.get("body"), props.get("body_encoding")
    if not isinstance(body, str):
        raise UndecodableMessage("'body' is missing or not a string")
    if encoding is not None and not isinstance(encoding, str):
        raise UndecodableMessage("'properties.body_encoding' is not a string")
    if body and encoding and encoding.lower() != "utf-8":
        if encoding not in codecs:
            raise UndecodableMessage(f"unknown body_encoding {encoding!r}")
        try:  # as Kombu's Message will (a binary body is decoded twice: rare, and cheap)
            codecs[encoding].decode(body)
        except Exception as exc:
            raise UndecodableMessage(f"the body is not valid {encoding}: {exc}") from None


def to_message(queue: str, codecs: Mapping[str, Any], message_id: int, token: str | None,
               delivery_count: int, priority: int, payload: str, released: bool,
               expired_for: float | None, revoked: bool) -> dict:
    """The Kombu message of a claimed row (raises UndecodableMessage, or whatever decoding the
    payload raised)."""
    message = load_envelope(payload)
    check_envelope(message, codecs)
    props = message["properties"]
    if expired_for is not None:
        mark_expired(message, expired_for)
    props["delivery_tag"] = f"{message_id}:{token or '-'}"
    info = props.get("delivery_info")
    if info is None:
        info = props["delivery_info"] = {}
    info["redelivered"] = delivery_count > 1 or released
    # Celery hooks read these from request.properties['delivery_info'].
    info[DELIVERY_KEY] = {"id": message_id, "token": str(token) if token else None,
                        "queue": queue, "delivery_count": delivery_count}
    task_id = (message.get("headers") or {}).get("id")
    if revoked:  # revoked durably (kombu_pg.revocation): the Celery integration drops it
        info[DELIVERY_KEY]["revoked"] = True
        logger.info("kombu_pg: message %s of queue %r carries task %s, which was revoked",
                    message_id, queue, task_id)
    if info["redelivered"]:
        logger.info("kombu_pg: redelivered message %s (task %s) of queue %r, attempt %d",
                    message_id, task_id, queue, delivery_count)
    else:
        logger.debug("kombu_pg: delivered message %s (task %s) of queue %r, attempt %d",
                     message_id, task_id, queue, delivery_count)
    return message


#: The key of ``delivery_info`` under which a claimed message carries its row: id, lease token,
#: queue, delivery count and the revoked flag (see to_message). Settling, retries, dead letters
#: and metrics read it through ``delivery`` and ``queue_of``.
DELIVERY_KEY = "kombu_pg"


def delivery(info: dict | None) -> dict:
    """Our part of a message's ``delivery_info``; empty for a message of another broker."""
    return (info or {}).get(DELIVERY_KEY) or {}


def queue_of(info: dict | None) -> str:
    """The queue a message was claimed from (another broker's: its routing key)."""
    return delivery(info).get("queue") or (info or {}).get("routing_key") or ""
