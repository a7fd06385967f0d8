"""Kombu transport keeping messages in PostgreSQL rows with visibility leases.

Publishing inserts a row (one per bound queue) and wakes consumers with NOTIFY. Consuming
claims ready rows in bulk with ``FOR UPDATE SKIP LOCKED``, leasing each one: the row stays in
the table, invisible to other consumers, until the consumer acks (deletes) or releases it, or
the lease expires and the row becomes deliverable again. Exchanges and bindings are rows too,
so routing works across processes.

The Transport is Kombu's surface: it delivers what its wake-ups (wakeups.py) mark ready, hands
synchronous consumers one message at a time from its claim buffer (claim_buffer.py), runs the
worker's event loop, and has the elected process run the maintenance (maintenance.py). Channels
(channel.py) publish, claim and settle.
"""
from __future__ import annotations

import logging
import socket
from time import monotonic
from typing import Any, Callable, Iterable

import psycopg
from kombu.transport import virtual

from . import config, database, green
from .channel import Channel, QoS
from .claim_buffer import ClaimBuffer
from .errors import CONNECTION_ERRORS
from .messages import (MAX_ATTEMPTS_HEADER, MAX_PRIORITY, UNIQUE_KEY_HEADER, UNIQUE_MODE_HEADER,
                       Claimed, UndecodableMessage, parse_tag)
from .wakeups import Wakeups

__all__ = ["MAX_ATTEMPTS_HEADER", "MAX_PRIORITY", "UNIQUE_KEY_HEADER", "UNIQUE_MODE_HEADER",
           "Channel", "Claimed", "QoS", "Transport", "UndecodableMessage", "parse_tag"]

logger = logging.getLogger(__name__)

#: A worker whose Celery integration is not installed (``kombu_pg.pth`` not processed: the
#: package is not in this interpreter's site-packages, or Python runs with -S).
NO_INTEGRATION = ("kombu-pg: the broker is PostgreSQL but the Celery integration is not installed in "
                  "this worker: tasks run without lease renewal, server-side retries or dead letters. "
                  "It installs itself at interpreter start through kombu_pg.pth: install kombu-pg "
                  "into this Python's site-packages")


#: The Channel class, for annotations inside Transport (whose attribute Channel is Kombu's hook).
OurChannel = Channel

class Transport(virtual.Transport):
    Channel = Channel

    can_parse_url = True  # libpq query parameters (?sslmode=...) must reach libpq intact
    default_port = 5432  # type: ignore[assignment]  # Kombu declares it None
    driver_type = "postgresql"  # not 'sql': Celery turns events off for 'sql' transports
    driver_name = "psycopg"

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + CONNECTION_ERRORS

    #: Set by the Celery integration: ``in_progress(message)`` tells whether the consumer will still
    #: process (and ack) a delivered message, so that closing a lost connection keeps its lease.
    in_progress: Callable[[Any], bool] | None = None
    #: Set by the Celery integration: ``on_tasks_expired(task_ids)`` records tasks the sweeper
    #: moved to the dead letters because they expired with no consumer taking them.
    on_tasks_expired: Callable[[list[str]], None] | None = None
    #: Set by the Celery integration: ``on_tasks_revoked(task_ids)`` marks REVOKED the tasks whose
    #: waiting messages `kombu-pg revoke` removed (it has no result backend to do it).
    on_tasks_revoked: Callable[[list[str]], None] | None = None

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
        self.maintenance = self.db.maintenance  # the process's, shared with its other transports
        self.wakeups = Wakeups(self.db, self.maintenance, self.consumed_queues, self._deliver_from_hub)
        self._ready = self.wakeups.ready  # the same set: read at every claim
        self.polled_queues = self.wakeups.polled_queues  # the channels' _new_queue fills it
        self.claims = ClaimBuffer(self.db, self._ready, self.wakeups.after_claim, self._callbacks,
                                  self._deliver)
        self._hub = None  # the worker's event loop, once registered
        self._timer = None
        self._kick_recv = self._kick_send = None
        self._kicked = False
        self.db.acquire()

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
            self.claims.release_all()
            super().close_connection(connection)
            self.db.acker.flush()
        finally:
            self.maintenance.stopped(self)
            self.db.release()
            self._unregister()
            self.wakeups.close()

    # -- wake-ups and maintenance -----------------------------------------------------------

    def _channels(self) -> list[OurChannel]:
        return self.channels  # type: ignore[return-value]  # Kombu: None until __init__ sets a list

    def consumed_queues(self) -> set[str]:
        return {queue for channel in self._channels() for queue in channel._active_queues}

    def wake(self, queues: Iterable[str]) -> None:
        self.wakeups.wake(queues)
        self.maintenance.consuming(self)

    def release_buffered(self, queue: str) -> None:
        """Give back what was claimed for ``queue`` but not delivered (its consumer was cancelled)."""
        self.claims.release(queue)

    def _housekeeping(self) -> None:
        """Due ETAs, the safety-net poll, and the housekeeping round if this process runs it."""
        if self.wakeups.check():
            self.sweep()

    def sweep(self) -> None:
        """A maintenance round, if this process runs them and one is due; the Celery
        integration's hooks, read here as it sets them, mark the tasks it removed REVOKED."""
        self.maintenance.sweep(Transport.on_tasks_expired, Transport.on_tasks_revoked)

    # -- delivery ---------------------------------------------------------------------------

    def deliver_ready(self, one: bool = False) -> int:
        """Claim and deliver messages of the queues marked ready, within prefetch limits.

        With ``one``, deliver a single message and keep the rest of the batch for the next calls:
        synchronous consumers (Kombu's pidbox collecting replies) count drain_events() calls as
        messages. Kept messages are leased and renewed like delivered ones.
        """
        if one:
            delivered = self.claims.deliver_next()
            if delivered is not None:
                return delivered
        delivered = 0
        for channel in list(self._channels()):
            for queue in list(channel._active_queues):
                if self.wakeups.broadcasts.inbox.get(queue):
                    delivered += self._deliver_broadcasts(channel, queue, one)
                    if one and delivered:
                        return delivered
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
                self.wakeups.after_claim(queue, messages, limit)
                if one and messages:
                    return self.claims.deliver_first(channel, queue, messages)
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

    def _deliver_broadcasts(self, channel: OurChannel, queue: str, one: bool) -> int:
        """Deliver what broadcasts brought ``queue`` (no-ack consumers: no prefetch limit)."""
        received = self.wakeups.broadcasts.take(queue, 1 if one else None)
        messages = channel.broadcast_messages(queue, received)
        for message in messages:
            self._deliver(message, queue)
        return len(messages)

    def _pending(self) -> bool:
        """Whether queues may have messages to claim, or broadcasts wait for delivery."""
        return bool(self._ready) or bool(self.wakeups.broadcasts)

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
        self.wakeups.attach(loop)
        loop.on_tick.add(self._on_tick)
        self._timer = loop.call_repeatedly(min(self.options.polling_interval, 1.0), self._hub_housekeeping)

    def _deliver_from_hub(self) -> None:
        # Deliver here, not only from on_tick: Celery schedules a task carrying an eta on the
        # hub's timer, and the hub computes how long to block before on_tick runs, so a message
        # handed over from on_tick would wait for the next unrelated timer (up to a second).
        if self._hub is not None and self._pending():
            self.deliver_ready()

    def _hub_housekeeping(self):
        self._housekeeping()
        self._deliver_from_hub()

    def _on_tick(self):
        if self._pending():
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
        self.wakeups.detach(hub)

    # -- synchronous consumers (plain Kombu, gevent/eventlet pools, celery inspect) ---------

    def drain_events(self, connection, timeout=None):
        deadline = None if timeout is None else monotonic() + timeout
        self.wakeups.listen()
        while True:
            self._housekeeping()
            if (self._pending() or self.claims) and self.deliver_ready(one=True):
                return
            now = monotonic()
            if deadline is not None and now >= deadline:
                raise socket.timeout()
            due = self.wakeups.next_due()
            if (round_due := self.maintenance.next_round()) is not None:
                due = min(due, round_due)
            wait = max(due - now, 0.001) if self.consumed_queues() else self.polling_interval
            if deadline is not None:
                wait = min(wait, deadline - now)
            self.wakeups.read(wait)
