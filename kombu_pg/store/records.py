"""The rows the store's statements return, as records (one per row shape), and the dead-letter
filter the operator statements take."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class NewMessage:
    """A message to publish (the ``messages`` row's own columns)."""

    payload: str  # the Kombu message as JSON
    priority: int = 0
    eta: dt.datetime | str | None = None  # invisible until then
    ttl_ms: float | None = None  # the message's expiration
    task_id: str | None = None
    task_name: str | None = None
    max_attempts: int | None = None  # the task's own delivery cap
    unique_key: str | None = None
    unique_replace: bool = False  # a waiting message under the same key takes this content


class Claimed(NamedTuple):
    """A message leased (or, for a no-ack consumer, taken) by a claim. Values as the server sent
    them: text through the libpq path (prepared.py), typed through psycopg."""

    id: int | str
    token: str | None  # the lease's; None when taken without one
    delivery_count: int | str
    priority: int | str
    payload: str
    released: bool | str  # given back unprocessed before: redelivered without a failed attempt
    expired_s: float | str | None  # a task past its TTL: how long ago it expired
    revoked: bool | str  # a task revoked durably: the worker drops it


class Settled(NamedTuple):
    """A requeue: the delivery it was, the cap, and the dead letter when it reached the cap."""

    attempt: int
    max_attempts: int
    dead_letter_id: int | None


class Failed(NamedTuple):
    """A failed attempt: retried at ``retry_at``, or dead-lettered (``dead_letter_id``)."""

    attempt: int
    max_attempts: int
    dead_letter_id: int | None
    retry_at: dt.datetime | None


class Buried(NamedTuple):
    """A message moved to the dead letters."""

    dead_letter_id: int
    queue: str
    task_id: str | None
    attempts: int


class Polled(NamedTuple):
    queue: str
    ready: bool  # a message is deliverable now
    elected: bool  # this poll took the housekeeper's lease


class Due(NamedTuple):
    queue: str
    seconds: float | None  # until its earliest delayed message is visible; None: none delayed


class Scheduled(NamedTuple):
    id: int
    queue: str
    priority: int
    visible_at: dt.datetime
    payload: str
    delivery_count: int


class Binding(NamedTuple):
    routing_key: str
    pattern: str | None
    queue: str


class Purged(NamedTuple):
    queue: str
    ready: int
    delayed: int
    leased: int


class Reaped(NamedTuple):
    outcome: str  # "returned" to its queue, or "dead_lettered"
    message_id: int
    queue: str
    task_id: str | None
    attempt: int


class ExpiredTask(NamedTuple):
    """A task nobody consumed before it expired, moved to the dead letters."""

    message_id: int
    queue: str
    task_id: str


class Revoked(NamedTuple):
    """A message of a revoked task: removed ("ready", "delayed") or left to its consumer."""

    task_id: str
    state: str
    queue: str
    message_id: int
    leased_by: str | None
    leased_at: dt.datetime | None


class VacuumStats(NamedTuple):
    allowed: bool  # this role may vacuum the messages table
    dead_rows: int | None
    live_rows: int | None


class QueueStats(NamedTuple):
    queue: str
    ready: int
    delayed: int
    leased: int
    oldest_ready_age_s: float | None


class DeadLetterCount(NamedTuple):
    queue: str
    reason: str
    dead_letters: int  # not yet replayed


class LockHolder(NamedTuple):
    pid: int
    user: str | None
    application: str | None


class ReplayBatch(NamedTuple):
    requeued: int
    last_id: int | None  # the batch's highest dead-letter id: the next batch starts after it


class DeadLetterRow(NamedTuple):
    id: int
    message_id: int
    queue: str
    priority: int
    task_id: str | None
    task_name: str | None
    reason: str
    attempts: int
    max_attempts: int | None
    errors: list[dict]
    payload: str
    enqueued_at: dt.datetime
    dead_lettered_at: dt.datetime
    replayed_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which dead letters: every field left None matches all."""

    queue: str | None = None
    task: str | None = None
    reason: str | None = None
    older_than: float | None = None  # seconds since dead-lettered
    newer_than: float | None = None
    replayed: bool | None = None
    ids: list[int] | None = None

    def params(self) -> dict:
        return {"queue": self.queue, "task": self.task, "reason": self.reason,
                "older_than_s": self.older_than, "newer_than_s": self.newer_than,
                "replayed": self.replayed, "ids": list(self.ids) if self.ids else None}


@dataclasses.dataclass(frozen=True)
class DeadLetterSummary:
    id: int
    message_id: int
    queue: str
    task_id: str | None
    task_name: str | None
    reason: str
    attempts: int
    max_attempts: int | None
    dead_lettered_at: dt.datetime
    replayed_at: dt.datetime | None
    last_error_type: str | None
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """A message of a task in the messages table (one per queue it went to)."""

    message_id: int
    queue: str
    task_name: str | None
    priority: int
    state: str  # "ready", "delayed" (ETA, countdown, retry backoff) or "leased"
    enqueued_at: dt.datetime
    #: Ready: deliverable since then; delayed: until then.
    visible_at: dt.datetime
    #: The consumer holding the lease, as "<worker>[<pid>]"; for a waiting message, the last one
    #: that held it (None if none did, or one of a release before lease holders were recorded).
    leased_by: str | None
    leased_at: dt.datetime | None
    leased_until: dt.datetime | None  # for a leased message: when the lease runs out unless renewed
    attempts: int  # deliveries so far; a leased message is on attempt number `attempts`
    max_attempts: int
    errors: list[dict]  # one entry per failed attempt: at, worker, type, message, traceback
    expires_at: dt.datetime | None

    @property
    def worker(self) -> str | None:
        """The lease holder's worker name (Celery's hostname), without the pid."""
        match = _HOLDER.match(self.leased_by) if self.leased_by else None
        return match.group(1) if match else None

    @property
    def pid(self) -> int | None:
        match = _HOLDER.match(self.leased_by) if self.leased_by else None
        return int(match.group(2)) if match and match.group(2) else None


_HOLDER = re.compile(r"^(.*?)(?:\[(\d+)\])?$", re.S)


@dataclasses.dataclass(frozen=True)
class Revocation:
    revoked_at: dt.datetime
    expires_at: dt.datetime
    revoked_by: str | None


@dataclasses.dataclass(frozen=True)
class QueueCount:
    queue: str
    known: bool  # declared, or holding messages
    ready: int
    delayed: int
    leased: int
