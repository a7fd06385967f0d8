"""Kombu transport keeping messages in PostgreSQL rows with visibility leases.

Publishing inserts a row (one per bound queue) and wakes consumers with NOTIFY. Consuming
claims ready rows in bulk with ``FOR UPDATE SKIP LOCKED``, leasing each one: the row stays in
the table, invisible to other consumers, until the consumer acks (deletes) or releases it, or
the lease expires and the row becomes deliverable again. Exchanges and bindings are rows too,
so routing works across processes.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import socket
from queue import Empty
from time import monotonic, sleep

import psycopg
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual.exchange import TopicExchange
from kombu.utils.json import dumps, loads
from psycopg_pool import PoolTimeout

from . import atomic, config, counters, database, green
from .database import error_entry
from .listener import Listener

logger = logging.getLogger(__name__)

MAX_PRIORITY = 255
#: Header carrying a per-message delivery cap (the Celery integration sets it from the task).
MAX_ATTEMPTS_HEADER = "x-kombu-pg-max-attempts"
#: Deduplication: while a message with this key waits or runs in the queue, another one with
#: the same key is dropped, or, with the mode header set to "replace", replaces the waiting one.
UNIQUE_KEY_HEADER = "x-kombu-pg-unique-key"
UNIQUE_MODE_HEADER = "x-kombu-pg-unique-mode"
#: A worker whose Celery integration is not installed (``kombu_pg.pth`` not processed: the
#: package is not in this interpreter's site-packages, or Python runs with -S).
NO_INTEGRATION = ("kombu-pg: the broker is PostgreSQL but the Celery integration is not installed in "
                  "this worker: tasks run without lease renewal, server-side retries or dead letters. "
                  "It installs itself at interpreter start through kombu_pg.pth: install kombu-pg "
                  "into this Python's site-packages")
#: A broadcast queue whose messages expire this soon (x-message-ttl), auto-delete and not
#: durable (Celery's gossip and event-receiver queues), gets no wake-ups: its consumer claims it
#: every half of that TTL, at most every polling_interval (the same rule as the publish_routed
#: statement's).
POLLED_TTL_MS = 10_000
#: Wake-ups name the queue in a NOTIFY payload, "<ms until visible> <queue>", which PostgreSQL
#: limits to fewer than 8000 bytes; the delay takes up to 20 (a bigint and the space).
MAX_QUEUE_NAME_BYTES = 8000 - 1 - 20
#: The lease holder's name as the claim records it (a column: no need to fit application_name).
LEASE_HOLDER_BYTES = 255


def parse_tag(delivery_tag: str) -> tuple[int, str | None]:
    """Delivery tags are ``<row id>:<lease token>``: acks need no channel state, so they still
    apply after a reconnect, and only the holder of the lease can settle it."""
    message_id, _, token = str(delivery_tag).partition(":")
    return int(message_id), (token if token and token != "-" else None)


def _load_envelope(payload: str) -> dict:
    # Kombu's loads() builds a decoder and calls a Python hook for every object, to revive the
    # {"__type__": ..., "__value__": ...} objects its dumps() writes for datetimes, UUIDs and
    # the like. Envelopes rarely hold one (the body is a string inside): decode them plainly
    # unless the marker appears as a key.
    return loads(payload) if '"__type__"' in payload else json.loads(payload)


def _mark_expired(message: dict, expired_for: float) -> None:
    """A Celery task the database found expired ``expired_for`` seconds ago. Celery's worker
    marks a task REVOKED when its ``expires`` header has passed by the worker's own clock: the
    header says when, in that clock, so that a clock behind the database's cannot make it run.
    (A task expired by the queue's x-message-ttl gets the header it lacked.)"""
    expired_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=expired_for)
    message.setdefault("headers", {})["expires"] = expired_at.isoformat()


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


def _parse_eta(value) -> dt.datetime | None:
    if not value:
        return None
    try:
        eta = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        logger.warning("kombu_pg: ignoring unparsable eta header %r: message is visible now", value)
        return None
    return eta if eta.tzinfo else eta.replace(tzinfo=dt.timezone.utc)


class QoS(virtual.QoS):
    """Prefetch accounting from the base class; settling goes to the database by lease."""

    def append(self, message, delivery_tag):
        super().append(message, delivery_tag)
        message_id, token = parse_tag(delivery_tag)
        self.channel.db.leases.hold(message_id, token)

    def ack(self, delivery_tag):
        message_id, token = parse_tag(delivery_tag)
        # The lease stays held (renewed) until the acker's delete reached the database.
        self.channel.db.acker.ack(message_id, token, self._queue_of(delivery_tag))
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        # Not the base class: it would publish a copy of the message. Requeued, the same row is
        # visible again at once, up to the delivery cap; not requeued, it goes to the dead
        # letters rather than vanishing.
        message_id, token = parse_tag(delivery_tag)
        db = self.channel.db
        if requeue:
            # Kombu's contract: delivered again at once (no backoff, unlike a failed attempt).
            # The delivery still counts, so a consumer that always requeues ends in the dead letters.
            db.requeue(message_id, token, self._queue_of(delivery_tag))
        else:
            db.dead_letter(message_id, token, "rejected",
                           error_entry("Rejected", "rejected without requeue by the consumer"))
        self._quick_ack(delivery_tag)

    def _queue_of(self, delivery_tag) -> str:
        message = self._delivered.get(delivery_tag)
        info = message.delivery_info if message is not None else {}
        return (info.get("kombu_pg") or {}).get("queue") or info.get("routing_key") or ""


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    max_priority = MAX_PRIORITY

    def __init__(self, connection, **kwargs):
        self.db = connection.db
        self.options = connection.options
        self._no_ack_queues: set[str] = set()
        self._auto_delete_queues: set[str] = set()
        super().__init__(connection, **kwargs)

    # -- publishing -------------------------------------------------------------------------

    def encode_body(self, body, encoding=None):
        # Text bodies (JSON, YAML: what Celery sends) go into the JSON envelope as they are:
        # base64 would make them a third bigger and cost an encode and a decode per message.
        # Binary ones (pickle, compressed) need it. Consumers decode by each message's own
        # body_encoding property, so rows written either way are read alike.
        if isinstance(body, str) and encoding == "base64":
            return body, None
        return super().encode_body(body, encoding)

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        self._inplace_augment_message(message, exchange, routing_key)
        params = self._publish_params(message)
        if exchange:
            statement, params = "publish_routed", dict(params, exchange=exchange, routing_key=routing_key)
        else:  # the default exchange: the routing key names the queue
            statement, params = "publish_direct", dict(params, queue=routing_key)
        external = atomic.current()
        if external is not None:  # inside enqueue_in(): the application's transaction
            queues = external.execute(getattr(self.db.q, statement), dict(params, notify=True)).fetchall()
        elif exchange and self.db.unroutable((exchange, routing_key)):
            queues = []  # as the last publish there: no queue takes it (Celery's idle heartbeats)
        else:
            notify = params["eta"] is not None or self.db.should_notify((exchange, routing_key))
            epoch = self.db.routing_epoch()
            queues = self.db.run(self.db.prepared[statement], dict(params, notify=notify), fetch=True)
            if exchange and not queues and params["unique_key"] is None:
                self.db.note_unroutable((exchange, routing_key), epoch)
        for queue, _ in queues:
            counters.add("published", queue)
        if not queues and params["unique_key"] is not None:
            counters.add("duplicates_dropped", params.get("queue") or exchange)
            logger.info("kombu_pg: message with unique key %r dropped: one is already waiting or "
                        "running", params["unique_key"])
        elif not queues and exchange:
            # As with AMQP, nothing stores it. A direct exchange without a queue is a routing
            # mistake worth a warning; events and broadcasts nobody listens to are normal.
            # Celery's control replies (reply.celery.pidbox) to a client that left are normal too.
            direct = (self.state.exchanges.get(exchange, {}).get("type", "direct") == "direct"
                      and not exchange.endswith("pidbox"))
            logger.log(logging.WARNING if direct else logging.DEBUG,
                       "kombu_pg: message to exchange %r with routing key %r matched no queue: "
                       "not stored", exchange, routing_key)

    def _publish_params(self, message) -> dict:
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
            "eta": _parse_eta((message.get("headers") or {}).get("eta")),
            "ttl_ms": float(expiration) if expiration is not None else None,
            "payload": dumps(message),
            "channel": self.options.notify_channel,
        }

    # -- consuming --------------------------------------------------------------------------

    def claim(self, queue: str, limit: int) -> Claimed:
        """Lease up to ``limit`` messages of ``queue`` (take them outright for no-ack consumers)."""
        return self.claimed(queue, self.db.run(*self._claim_statement(queue, limit), fetch=True))

    def start_claim(self, queue: str, limit: int):
        """:meth:`claim`, sent now: ``claimed(queue, pending.result())`` gives the messages."""
        return self.db.start(*self._claim_statement(queue, limit))

    def _claim_statement(self, queue: str, limit: int) -> tuple:
        statement = self.db.prepared["claim_no_ack" if queue in self._no_ack_queues else "claim"]
        return statement, {"queue": queue, "limit": limit,
                           "default_max_attempts": self.options.policy(queue)["max_attempts"],
                           "lease_seconds": self.options.visibility_timeout,
                           "held": self.db.leases.held_literal(),
                           "synchronous_commit": self.db.lease_commit,
                           # Who holds the lease, for `kombu-pg task`: "<worker name>[<pid>]".
                           "holder": config.client_name(LEASE_HOLDER_BYTES)}

    def claimed(self, queue: str, rows: list[tuple]) -> Claimed:
        """Messages from the claim's rows (libpq text: id, token, delivery count, priority,
        payload, released, seconds since it expired, revoked). A row that cannot become a message goes
        to the dead letters: it must not stop the consumer, nor hold up the other messages of its
        claim."""
        rows = [(int(id_), token, int(count), int(priority), payload, released == "t",
                 None if expired_for is None else float(expired_for), revoked == "t")
                for id_, token, count, priority, payload, released, expired_for, revoked in rows]
        rows.sort(key=lambda row: (-row[3], row[0]))  # RETURNING has no order
        messages, undecodable = Claimed(len(rows)), []
        for row in rows:
            try:
                messages.append(self._to_payload(queue, *row))
            except Exception as exc:  # whatever the row holds
                undecodable.append((row, exc))
        if messages:
            counters.add("delivered", queue, len(messages))
        for row, exc in undecodable:
            self._bury_undecodable(queue, row, exc)
        return messages

    def _bury_undecodable(self, queue, row, exc) -> None:
        message_id, token, delivery_count, priority, payload, *_ = row
        logger.error("kombu_pg: message %s of queue %r is not a valid Kombu message (%s: %s): "
                     "moving it to the dead letters", message_id, queue, type(exc).__name__, exc)
        error = error_entry(type(exc).__name__, f"not a valid Kombu message: {exc}")
        try:
            if token is None:  # a no-ack claim deleted the row already: keep what it returned
                self.db.dead_letter_taken(message_id, queue, priority, delivery_count, payload,
                                          "undecodable", error)
            else:
                self.db.dead_letter(message_id, token, "undecodable", error)
        except Exception as db_exc:  # never the consumer's end either
            logger.error("kombu_pg: could not dead-letter message %s (%s)%s", message_id, db_exc,
                         "" if token is None else ": it comes back when its lease expires")

    def _check_envelope(self, message) -> None:
        """Raise UndecodableMessage unless ``message`` can become a Kombu message."""
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
            if encoding not in self.codecs:
                raise UndecodableMessage(f"unknown body_encoding {encoding!r}")
            try:  # as Kombu's Message will (a binary body is decoded twice: rare, and cheap)
                self.decode_body(body, encoding)
            except Exception as exc:
                raise UndecodableMessage(f"the body is not valid {encoding}: {exc}") from None

    def _to_payload(self, queue, message_id, token, delivery_count, priority, payload, released,
                    expired_for, revoked) -> dict:
        message = _load_envelope(payload)
        self._check_envelope(message)
        props = message["properties"]
        if expired_for is not None:
            _mark_expired(message, expired_for)
        props["delivery_tag"] = f"{message_id}:{token or '-'}"
        info = props.get("delivery_info")
        if info is None:
            info = props["delivery_info"] = {}
        info["redelivered"] = delivery_count > 1 or released
        # Celery hooks read these from request.properties['delivery_info'].
        info["kombu_pg"] = {"id": message_id, "token": str(token) if token else None,
                            "queue": queue, "delivery_count": delivery_count}
        task_id = (message.get("headers") or {}).get("id")
        if revoked:  # revoked durably (kombu_pg.revocation): the Celery integration drops it
            info["kombu_pg"]["revoked"] = True
            logger.info("kombu_pg: message %s of queue %r carries task %s, which was revoked",
                        message_id, queue, task_id)
        if info["redelivered"]:
            logger.info("kombu_pg: redelivered message %s (task %s) of queue %r, attempt %d",
                        message_id, task_id, queue, delivery_count)
        else:
            logger.debug("kombu_pg: delivered message %s (task %s) of queue %r, attempt %d",
                         message_id, task_id, queue, delivery_count)
        return message

    def _get(self, queue, timeout=None):
        while True:
            messages = self.claim(queue, 1)
            if messages:
                return messages[0]
            if not messages.rows:  # else the row went to the dead letters: look again
                raise Empty()

    def basic_get(self, queue, no_ack=False, **kwargs):
        if not no_ack:
            return super().basic_get(queue, no_ack=False, **kwargs)
        self._no_ack_queues.add(queue)
        try:
            return super().basic_get(queue, no_ack=True, **kwargs)
        finally:
            if queue not in self._active_queues:
                self._no_ack_queues.discard(queue)

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        if no_ack:
            self._no_ack_queues.add(queue)
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.connection.wake([queue])  # messages may be waiting already

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue and queue not in self._active_queues:
            self.connection.release_buffered(queue)  # claimed for a consumer that is gone
            self._no_ack_queues.discard(queue)
            if not self.connection.consumed_queues():
                self.db.housekeeper.stopped(self.connection)
            if queue in self._auto_delete_queues:  # as RabbitMQ: the last consumer took it along
                self.queue_delete(queue)

    def _restore(self, message):
        """Give an unacked message back (channel closed, recover): release its lease, in place.

        A message whose task is still running keeps its lease (and its renewal): the connection
        was lost under a running task, which will still ack it after the reconnect.
        """
        message_id, token = parse_tag(message.delivery_tag)
        probe = Transport.in_progress
        if probe is not None and probe(message):
            logger.info("kombu_pg: message %s is still being processed: keeping its lease", message_id)
            return
        try:
            if self.db.run(self.db.q.release, {"ids": [message_id], "tokens": [token],
                                               "channel": self.options.notify_channel}, fetch=True):
                counters.add("released", (message.delivery_info.get("kombu_pg") or {}).get("queue", ""))
            logger.info("kombu_pg: released message %s (task %s) unprocessed, back in queue %r",
                        message_id, (message.headers or {}).get("id"),
                        (message.delivery_info.get("kombu_pg") or {}).get("queue"))
        except database.CONNECTION_ERRORS as exc:
            logger.warning("kombu_pg: could not release message %s (%s): it is redelivered when "
                           "its lease expires", message_id, exc)
        finally:
            self.db.leases.forget([message_id])

    # -- queues -----------------------------------------------------------------------------

    def prepare_queue_arguments(self, arguments, **kwargs):
        # Keep expires/message_ttl as x-expires/x-message-ttl: the base class drops them, and
        # the queues of dead workers and exited event receivers would then live forever.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue, durable=True, auto_delete=False, arguments=None, **kwargs):
        _check_queue_name(queue)
        arguments = arguments or {}
        overrides = self.options.queue_options.get(queue, {})
        self.db.run(self.db.q.declare_queue, {
            "queue": queue, "durable": bool(durable), "auto_delete": bool(auto_delete),
            "expires_ms": arguments.get("x-expires"), "message_ttl_ms": arguments.get("x-message-ttl"),
            # Stored with the queue so that reapers in other processes apply the same policy.
            "max_attempts": overrides.get("max_attempts"), "backoff_base": overrides.get("backoff_base"),
            "backoff_cap": overrides.get("backoff_cap"),
        })
        if auto_delete:
            self._auto_delete_queues.add(queue)
        interval = self.polled_interval(durable, auto_delete, arguments.get("x-message-ttl"))
        if interval is not None:
            self.connection.polled_queues[queue] = interval

    def polled_interval(self, durable, auto_delete, message_ttl_ms) -> float | None:
        """How often a consumer claims a short-lived broadcast queue, which producers do not
        wake (see POLLED_TTL_MS); None for every other queue."""
        if durable or not auto_delete or message_ttl_ms is None or float(message_ttl_ms) > POLLED_TTL_MS:
            return None
        return min(float(message_ttl_ms) / 2000, self.options.polling_interval)

    def _has_queue(self, queue, **kwargs):
        return self.db.run(self.db.q.has_queue, {"queue": queue}, fetch=True)[0][0]

    def _size(self, queue):
        return self.db.run(self.db.q.size, {"queue": queue}, fetch=True)[0][0]

    def _purge(self, queue):
        return self.db.run(self.db.q.purge, {"queue": queue})

    def _delete(self, queue, *args, **kwargs):
        self.db.run(self.db.q.delete_queue, {"queue": queue})

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)
        self._auto_delete_queues.discard(queue)
        self.connection.polled_queues.pop(queue, None)

    # -- exchanges and bindings -------------------------------------------------------------

    def exchange_declare(self, exchange=None, type="direct", durable=False, auto_delete=False,
                         arguments=None, nowait=False, passive=False):
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        if passive:
            if self._stored_exchange_type(exchange) is None:
                raise ChannelError(f"NOT_FOUND - no exchange {exchange!r}", (50, 10),
                                   "Channel.exchange_declare", "404")
            return
        if type not in self.exchange_types:
            raise NotImplementedError(f"kombu_pg supports direct, topic and fanout exchanges, not {type!r}")
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait)
        self.db.run(self.db.q.declare_exchange, {"exchange": exchange, "type": type,
                                                 "durable": bool(durable), "auto_delete": bool(auto_delete)})

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.db.run(self.db.q.delete_exchange, {"exchange": exchange})
        self.state.exchanges.pop(exchange, None)

    def _stored_exchange_type(self, exchange) -> str | None:
        rows = self.db.run(self.db.q.exchange_type, {"exchange": exchange}, fetch=True)
        return rows[0][0] if rows else None

    def typeof(self, exchange, default="direct"):
        local = self.state.exchanges.get(exchange)
        type = local["type"] if local else (self._stored_exchange_type(exchange) or default)
        return self.exchange_types[type]

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        exchange_type = self.typeof(exchange).type
        if exchange not in self.state.exchanges:
            # Bound without a declare in this process: make sure routing knows its type.
            self.db.run(self.db.q.declare_exchange, {"exchange": exchange, "type": exchange_type,
                                                     "durable": True, "auto_delete": False})
        pattern = TopicExchange(self).key_to_pattern(routing_key) if exchange_type == "topic" else ""
        self.db.run(self.db.q.bind, {"exchange": exchange, "routing_key": routing_key or "",
                                     "pattern": pattern, "queue": queue,
                                     "channel": self.options.notify_channel})
        self.db.bound()
        self.state.binding_declare(queue, exchange, routing_key, arguments)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        self.db.run(self.db.q.unbind, {"exchange": exchange or "amq.direct",
                                       "routing_key": routing_key or "", "queue": queue})
        self.state.binding_delete(queue, exchange, routing_key)

    def get_table(self, exchange):
        return [tuple(row) for row in
                self.db.run(self.db.q.bindings_of_exchange, {"exchange": exchange}, fetch=True)]


class Transport(virtual.Transport):
    Channel = Channel

    can_parse_url = True  # libpq query parameters (?sslmode=...) must reach libpq intact
    default_port = 5432
    driver_type = "postgresql"  # not 'sql': Celery turns events off for 'sql' transports
    driver_name = "psycopg"

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + (
        psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)

    #: Set by the Celery integration: ``in_progress(message)`` tells whether the consumer will still
    #: process (and ack) a delivered message, so that closing a lost connection keeps its lease.
    in_progress = None
    #: Set by the Celery integration: ``on_tasks_expired(task_ids)`` records tasks the sweeper
    #: moved to the dead letters because they expired with no consumer taking them.
    on_tasks_expired = None
    #: Set by the Celery integration: ``on_tasks_revoked(task_ids)`` marks REVOKED the tasks whose
    #: waiting messages `kombu-pg revoke` removed (it has no result backend to do it).
    on_tasks_revoked = None

    def __init__(self, client, **kwargs):
        green.cooperate()
        self.options, conninfo = self.check_client(client)
        super().__init__(client, **kwargs)
        self.polling_interval = self.options.polling_interval
        if len(client.alt) > 1 and "://" in (client.hostname or ""):
            # libpq tries every host at each connect. Kombu would instead switch the connection
            # to the next URL after an error, parsing it as an HTTP URL: libpq parameters fail
            # that (a TypeError), a host list too, and the URL's options would be lost.
            client.cycle = None
        self.db = database.get(conninfo, self.options, config.mask_url(conninfo))
        self._listen_conninfo = config.to_conninfo(self.options.listen_url) if self.options.listen_url else None
        self._poll_only = not self.options.listen
        self._listener: Listener | None = None
        self._ready: set[str] = set()  # queues that may have deliverable messages
        self._due: dict[str, float] = {}  # queue -> monotonic time its next known message is due
        self._due_unknown: set[str] = set()  # queues whose delayed messages' wake-ups we may have missed
        self.polled_queues: dict[str, float] = {}  # queue -> seconds between claims (no wake-ups)
        self._buffered: collections.deque = collections.deque()  # claimed, not yet delivered
        self._hot: tuple | None = None  # (channel, queue) whose last claim came back full
        self._ahead: tuple | None = None  # (channel, queue, limit, Pending) of a claim sent ahead
        self._kick_recv = self._kick_send = None
        self._kicked = False
        self.db.acquire()
        self._hub = None
        self._timer = None
        self._next_poll = 0.0  # monotonic time of the next safety-net poll
        self._poll_interval = self.options.polling_interval  # the wait after that poll

    @staticmethod
    def check_client(client) -> tuple[config.Options, str]:
        """The options and libpq connection string of a ``kombu.Connection``, validated without
        connecting; raises config.ConfigurationError (one line, no password)."""
        options = config.Options.from_transport_options(client.transport_options)
        if options.listen_url:
            config.to_conninfo(options.listen_url)
        hostname = client.hostname or ""
        if "://" in hostname and len(client.alt) > 1:  # a failover list, url1;url2
            return options, config.to_conninfo(";".join(client.alt))
        if "://" in hostname:
            alias = client.transport_cls
            written_scheme = hostname.partition("://")[0].lower()
            if (isinstance(alias, str) and alias.lower() in config.SCHEMES
                    and written_scheme not in config.SCHEMES):
                # Kombu took 'postgresql+psycopg://' apart: the error names the URL as written.
                hostname = f"{alias}+{hostname}"
            return options, config.to_conninfo(hostname)
        return options, config.conninfo_from_parts(hostname, client.port, client.userid,
                                                   client.password, client.virtual_host)

    def driver_version(self):
        return psycopg.__version__

    def as_uri(self, uri: str, include_password=False, mask="**") -> str:
        return uri if include_password else config.mask_url(uri, mask)

    def establish_connection(self):
        self.db.ensure_ready()
        self.db.open_pool()  # connect now, not in the first publish or claim
        return super().establish_connection()

    def close_connection(self, connection):
        try:
            self._settle_claim_ahead()
            self._hot = None
            if self._buffered:
                self._release_unprocessed(list(self._buffered))
                self._buffered.clear()
            super().close_connection(connection)
            self.db.acker.flush()
        finally:
            self.db.housekeeper.stopped(self)
            self.db.release()
            self._unregister()
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    # -- wake-ups ---------------------------------------------------------------------------

    def consumed_queues(self) -> set[str]:
        return {queue for channel in self.channels for queue in channel._active_queues}

    def wake(self, queues) -> None:
        self._ready.update(queues)
        self._due_unknown.update(queues)
        self._activity()
        self.db.housekeeper.consuming(self)

    def _activity(self) -> None:
        """A wake-up or a delivery: poll again after polling_interval, and back off from there.
        A producer skips the NOTIFY of a message published right after another to the same
        destination (Database.should_notify): a consumer that got the first NOTIFY but not the
        messages (another consumer took them) thus still finds the next one within this."""
        self._poll_interval = self.options.polling_interval
        self._next_poll = min(self._next_poll, monotonic() + self._poll_interval)

    def _listening(self) -> bool:
        return self._listener is not None and self._listener.conn is not None

    def _read_notifications(self, wait: float | None = None) -> None:
        if self._listener is None:
            if wait:
                sleep(wait)
            return
        try:
            woken = self._listener.read() if wait is None else self._listener.wait(wait)
        except psycopg.OperationalError as exc:
            # Raises if the server is gone: the consumer reconnects (and says so). A session the
            # server closed on its own (idle_session_timeout) is back at once: no warning then.
            self._reconnect_listener()
            logger.info("kombu_pg: LISTEN connection lost (%s): reconnected", " ".join(str(exc).split()))
            woken = dict.fromkeys(self.consumed_queues(), 0.0)  # anything may have been missed
        consumed = self.consumed_queues()
        for queue, delay in woken.items():
            if queue not in consumed:
                continue
            self._activity()
            if delay <= 0:
                self._ready.add(queue)
            else:
                # A message becomes visible later (ETA, retry backoff): wake up then, not at the
                # next safety-net poll.
                self._wake_at(queue, delay)

    def _wake_at(self, queue: str, delay: float) -> None:
        """Mark ``queue`` ready after ``delay`` seconds: one timer per queue, the earliest."""
        due = monotonic() + delay
        if due < self._due.get(queue, float("inf")):
            self._due[queue] = due
            if self._hub is not None:
                self._hub.call_later(delay, self._on_due, queue)

    def _listens(self) -> bool:
        """Whether consumers get LISTEN wake-ups: over listen_url, direct_url, or the broker URL
        unless it leads to a transaction pooler (then they poll). Decided on first use."""
        if self._listen_conninfo is None and not self._poll_only:
            try:
                self._listen_conninfo = self.db.session_conninfo("LISTEN")
            except config.ConfigurationError:
                self._poll_only = True
                logger.info("kombu_pg: behind a transaction pooler without direct_url: consumers "
                            "poll every %gs (polling_interval) instead of LISTEN",
                            self.options.polling_interval)
        return not self._poll_only

    def _reconnect_listener(self) -> None:
        if self._hub is not None and self._listener is not None and self._listener.conn is not None:
            self._hub.remove_reader(self._listener.fileno())
        self._listener = self._listener or Listener(self.db, self._listen_conninfo)
        fd = self._listener.connect()  # raises a connection error: the consumer reconnects
        if self._hub is not None:
            self._hub.add_reader(fd, self._on_readable)
        # Reconcile: whatever was notified while nobody listened. Claim every queue, and ask
        # when the delayed messages whose wake-ups were lost are due.
        self._ready |= self.consumed_queues()
        self._due_unknown |= self.consumed_queues()
        self._poll_interval, self._next_poll = self.options.polling_interval, 0.0

    def _on_due(self, queue) -> None:
        if self._due.get(queue, float("inf")) <= monotonic() + 0.001:
            del self._due[queue]
            self._ready.add(queue)
            self._deliver_from_hub()

    def _housekeeping(self) -> None:
        """Due ETAs, the safety-net poll, and the housekeeping round if this process runs it."""
        now = monotonic()
        for queue, due in list(self._due.items()):
            if due <= now:
                self._on_due(queue)
        if self._listener is not None and self._listener.outdated():
            # The pool was replaced (its server failed or stopped taking writes): the LISTEN
            # session may be on the old server, which hears no publishes any more.
            self._reconnect_listener()
        consumed = self.consumed_queues()
        if not consumed:
            return
        if now >= self._next_poll:
            self._poll(consumed)
        if self._due_unknown:
            self._ask_when_due(consumed)
        self.sweep()

    def _poll(self, consumed: set[str]) -> None:
        """The safety net for wake-ups that never came (see the ``poll`` statement): one
        statement for all consumed queues, which also keeps them alive and may elect this
        process as the housekeeper. With LISTEN working, an idle consumer doubles the time to
        its next poll up to max_polling_interval; without, it polls every polling_interval."""
        longest, started = self.options.idle_polling_interval, monotonic()
        rows = self.db.run(self.db.q.poll, {
            "queues": sorted(consumed), "hold_s": 2 * longest, "refresh_s": 1.5 * longest,
            **self.db.housekeeper.poll_params()}, fetch=True)
        # From before the statement: the event loop's tick (1 s) must find the next one due.
        self._next_poll = started + self._poll_interval
        if self._listening():
            self._poll_interval = min(2 * self._poll_interval, longest)
        for queue, ready, _ in rows:
            if ready:
                self._ready.add(queue)
        if rows and rows[0][2]:
            self.db.housekeeper.elected()

    def _ask_when_due(self, consumed: set[str]) -> None:
        """Timers for the delayed messages (ETA, retry backoff) of queues we started consuming
        or listening for: their NOTIFYs, which say when, went out before."""
        queues, self._due_unknown = sorted(self._due_unknown & consumed), set()
        if queues:
            for queue, delay in self.db.run(self.db.q.next_due, {"queues": queues}, fetch=True):
                if delay is not None:
                    self._wake_at(queue, delay)

    def sweep(self) -> None:
        """A housekeeping round, when this process is the elected housekeeper and one is due:
        drop expired queues (x-expires) and messages (TTL), return expired leases to their
        queues (and wake their consumers), dead-letter expired tasks nobody took."""
        done = self.db.housekeeper.run_round()
        if done is None:
            return
        if done.queues_gone or done.expired:
            logger.info("kombu_pg: sweep removed %d message(s) of expired queues and %d expired "
                        "message(s)", done.queues_gone, done.expired)
        if done.buried:
            self._expired_unclaimed(done.buried)
        if done.to_mark_revoked and Transport.on_tasks_revoked is not None:
            try:
                Transport.on_tasks_revoked(done.to_mark_revoked)
            except Exception as exc:  # the messages are gone; only their state is not written
                logger.error("kombu_pg: could not mark %d revoked task(s) REVOKED: %s",
                             len(done.to_mark_revoked), exc)

    def _expired_unclaimed(self, buried: list[tuple]) -> None:
        for message_id, queue, task_id in buried:
            counters.add("dead_lettered", queue)
            logger.warning("kombu_pg: task %s (message %s) of queue %r expired and no consumer took it "
                           "within %g s: dead-lettered (expired)", task_id, message_id, queue,
                           self.options.expired_task_grace)
        if Transport.on_tasks_expired is not None:
            try:
                Transport.on_tasks_expired([task_id for _, _, task_id in buried])
            except Exception as exc:  # the dead letters are written; only their state is not
                logger.error("kombu_pg: could not mark %d expired task(s) REVOKED: %s", len(buried), exc)

    def deliver_ready(self, one: bool = False) -> int:
        """Claim and deliver messages of the queues marked ready, within prefetch limits.

        With ``one``, deliver a single message and keep the rest of the batch for the next calls:
        synchronous consumers (Kombu's pidbox collecting replies) count drain_events() calls as
        messages. Kept messages are leased and renewed like delivered ones.
        """
        if one:
            if not self._buffered:
                self._collect_claim_ahead()
            if self._buffered:
                delivered = self._deliver_buffered()
                self._claim_ahead()
                return delivered
        delivered = 0
        for channel in list(self.channels):
            for queue in list(channel._active_queues):
                if queue not in self._ready:
                    continue
                if not channel.qos.can_consume():
                    break
                limit = channel.qos.can_consume_max_estimate()
                prefetch = channel.qos.prefetch_count
                if limit is None:
                    limit = self.options.claim_batch
                elif limit < prefetch and limit < max(1, prefetch // 2):
                    # Still holding more than half the prefetch: wait and claim a bigger batch
                    # later, rather than one message per claim as each ack frees a slot.
                    continue
                limit = min(limit, self.options.claim_batch)
                messages = channel.claim(queue, limit)
                self._after_claim(queue, messages, limit)
                if one and messages:
                    self._hot = (channel, queue)
                    self._buffer(queue, messages)
                    delivered = self._deliver_buffered()
                    self._claim_ahead()
                    return delivered
                for message in messages:
                    self._deliver(message, queue)
                delivered += len(messages)
                if queue in self._ready:
                    # A full batch: more may be waiting. Make the event loop come round again
                    # rather than block in poll() until the next timer: Celery acks through the
                    # hub's call_soon(), which only runs on the next round, and then there is
                    # room to claim again (the solo pool has no other socket to wake the loop).
                    self._kick()
        return delivered

    def _after_claim(self, queue: str, messages: Claimed, limit: int) -> None:
        """A claim that came back short drained the queue: wait for a wake-up."""
        polled = self.polled_queues.get(queue)
        if polled is not None:  # no wake-ups: claimed on a timer (and no sign of activity)
            if messages.rows < limit:
                self._ready.discard(queue)
            self._wake_at(queue, polled)
            return
        if messages.rows:
            self._activity()
        if messages.rows < limit:
            self._ready.discard(queue)  # drained: wait for a wake-up or the next poll
            if messages.rows:
                # An active queue: producers skip the NOTIFY for a message published right
                # after another (see Database.should_notify), so look again soon.
                self._wake_at(queue, database.FOLLOW_UP_SECONDS)

    def _buffer(self, queue: str, messages: list) -> None:
        for message in messages:
            self.db.leases.hold(*parse_tag(message["properties"]["delivery_tag"]))
        self._buffered.extend((queue, message) for message in messages)

    def _claim_ahead(self) -> None:
        """Synchronous consumers: send the claim of the next batch while this one is delivered,
        so that the server leases it meanwhile instead of after. Only for a queue whose last
        claim came back full, and only within the prefetch limit: delivered-unacked, buffered
        and claimed-ahead messages together stay within it, so the next batch is claimed once
        half of the current one has been handed over."""
        if self._ahead is not None or self._hot is None or self.options.max_connections < 3:
            return  # a claim in flight holds a pooled connection: leave one for acks, one for publishes
        channel, queue = self._hot
        if queue not in self._ready or queue not in channel._active_queues:
            return
        estimate = channel.qos.can_consume_max_estimate()
        batch = self.options.claim_batch
        if estimate is not None:
            batch = min(channel.qos.prefetch_count, batch)
        room = (batch if estimate is None else estimate) - len(self._buffered)
        if len(self._buffered) > batch // 2 or room < max(1, batch // 2):
            return
        limit = min(room, batch)
        try:
            self._ahead = (channel, queue, limit, channel.start_claim(queue, limit))
        except database.CONNECTION_ERRORS as exc:  # the next claim is made inline, with retries
            logger.debug("kombu_pg: could not send a claim ahead (%s)", exc)

    def _collect_claim_ahead(self) -> None:
        """Buffer what the claim sent ahead leased (waiting for it if need be)."""
        if self._ahead is None:
            return
        channel, queue, limit, pending = self._ahead
        self._ahead = None
        messages = channel.claimed(queue, pending.result())  # a connection error surfaces here
        self._after_claim(queue, messages, limit)
        self._buffer(queue, messages)

    def _settle_claim_ahead(self) -> None:
        """Wait for a claim in flight, so that what it leased is delivered or released with the rest."""
        try:
            self._collect_claim_ahead()
        except database.CONNECTION_ERRORS as exc:
            logger.warning("kombu_pg: a claim in flight failed (%s): anything it leased is "
                           "redelivered when the leases expire", exc)

    def release_buffered(self, queue: str) -> None:
        """Give back what was claimed for ``queue`` but not delivered (its consumer was cancelled)."""
        if self._ahead is not None and self._ahead[1] == queue:
            self._settle_claim_ahead()
        mine = [item for item in self._buffered if item[0] == queue]
        if mine:
            self._buffered = collections.deque(item for item in self._buffered if item[0] != queue)
            self._release_unprocessed(mine)

    def _deliver_buffered(self) -> int:
        queue, message = self._buffered.popleft()
        if queue not in self._callbacks:  # its consumer was cancelled meanwhile
            self._release_unprocessed([(queue, message)])
            return 0
        self._deliver(message, queue)
        return 1

    def _release_unprocessed(self, items) -> None:
        ids, tokens = [], []
        for _, message in items:
            message_id, token = parse_tag(message["properties"]["delivery_tag"])
            ids.append(message_id)
            tokens.append(token)
        try:
            self.db.run(self.db.q.release, {"ids": ids, "tokens": tokens,
                                            "channel": self.options.notify_channel}, fetch=True)
        except database.CONNECTION_ERRORS as exc:
            logger.warning("kombu_pg: could not release %d message(s) (%s): they are redelivered "
                           "when their leases expire", len(ids), exc)
        finally:
            self.db.leases.forget(ids)

    # -- the worker's event loop ------------------------------------------------------------

    def _kick(self) -> None:
        if self._hub is not None and not self._kicked:
            self._kicked = True
            try:
                self._kick_send.send(b"\0")
            except OSError:
                self._kicked = False

    def _on_kick(self) -> None:
        try:
            self._kick_recv.recv(64)
        except OSError:
            pass
        self._kicked = False
        self._deliver_from_hub()

    def register_with_event_loop(self, connection, loop):
        if Transport.in_progress is None:  # only Celery workers run an event loop
            logger.warning(NO_INTEGRATION)
        self._hub = loop
        # The hub blocks in poll() until a socket is readable or a timer is due; this pair lets
        # the transport ask for another round when it still has messages to claim.
        self._kick_recv, self._kick_send = socket.socketpair()
        self._kick_recv.setblocking(False)
        self._kick_send.setblocking(False)
        self._kicked = False
        loop.add_reader(self._kick_recv.fileno(), self._on_kick)
        if self._listens():
            self._reconnect_listener()
        loop.on_tick.add(self._on_tick)
        self._timer = loop.call_repeatedly(min(self.options.polling_interval, 1.0), self._hub_housekeeping)

    def _on_readable(self):
        self._read_notifications()
        self._deliver_from_hub()

    def _deliver_from_hub(self) -> None:
        # Deliver here, not only from on_tick: Celery schedules a task carrying an eta on the
        # hub's timer, and the hub computes how long to block before on_tick runs, so a message
        # handed over from on_tick would wait for the next unrelated timer (up to a second).
        if self._hub is not None and self._ready:
            self.deliver_ready()

    def _hub_housekeeping(self):
        self._housekeeping()
        self._deliver_from_hub()

    def _on_tick(self):
        if self._ready:
            self.deliver_ready()

    def _unregister(self):
        hub, self._hub = self._hub, None
        if hub is None:
            return
        hub.on_tick.discard(self._on_tick)
        if self._timer is not None:
            self._timer.cancel()
        if self._kick_recv is not None:
            try:
                hub.remove_reader(self._kick_recv.fileno())
            except Exception:
                pass
            self._kick_recv.close()
            self._kick_send.close()
            self._kick_recv = self._kick_send = None
        if self._listener is not None and self._listener.conn is not None:
            try:
                hub.remove_reader(self._listener.fileno())
            except Exception:
                pass

    # -- synchronous consumers (plain Kombu, gevent/eventlet pools, celery inspect) ---------

    def drain_events(self, connection, timeout=None):
        deadline = None if timeout is None else monotonic() + timeout
        if self._listener is None and self._listens():
            self._reconnect_listener()
        while True:
            self._housekeeping()
            if (self._ready or self._buffered or self._ahead) and self.deliver_ready(one=True):
                return
            now = monotonic()
            if deadline is not None and now >= deadline:
                raise socket.timeout()
            due = [self._next_poll, *self._due.values()]
            if (round_due := self.db.housekeeper.next_round()) is not None:
                due.append(round_due)
            wait = max(min(due) - now, 0.001) if self.consumed_queues() else self.polling_interval
            if deadline is not None:
                wait = min(wait, deadline - now)
            self._read_notifications(wait)


def _check_queue_name(queue: str) -> None:
    """Refuse at declare a name no publish to it could carry in its wake-up."""
    size = len(queue.encode())
    if size > MAX_QUEUE_NAME_BYTES:
        raise config.ConfigurationError(
            f"queue name {queue[:40]!r}... is {size} bytes long: the PostgreSQL transport allows at "
            f"most {MAX_QUEUE_NAME_BYTES} bytes (its wake-ups carry the name in a NOTIFY payload); "
            "use a shorter queue name")
