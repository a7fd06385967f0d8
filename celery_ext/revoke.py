"""Durable revokes for apps on this broker (see kombu_pg/revocation.py).

``app.control.revoke`` and ``celery control revoke`` broadcast the revoke to running workers,
which keep the ids in memory, as on every broker. Before that broadcast, the ids are recorded in
the database and the tasks' waiting messages removed (marked REVOKED here, as a worker would):
a worker started later, or restarted, drops them too, when a claim flags one of them.
A revoke sent to some workers only (``destination``) stays theirs: nothing is recorded.
"""
from __future__ import annotations

import logging
import weakref

from celery import states
from celery.app.control import Control
from celery.backends.base import DisabledBackend
from celery.worker import state as worker_state

from kombu_pg import revocation
from kombu_pg.messages import delivery
from kombu_pg.transport import Channel

from . import patches

logger = logging.getLogger(__name__)

#: States a revoke may overwrite, as Celery's worker decides it (celery/worker/control.py):
#: neither a result nor a state another worker set since it started the task.
MARKABLE = (states.PENDING, states.RECEIVED, states.RETRY, states.REJECTED)


def revoke_in_the_database() -> None:
    """Wrap Control.broadcast (celery_ext.patches)."""
    if patches.is_ours(Control.broadcast):
        return
    Control.broadcast = _durable_revoke(Control.broadcast)


def _durable_revoke(broadcast):
    def wrapper(self, command, arguments=None, destination=None, connection=None, *args, **kwargs):
        if (command == "revoke" and not destination
                and getattr(self.app, "_kombu_pg_installed", False)):
            task_ids = (arguments or {}).get("task_id", kwargs.get("task_id"))
            if task_ids:
                revoke(self.app, [task_ids] if isinstance(task_ids, str) else list(task_ids), connection)
        return broadcast(self, command, arguments, destination, connection, *args, **kwargs)

    wrapper.__name__ = broadcast.__name__
    wrapper.__doc__ = broadcast.__doc__
    patches.mark(wrapper)
    return wrapper


def revoke(app, task_ids: list[str], connection=None) -> list[revocation.Outcome]:
    """Record ``task_ids`` as revoked and remove their waiting messages; mark those REVOKED."""
    with app.connection_or_acquire(connection) as conn:
        channel = conn.default_channel
        if not isinstance(channel, Channel):  # a broker URL given per connection, not ours
            return []
        db = channel.db
        with db.connection() as pg:
            outcomes = revocation.revoke(pg, db.store, task_ids, expires=db.options.revoke_expires)
    removed = sorted({o.task_id for o in outcomes if o.removed})
    for o in outcomes:
        logger.info("kombu_pg: revoked task %s: %s", o.task_id,
                    f"removed its {o.state} message {o.message_id} from queue {o.queue!r}" if o.removed
                    else f"its message {o.message_id} is leased by {o.leased_by}: left to that worker")
    mark_revoked(app, removed)
    return outcomes


def mark_revoked(app, task_ids) -> None:
    """REVOKED in the result backend, unless the task has a result or a worker set its state
    (as Celery's worker does for the ids of a revoke it receives)."""
    backend = app.backend
    if isinstance(backend, DisabledBackend):
        return
    for task_id in task_ids:
        try:
            if backend.get_state(task_id) in MARKABLE:
                backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
        except Exception as exc:
            logger.warning("kombu_pg: could not mark revoked task %s REVOKED in the result backend: %s",
                           task_id, exc)


def marker(app):
    """``Transport.on_tasks_revoked``: marks REVOKED with the app installed last (a worker's own)."""
    app_ref = weakref.ref(app)

    def on_tasks_revoked(task_ids):
        app = app_ref()
        if app is not None:
            mark_revoked(app, task_ids)

    return on_tasks_revoked


def note_flagged(message) -> None:
    """A message the claim flagged as revoked durably: its id joins the worker's in-memory
    revoked set, so that Celery drops it as any revoked task (logs "Discarding revoked task",
    marks it REVOKED, sends task-revoked, acks it, which deletes the row)."""
    if delivery(getattr(message, "delivery_info", None)).get("revoked"):
        task_id = (message.headers or {}).get("id")
        if isinstance(task_id, str):
            worker_state.revoked.add(task_id)
