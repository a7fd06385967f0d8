"""Durable revokes: what a revoke did to a task's messages (see the ``revoke`` statement).

Celery's revoke lives in the memory of the workers that received it. Here the ids are also
recorded in the database for ``revoke_expires`` seconds, and the tasks' waiting messages are
removed, so that a worker started later, or restarted, does not run them either: a claim flags
a revoked task's message, and the Celery integration drops it as Celery drops a revoked task.
"""
from __future__ import annotations

import dataclasses
import datetime as dt

import psycopg

from . import config
from .store import Store, store_for

DEFAULT_EXPIRES = config.Options.revoke_expires


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One message of a revoked task."""

    task_id: str
    #: "ready" or "delayed": removed from the table; "leased": left to the consumer holding it.
    state: str
    queue: str
    message_id: int
    leased_by: str | None = None  # "<worker>[<pid>]", for a leased message
    leased_at: dt.datetime | None = None

    @property
    def removed(self) -> bool:
        return self.state != "leased"


def revoke(conn: psycopg.Connection, store: Store, task_ids, *, expires: float = DEFAULT_EXPIRES,
           unmarked: bool = False) -> list[Outcome]:
    """Record ``task_ids`` as revoked for ``expires`` seconds and remove their waiting messages,
    in one statement. ``unmarked``: the caller will not mark the removed tasks REVOKED in the
    result backend (a worker's housekeeping round will). Returns one outcome per message found."""
    task_ids = sorted({str(task_id) for task_id in task_ids})
    if not task_ids:
        return []
    if not expires > 0:
        raise config.ConfigurationError(f"revoke expiry must be positive seconds, not {expires!r}")
    # The schema's store (the same object, or the one behind the transitional Database.q).
    rows = store_for(store.schema).revoke(conn, task_ids=task_ids, expires_s=float(expires),
                                          by=config.client_name(255), unmarked=unmarked)
    return sorted((Outcome(*row) for row in rows), key=lambda o: (o.task_id, o.queue, o.message_id))
