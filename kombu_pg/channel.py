"""The Kombu channel and its QoS: publishing (a row per bound queue, woken by NOTIFY), claiming
leased rows for the transport to deliver, settling by lease, and queues, exchanges and bindings
as rows (so routing works across processes).
"""
from __future__ import annotations

import logging
from queue import Empty

from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual.exchange import TopicExchange

from . import atomic, config, counters
from .broadcasts import broadcast_channel
from .errors import CONNECTION_ERRORS
from .database import error_entry
from .messages import MAX_PRIORITY, Claimed, delivery, parse_tag, publish_params, queue_of, to_message
from .reasons import Reason

logger = logging.getLogger(__name__)

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
            db.dead_letter(message_id, token, Reason.rejected,
                           error_entry("Rejected", "rejected without requeue by the consumer"))
        self._quick_ack(delivery_tag)

    def _queue_of(self, delivery_tag) -> str:
        message = self._delivered.get(delivery_tag)  # type: ignore[attr-defined]  # Kombu: None until __init__
        return queue_of(message.delivery_info if message is not None else None)


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    max_priority = MAX_PRIORITY

    def __init__(self, connection, **kwargs):
        self.db = connection.db
        self.options = connection.options
        self._no_ack_queues: set[str] = set()
        self._auto_delete_queues: set[str] = set()
        self._message_ttl: dict[str, float] = {}  # short-lived broadcast queues: seconds
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
        params = publish_params(message, self.options.notify_channel)
        if exchange:
            statement, params = "publish_routed", dict(
                params, exchange=exchange, routing_key=routing_key,
                broadcast_channel=broadcast_channel(self.options.schema, exchange))
        else:  # the default exchange: the routing key names the queue
            statement, params = "publish_direct", dict(params, queue=routing_key)
        external = atomic.current()
        if external is not None:  # inside enqueue_in(): the application's transaction
            queues = [(queue, None, "f") for queue in
                      self.db.store.publish(external, statement, dict(params, notify=True))]
        elif exchange and self.db.unroutable((exchange, routing_key)):
            queues = []  # as the last publish there: no queue takes it (Celery's idle heartbeats)
        else:
            notify = params["eta"] is not None or self.db.should_notify((exchange, routing_key))
            epoch = self.db.routing_epoch()
            queues = self.db.run(self.db.prepared[statement], dict(params, notify=notify), fetch=True)
            if exchange and not queues and params["unique_key"] is None:
                self.db.note_unroutable((exchange, routing_key), epoch)
        for queue, _, broadcast in queues:
            if broadcast != "t":  # per-queue counts of every heartbeat to every worker: noise
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
        messages, undecodable, codecs = Claimed(len(rows)), [], self.codecs
        for row in rows:
            try:
                messages.append(to_message(queue, codecs, *row))
            except Exception as exc:  # whatever the row holds
                undecodable.append((row, exc))
        if messages:
            counters.add("delivered", queue, len(messages))
        for row, error in undecodable:
            self._bury_undecodable(queue, row, error)
        return messages

    def broadcast_messages(self, queue: str, received: list[tuple[int, str]]) -> Claimed:
        """Messages from broadcasts received for ``queue`` (kombu_pg/broadcasts.py): no row, so
        no lease and no id (0). One that is not a valid message is dropped with a warning, not
        dead-lettered: any role that may connect can NOTIFY, and must not write dead letters."""
        messages = Claimed(len(received))
        for priority, payload in received:
            try:
                messages.append(to_message(queue, self.codecs, 0, None, 1, priority, payload,
                                           released=False, expired_for=None, revoked=False))
            except Exception as exc:  # whatever the notification held
                logger.warning("kombu_pg: dropped a broadcast to queue %r that is not a valid Kombu "
                               "message (%s: %s)", queue, type(exc).__name__, exc)
        return messages

    def _bury_undecodable(self, queue, row, exc) -> None:
        message_id, token, delivery_count, priority, payload, *_ = row
        logger.error("kombu_pg: message %s of queue %r is not a valid Kombu message (%s: %s): "
                     "moving it to the dead letters", message_id, queue, type(exc).__name__, exc)
        error = error_entry(type(exc).__name__, f"not a valid Kombu message: {exc}")
        try:
            if token is None:  # a no-ack claim deleted the row already: keep what it returned
                self.db.dead_letter_taken(message_id, queue, priority, delivery_count, payload,
                                          Reason.undecodable, error)
            else:
                self.db.dead_letter(message_id, token, Reason.undecodable, error)
        except Exception as db_exc:  # never the consumer's end either
            logger.error("kombu_pg: could not dead-letter message %s (%s)%s", message_id, db_exc,
                         "" if token is None else ": it comes back when its lease expires")

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
        if no_ack and queue in self.connection.polled_queues:
            # A short-lived broadcast queue (gossip, an events receiver): its messages come
            # as notifications once it LISTENs (kombu_pg/broadcasts.py).
            self.connection.wakeups.subscribe(queue, [
                (binding.exchange, binding.routing_key, self.typeof(binding.exchange).type)
                for binding in self.state.queue_bindings(queue)],
                self._message_ttl.get(queue, POLLED_TTL_MS / 1000))  # declared on another channel
        self.connection.wake([queue])  # messages may be waiting already

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue and queue not in self._active_queues:
            self.connection.release_buffered(queue)  # claimed for a consumer that is gone
            self.connection.wakeups.unsubscribe(queue)
            self._no_ack_queues.discard(queue)
            if not self.connection.consumed_queues():
                self.db.maintenance.stopped(self.connection)
            if queue in self._auto_delete_queues:  # as RabbitMQ: the last consumer took it along
                self.queue_delete(queue)

    def _restore(self, message):
        """Give an unacked message back (channel closed, recover): release its lease, in place.

        A message whose task is still running keeps its lease (and its renewal): the connection
        was lost under a running task, which will still ack it after the reconnect.
        """
        message_id, token = parse_tag(message.delivery_tag)
        # Read on the class, where the Celery integration sets it: through the instance, the
        # function would be bound to the transport.
        probe = type(self.connection).in_progress
        if probe is not None and probe(message):
            logger.info("kombu_pg: message %s is still being processed: keeping its lease", message_id)
            return
        self.db.leases.settling([message_id])
        try:
            if self.db.store.release(self.db, ids=[message_id], tokens=[token],
                                     channel=self.options.notify_channel):
                counters.add("released", delivery(message.delivery_info).get("queue", ""))
            logger.info("kombu_pg: released message %s (task %s) unprocessed, back in queue %r",
                        message_id, (message.headers or {}).get("id"),
                        delivery(message.delivery_info).get("queue"))
        except CONNECTION_ERRORS as exc:
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
        check_queue_name(queue)
        arguments = arguments or {}
        overrides = self.options.queue_options.get(queue, {})
        self.db.store.declare_queue(
            self.db, queue=queue, durable=bool(durable), auto_delete=bool(auto_delete),
            expires_ms=arguments.get("x-expires"), message_ttl_ms=arguments.get("x-message-ttl"),
            # Stored with the queue so that reapers in other processes apply the same policy.
            max_attempts=overrides.get("max_attempts"), backoff_base=overrides.get("backoff_base"),
            backoff_cap=overrides.get("backoff_cap"))
        if auto_delete:
            self._auto_delete_queues.add(queue)
        interval = self.polled_interval(durable, auto_delete, arguments.get("x-message-ttl"))
        if interval is not None:
            self.connection.polled_queues[queue] = interval
            self._message_ttl[queue] = float(arguments["x-message-ttl"]) / 1000

    def polled_interval(self, durable, auto_delete, message_ttl_ms) -> float | None:
        """How often a consumer claims a short-lived broadcast queue, which producers do not
        wake (see POLLED_TTL_MS); None for every other queue."""
        if durable or not auto_delete or message_ttl_ms is None or float(message_ttl_ms) > POLLED_TTL_MS:
            return None
        return min(float(message_ttl_ms) / 2000, self.options.polling_interval)

    def _has_queue(self, queue, **kwargs):
        return self.db.store.has_queue(self.db, queue=queue)

    def _size(self, queue):
        return self.db.store.size(self.db, queue=queue)

    def _purge(self, queue):
        return self.db.store.purge(self.db, queue=queue)

    def _delete(self, queue, *args, **kwargs):
        self.db.store.delete_queue(self.db, queue=queue)

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)
        self._auto_delete_queues.discard(queue)
        self._message_ttl.pop(queue, None)
        self.connection.polled_queues.pop(queue, None)
        self.connection.wakeups.unsubscribe(queue)

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
        self.db.store.declare_exchange(self.db, exchange=exchange, type=type, durable=bool(durable),
                                       auto_delete=bool(auto_delete))

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.db.store.delete_exchange(self.db, exchange=exchange)
        self.state.exchanges.pop(exchange, None)

    def _stored_exchange_type(self, exchange) -> str | None:
        return self.db.store.exchange_type(self.db, exchange=exchange)

    def typeof(self, exchange, default="direct"):
        local = self.state.exchanges.get(exchange)
        type = local["type"] if local else (self._stored_exchange_type(exchange) or default)
        return self.exchange_types[type]

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        exchange_type = self.typeof(exchange).type
        if exchange not in self.state.exchanges:
            # Bound without a declare in this process: make sure routing knows its type.
            self.db.store.declare_exchange(self.db, exchange=exchange, type=exchange_type, durable=True,
                                           auto_delete=False)
        pattern = TopicExchange(self).key_to_pattern(routing_key) if exchange_type == "topic" else ""
        self.db.store.bind(self.db, exchange=exchange, routing_key=routing_key or "", pattern=pattern,
                           queue=queue, channel=self.options.notify_channel)
        self.db.bound()
        self.state.binding_declare(queue, exchange, routing_key, arguments)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        self.db.store.unbind(self.db, exchange=exchange or "amq.direct", routing_key=routing_key or "",
                             queue=queue)
        self.state.binding_delete(queue, exchange, routing_key)

    def get_table(self, exchange):
        return [tuple(row) for row in self.db.store.bindings_of_exchange(self.db, exchange=exchange)]




def check_queue_name(queue: str) -> None:
    """Refuse at declare a name no publish to it could carry in its wake-up."""
    size = len(queue.encode())
    if size > MAX_QUEUE_NAME_BYTES:
        raise config.ConfigurationError(
            f"queue name {queue[:40]!r}... is {size} bytes long: the PostgreSQL transport allows at "
            f"most {MAX_QUEUE_NAME_BYTES} bytes (its wake-ups carry the name in a NOTIFY payload); "
            "use a shorter queue name")
