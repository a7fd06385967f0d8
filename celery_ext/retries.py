"""Server-side bounded retries and dead letters for Celery tasks.

Each task's ``run`` is wrapped (no change to task code). When it raises, the attempt is recorded
in PostgreSQL in one statement that decides from the persisted delivery count: retry after an
exponential backoff, or dead-letter. A retry is then reported to Celery as ``Retry``, so the
result backend shows RETRY and canvas bookkeeping (chords) waits; a dead letter re-raises, so
the backend shows FAILURE. The message row was settled by that statement: Celery's own ack or
reject that follows matches no lease any more and changes nothing.
"""
from __future__ import annotations

import functools
import logging
import os
import traceback

from celery.exceptions import Ignore, MaxRetriesExceededError, Reject, Retry

from kombu_pg.database import error_entry
from kombu_pg import messages
from kombu_pg.reasons import Reason
from kombu_pg.transport import Transport

# Not __name__: the README documents the "kombu_pg" logger for every transition of a message
# (retried, dead-lettered, ...): users configure and filter on that name.
logger = logging.getLogger("kombu_pg")

#: Exceptions that steer Celery rather than report a failure.
CONTROL_FLOW = (Retry, Ignore)

#: Set on a task's exception once its message went to the dead letters (value: the reason). It
#: travels with the exception from a prefork child to the worker's main process, which counts
#: it for the metrics (celery_ext.metrics); pickling keeps an exception's attributes.
DEAD_LETTERED_ATTR = "_kombu_pg_dead_lettered"


class ServerSideRetry(Retry):
    """The Retry raised after a failed attempt was recorded in PostgreSQL for a retry.

    A Retry all the same for Celery; its own class (kept when pickled back from a prefork child)
    lets the worker's main process tell it from a task's own ``self.retry()`` (metrics).
    """

_databases: dict = {}


def database_for(app):
    """This process's Database for the app's broker (a child makes its own after fork)."""
    key = (id(app), os.getpid())
    db = _databases.get(key)
    if db is None:
        with app.connection_for_write() as conn:
            transport = conn.transport
            if not isinstance(transport, Transport):
                return None
            db = _databases[key] = transport.db
    return db


def delivery_of(task) -> dict | None:
    """The row id, lease token and queue of the message the task is running from, if ours."""
    request = task.request
    if request.is_eager:
        return None
    ours = messages.delivery((getattr(request, "properties", None) or {}).get("delivery_info")
                             or request.delivery_info)
    return ours if ours.get("token") else None


def error_of(task, exc: BaseException) -> dict:
    return error_entry(type(exc).__name__, str(exc),
                       "".join(traceback.format_exception(exc)), worker=task.request.hostname)


def wrap(task) -> None:
    if getattr(task, "_kombu_pg_run", None) is not None:
        return
    run, retry = task.run, task.retry

    @functools.wraps(retry)
    def retry_noting_exhaustion(*args, **kwargs):
        # Celery's retry() raises the task's own exception (or MaxRetriesExceededError) once
        # max_retries is used up: that failure is final, as on any other broker.
        try:
            return retry(*args, **kwargs)
        except Retry:
            raise
        except BaseException:
            task.request._kombu_pg_retries_exhausted = True
            raise

    @functools.wraps(run)
    def run_with_server_side_retries(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        except CONTROL_FLOW:
            raise
        except Reject as exc:
            if not exc.requeue:
                _dead_letter(task, Reason.rejected, exc)
            raise
        except MaxRetriesExceededError as exc:
            _dead_letter(task, Reason.max_retries, exc)
            raise
        except Exception as exc:
            if getattr(task.request, "_kombu_pg_retries_exhausted", False):
                _dead_letter(task, Reason.max_retries, exc)
                raise
            retry_at = _fail(task, exc)
            if retry_at is None:
                raise
            raise ServerSideRetry(exc=exc, when=retry_at) from exc

    task._kombu_pg_run = run
    task.run = run_with_server_side_retries
    task.retry = retry_noting_exhaustion


def _fail(task, exc):
    """Record the failed attempt; the time of the retry, or None when it was dead-lettered."""
    delivery = delivery_of(task)
    db = delivery and database_for(task.app)
    if not db:
        return None
    try:
        outcome = db.fail(delivery["id"], delivery["token"], error_of(task, exc), queue=delivery["queue"],
                          max_attempts=getattr(task, "max_attempts", None),
                          backoff_base=getattr(task, "backoff_base", None),
                          backoff_cap=getattr(task, "backoff_cap", None))
    except Exception as db_exc:  # the lease will expire and the message come back
        logger.error("kombu_pg: could not record the failure of task %s: %s", task.request.id, db_exc)
        return None
    if outcome is None:
        return None
    if outcome["retry_at"] is not None:
        logger.warning("kombu_pg: task %s[%s] failed (attempt %d of %d, queue %r): %r; retry at %s",
                       task.name, task.request.id, outcome["attempt"], outcome["max_attempts"],
                       delivery["queue"], exc, outcome["retry_at"].isoformat())
        return outcome["retry_at"]
    logger.error("kombu_pg: task %s[%s] failed (attempt %d of %d, queue %r): %r; dead-lettered "
                 "(max_attempts) as #%s", task.name, task.request.id, outcome["attempt"],
                 outcome["max_attempts"], delivery["queue"], exc, outcome["dead_letter_id"])
    _mark_dead_lettered(exc, Reason.max_attempts)
    return None


def _dead_letter(task, reason: str, exc: BaseException) -> None:
    delivery = delivery_of(task)
    db = delivery and database_for(task.app)
    if db:
        try:
            if db.dead_letter(delivery["id"], delivery["token"], reason, error_of(task, exc)):
                _mark_dead_lettered(exc, reason)
        except Exception as db_exc:
            logger.error("kombu_pg: could not dead-letter task %s: %s", task.request.id, db_exc)


def _mark_dead_lettered(exc: BaseException, reason: str) -> None:
    try:
        setattr(exc, DEAD_LETTERED_ATTR, reason)
    except Exception:  # an exception type without a __dict__: not counted by the main process
        pass
