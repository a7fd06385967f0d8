"""Messages claimed for synchronous consumers but not yet delivered: they get one message per
drain_events() call, the rest of the batch waits here (leased and renewed like delivered ones),
while the claim of the next batch may already be in flight (claim-ahead). What a cancelled
consumer or a closing connection leaves here goes back to its queue at once.
"""
from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Callable

from .errors import CONNECTION_ERRORS
from .messages import Claimed, parse_tag

if TYPE_CHECKING:
    from .channel import Channel
    from .database import Database

logger = logging.getLogger(__name__)


class ClaimBuffer:
    """One per transport. ``ready``: the queues that may have messages (the wake-ups' set);
    ``after_claim(queue, messages, limit)``: tells the wake-ups what a claim found;
    ``callbacks`` and ``deliver(message, queue)``: the transport's consumers and its delivery."""

    def __init__(self, db: Database, ready: set[str],
                 after_claim: Callable[[str, Claimed, int], None],
                 callbacks: dict[str, Any], deliver: Callable[[dict, str], None]):
        self.db = db
        self.options = db.options
        self._ready = ready
        self._after_claim = after_claim
        self._callbacks = callbacks
        self._deliver = deliver
        self._items: collections.deque[tuple[str, dict]] = collections.deque()  # claimed, not yet delivered
        self._hot: tuple[Channel, str] | None = None  # (channel, queue) whose last claim came back full
        self._ahead: tuple | None = None  # (channel, queue, limit, Pending) of a claim sent ahead

    def __bool__(self) -> bool:
        """Whether messages wait here or a claim is in flight."""
        return bool(self._items) or self._ahead is not None

    def deliver_next(self) -> int | None:
        """Deliver the next buffered message (collecting the claim in flight first if nothing
        is buffered); None if there was none. Returns 0 if its consumer was cancelled."""
        if not self._items:
            self._collect_claim_ahead()
            if not self._items:
                return None
        delivered = self._deliver_buffered()
        self._claim_ahead()
        return delivered

    def deliver_first(self, channel: Channel, queue: str, messages: Claimed) -> int:
        """A claim for a synchronous consumer: deliver its first message, keep the rest."""
        self._hot = (channel, queue)
        self._buffer(queue, messages)
        delivered = self._deliver_buffered()
        self._claim_ahead()
        return delivered

    def _buffer(self, queue: str, messages: list) -> None:
        for message in messages:
            self.db.leases.hold(*parse_tag(message["properties"]["delivery_tag"]))
        self._items.extend((queue, message) for message in messages)

    def _deliver_buffered(self) -> int:
        queue, message = self._items.popleft()
        if queue not in self._callbacks:  # its consumer was cancelled meanwhile
            self._release_unprocessed([(queue, message)])
            return 0
        self._deliver(message, queue)
        return 1

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
        room = (batch if estimate is None else estimate) - len(self._items)
        if len(self._items) > batch // 2 or room < max(1, batch // 2):
            return
        limit = min(room, batch)
        try:
            self._ahead = (channel, queue, limit, channel.start_claim(queue, limit))
        except CONNECTION_ERRORS as exc:  # the next claim is made inline, with retries
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
        except CONNECTION_ERRORS as exc:
            logger.warning("kombu_pg: a claim in flight failed (%s): anything it leased is "
                           "redelivered when the leases expire", exc)

    def release(self, queue: str) -> None:
        """Give back what was claimed for ``queue`` but not delivered (its consumer was cancelled)."""
        if self._ahead is not None and self._ahead[1] == queue:
            self._settle_claim_ahead()
        mine = [item for item in self._items if item[0] == queue]
        if mine:
            self._items = collections.deque(item for item in self._items if item[0] != queue)
            self._release_unprocessed(mine)

    def release_all(self) -> None:
        """The connection closes: give back everything, the claim in flight included."""
        self._settle_claim_ahead()
        self._hot = None
        if self._items:
            self._release_unprocessed(list(self._items))
            self._items.clear()

    def _release_unprocessed(self, items: list[tuple[str, dict]]) -> None:
        ids: list[int] = []
        tokens: list[str | None] = []
        for _, message in items:
            message_id, token = parse_tag(message["properties"]["delivery_tag"])
            ids.append(message_id)
            tokens.append(token)
        self.db.leases.settling(ids)
        try:
            self.db.store.release(self.db, ids=ids, tokens=tokens, channel=self.options.notify_channel)
        except CONNECTION_ERRORS as exc:
            logger.warning("kombu_pg: could not release %d message(s) (%s): they are redelivered "
                           "when their leases expire", len(ids), exc)
        finally:
            self.db.leases.forget(ids)
