"""When a transport's consumers look for messages: the LISTEN connection, the set of queues that
may have deliverable messages, timers for delayed messages (ETA, retry backoff), polled queues,
and the safety-net poll for wake-ups that never came (which also elects the housekeeper).

NOTIFY is only a hint, so a queue is marked ready by a wake-up, a due timer, a poll or a claim
that came back full, and unmarked by a claim that came back short.
"""
from __future__ import annotations

import logging
from time import monotonic, sleep
from typing import TYPE_CHECKING, Any, Callable, Iterable

import psycopg

from . import config
from .broadcasts import Broadcasts
from .database import FOLLOW_UP_SECONDS
from .listener import Listener
from .messages import Claimed

if TYPE_CHECKING:
    from .database import Database
    from .maintenance import Maintenance

logger = logging.getLogger(__name__)


class Wakeups:
    """One per transport. ``consumed_queues()`` names the queues its channels consume;
    ``on_ready()`` delivers, from the event loop, what a wake-up or a timer made ready."""

    def __init__(self, db: Database, maintenance: Maintenance,
                 consumed_queues: Callable[[], set[str]], on_ready: Callable[[], None]):
        options = db.options
        self.db = db
        self.options = options
        self.maintenance = maintenance
        self._consumed_queues = consumed_queues
        self._on_ready = on_ready
        self._listen_conninfo = config.to_conninfo(options.listen_url) if options.listen_url else None
        self._poll_only = not options.listen
        self.listener: Listener | None = None
        self.ready: set[str] = set()  # queues that may have deliverable messages
        self.due: dict[str, float] = {}  # queue -> monotonic time its next known message is due
        self._due_unknown: set[str] = set()  # queues whose delayed messages' wake-ups we may have missed
        self.polled_queues: dict[str, float] = {}  # queue -> seconds between claims (no wake-ups)
        self.broadcasts = Broadcasts(options.schema)  # queues whose messages come as notifications
        self._rows_too: dict[str, float] = {}  # such queues -> their claim interval while rows come
        self._hub: Any = None  # the worker's event loop, once registered
        self.next_poll = 0.0  # monotonic time of the next safety-net poll
        self._poll_interval = options.polling_interval  # the wait after that poll

    def wake(self, queues: Iterable[str]) -> None:
        self.ready.update(queues)
        self._due_unknown.update(queues)
        self.activity()

    def activity(self) -> None:
        """A wake-up or a delivery: poll again after polling_interval, and back off from there.
        A producer skips the NOTIFY of a message published right after another to the same
        destination (Database.should_notify): a consumer that got the first NOTIFY but not the
        messages (another consumer took them) thus still finds the next one within this."""
        self._poll_interval = self.options.polling_interval
        self.next_poll = min(self.next_poll, monotonic() + self._poll_interval)

    def subscribe(self, queue: str, bindings, ttl: float) -> None:
        """Receive ``queue``'s messages as broadcasts (kombu_pg/broadcasts.py), if consumers
        here LISTEN: from now on if the LISTEN connection is up, else from its connect."""
        if not self.options.broadcasts or not self._listens():
            return  # turned off, or behind a transaction pooler: rows, claimed on a timer
        channels = self.broadcasts.subscribe(queue, bindings, ttl)
        if self.listener is not None and self.listener.conn is not None:
            self.listener.listen(channels)
            self._via_notify([queue])
            self.read()  # what psycopg took in while the LISTEN ran

    def unsubscribe(self, queue: str) -> None:
        self.broadcasts.unsubscribe(queue)
        self._rows_too.pop(queue, None)

    def _via_notify(self, queues: list[str]) -> None:
        """Tell publishers that ``queues`` take broadcasts now (LISTEN is on): no rows, and no
        claims on a timer."""
        if queues:
            self.db.store.mark_via_notify(self.db, queues=queues)
            for queue in queues:
                if queue in self.polled_queues:
                    self._rows_too[queue] = self.polled_queues.pop(queue)

    def after_claim(self, queue: str, messages: Claimed, limit: int) -> None:
        """A claim that came back short drained the queue: wait for a wake-up."""
        polled = self.polled_queues.get(queue)
        if polled is None and messages.rows:
            # Rows in a queue that takes broadcasts: from publishers of an earlier version
            # during a rolling upgrade (no wake-up either). Claimed on its timer while they come.
            polled = self._rows_too.get(queue)
        if polled is not None:  # no wake-ups: claimed on a timer (and no sign of activity)
            if messages.rows < limit:
                self.ready.discard(queue)
            self.wake_at(queue, polled)
            return
        if messages.rows:
            self.activity()
        if messages.rows < limit:
            self.ready.discard(queue)  # drained: wait for a wake-up or the next poll
            if messages.rows:
                # An active queue: producers skip the NOTIFY for a message published right
                # after another (see Database.should_notify), so look again soon.
                self.wake_at(queue, FOLLOW_UP_SECONDS)

    def wake_at(self, queue: str, delay: float) -> None:
        """Mark ``queue`` ready after ``delay`` seconds: one timer per queue, the earliest."""
        due = monotonic() + delay
        if due < self.due.get(queue, float("inf")):
            self.due[queue] = due
            if self._hub is not None:
                self._hub.call_later(delay, self.on_due, queue)

    def on_due(self, queue: str) -> None:
        if self.due.get(queue, float("inf")) <= monotonic() + 0.001:
            del self.due[queue]
            self.ready.add(queue)
            self._on_ready()

    def next_due(self) -> float:
        """The earliest of the next poll and the timers (monotonic)."""
        return min([self.next_poll, *self.due.values()])

    def check(self) -> bool:
        """Due timers, a LISTEN connection to replace, the safety-net poll; whether anything
        is consumed."""
        now = monotonic()
        for queue, due in list(self.due.items()):
            if due <= now:
                self.on_due(queue)
        if self.listener is not None and self.listener.outdated():
            # The pool was replaced (its server failed or stopped taking writes): the LISTEN
            # session may be on the old server, which hears no publishes any more.
            self.reconnect()
        consumed = self._consumed_queues()
        if not consumed:
            return False
        if now >= self.next_poll:
            self._poll(consumed)
        if self._due_unknown:
            self._ask_when_due(consumed)
        return True

    def _poll(self, consumed: set[str]) -> None:
        """The safety net for wake-ups that never came (see the ``poll`` statement): one
        statement for all consumed queues, which also keeps them alive and may elect this
        process as the housekeeper. With LISTEN working, an idle consumer doubles the time to
        its next poll up to max_polling_interval; without, it polls every polling_interval."""
        longest, started = self.options.idle_polling_interval, monotonic()
        rows = self.db.store.poll(self.db, queues=sorted(consumed), hold_s=2 * longest,
                                  refresh_s=1.5 * longest, **self.maintenance.poll_params())
        # From before the statement: the event loop's tick (1 s) must find the next one due.
        self.next_poll = started + self._poll_interval
        if self._listening():
            self._poll_interval = min(2 * self._poll_interval, longest)
        for queue, ready, _ in rows:
            if ready:
                self.ready.add(queue)
        if rows and rows[0][2]:
            self.maintenance.elected()

    def _ask_when_due(self, consumed: set[str]) -> None:
        """Timers for the delayed messages (ETA, retry backoff) of queues we started consuming
        or listening for: their NOTIFYs, which say when, went out before."""
        queues, self._due_unknown = sorted(self._due_unknown & consumed), set()
        if queues:
            for queue, delay in self.db.store.next_due(self.db, queues=queues):
                if delay is not None:
                    self.wake_at(queue, delay)

    # -- the LISTEN connection --------------------------------------------------------------

    def _listening(self) -> bool:
        return self.listener is not None and self.listener.conn is not None

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

    def listen(self) -> None:
        """Connect the LISTEN connection, unless it is there or consumers poll instead."""
        if self.listener is None and self._listens():
            self.reconnect()

    def reconnect(self) -> None:
        if self._hub is not None and self.listener is not None and self.listener.conn is not None:
            self._hub.remove_reader(self.listener.fileno())
        self.listener = self.listener or Listener(self.db, self._listen_conninfo, self._on_broadcast)
        self.listener.broadcast_channels |= set(self.broadcasts.channels())
        fd = self.listener.connect()  # raises a connection error: the consumer reconnects
        self._via_notify(self.broadcasts.queues())
        if self._hub is not None:
            self._hub.add_reader(fd, self._on_readable)
        # Reconcile: whatever was notified while nobody listened. Claim every queue, and ask
        # when the delayed messages whose wake-ups were lost are due.
        self.ready |= self._consumed_queues()
        self._due_unknown |= self._consumed_queues()
        self._poll_interval, self.next_poll = self.options.polling_interval, 0.0

    def read(self, wait: float | None = None) -> None:
        """Take in the notifications that came, waiting up to ``wait`` seconds for one (without
        a LISTEN connection, just sleep)."""
        if self.listener is None:
            if wait:
                sleep(wait)
            return
        try:
            woken = self.listener.read() if wait is None else self.listener.wait(wait)
        except psycopg.OperationalError as exc:
            # Raises if the server is gone: the consumer reconnects (and says so). A session the
            # server closed on its own (idle_session_timeout) is back at once: no warning then.
            self.reconnect()
            logger.info("kombu_pg: LISTEN connection lost (%s): reconnected", " ".join(str(exc).split()))
            woken = dict.fromkeys(self._consumed_queues(), 0.0)  # anything may have been missed
        consumed = self._consumed_queues()
        for queue, delay in woken.items():
            if queue not in consumed:
                continue
            self.activity()
            if delay <= 0:
                self.ready.add(queue)
            else:
                # A message becomes visible later (ETA, retry backoff): wake up then, not at the
                # next safety-net poll.
                self.wake_at(queue, delay)

    def _on_broadcast(self, channel: str, payload: str) -> None:
        # Not activity(): an idle worker receives every peer's heartbeat, and its safety-net
        # poll must still back off.
        self.broadcasts.receive(channel, payload)

    def _on_readable(self) -> None:
        self.read()
        self._on_ready()

    # -- the worker's event loop ------------------------------------------------------------

    def attach(self, hub: Any) -> None:
        """Timers and the LISTEN socket go to ``hub`` from now on."""
        self._hub = hub
        if self._listens():
            self.reconnect()

    def detach(self, hub: Any) -> None:
        self._hub = None
        if self.listener is not None and self.listener.conn is not None:
            try:
                hub.remove_reader(self.listener.fileno())
            except Exception:
                pass

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
