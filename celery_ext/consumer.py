"""Messages the worker cannot even start go to the dead letters instead of being dropped.

Celery acks an undecodable message and rejects (without requeue) a message naming an unknown
task or carrying invalid task headers. We dead-letter such a message, with its reason, before
Celery settles it; Celery's ack or reject then finds no lease and changes nothing.
"""
from __future__ import annotations

import logging

from billiard.exceptions import WorkerLostError
from celery.exceptions import WorkerShutdown
from celery.worker.consumer.consumer import Consumer
from celery.worker.request import Request
from kombu.exceptions import ContentDisallowed, DecodeError

from kombu_pg.config import ConfigurationError
from kombu_pg.database import error_entry
from kombu_pg.transport import Channel, parse_tag

from . import retries

logger = logging.getLogger("kombu_pg")


def dead_letter(message, reason: str, exc) -> None:
    channel = getattr(message, "channel", None)
    if not isinstance(channel, Channel):
        return
    message_id, token = parse_tag(message.delivery_tag)
    if token is None:
        return
    error = error_entry(type(exc).__name__ if exc else reason, str(exc) if exc else reason)
    try:
        channel.db.dead_letter(message_id, token, reason, error)
    except Exception as db_exc:  # the lease expires and the message comes back
        logger.error("kombu_pg: could not dead-letter message %s (%s): %s", message_id, reason, db_exc)


def _before(method, reason):
    def wrapper(self, *args):
        message, exc = _message_and_exc(method.__name__, args)
        dead_letter(message, reason, exc)
        return method(self, *args)

    wrapper.__name__ = method.__name__
    wrapper._kombu_pg = True
    return wrapper


def _message_and_exc(name, args):
    if name == "on_decode_error":  # (message, exc)
        return args[0], args[1]
    if name == "on_unknown_message":  # (body, message)
        return args[1], None
    return args[1], args[2]  # (body, message, exc)


def _request_on_failure(method):
    def on_failure(self, exc_info, *args, **kwargs):
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)
        if isinstance(exc, (DecodeError, ContentDisallowed)):
            # Protocol 2 bodies are decoded in the pool, so a corrupt body fails there.
            dead_letter(self.message, "undecodable", exc)
        elif isinstance(exc, WorkerLostError) and self.task.acks_late and self.task.reject_on_worker_lost:
            _record_worker_lost(self, exc)
        return method(self, exc_info, *args, **kwargs)

    on_failure._kombu_pg = True
    return on_failure


def _record_worker_lost(request, exc) -> None:
    """A killed pool process (os._exit, OOM, segfault) is a failed attempt: record it with its
    cause, and report FAILURE once it used up its attempts (Celery leaves it PENDING)."""
    message = request.message
    channel = getattr(message, "channel", None)
    if not isinstance(channel, Channel):
        return
    message_id, token = parse_tag(message.delivery_tag)
    queue = (message.delivery_info.get("kombu_pg") or {}).get("queue", "")
    try:
        outcome = channel.db.fail(message_id, token, error_entry(type(exc).__name__, str(exc),
                                                                  worker=request.hostname),
                                  queue=queue, max_attempts=getattr(request.task, "max_attempts", None))
    except Exception as db_exc:  # Celery's requeue that follows records it instead
        logger.error("kombu_pg: could not record lost worker for message %s: %s", message_id, db_exc)
        return
    if outcome and outcome["dead_letter_id"]:
        logger.error("kombu_pg: task %s[%s] lost its worker %d time(s): dead-lettered as #%s",
                     request.task.name, request.id, outcome["attempt"], outcome["dead_letter_id"])
        request.task.backend.mark_as_failure(request.id, exc, request=request._context,
                                             store_result=request.store_errors)
    elif outcome:
        logger.warning("kombu_pg: task %s[%s] lost its worker (attempt %d of %d): retry at %s",
                       request.task.name, request.id, outcome["attempt"], outcome["max_attempts"],
                       outcome["retry_at"].isoformat())


def _exit_on_configuration_error(connect):
    """A broker the worker cannot use as configured (a broken option, migrations its role may
    not apply) is not a connection error to retry: say why in one line and exit, rather than
    Celery's "Unrecoverable error" with a traceback through Kombu."""
    def wrapper(self, *args, **kwargs):
        try:
            return connect(self, *args, **kwargs)
        except ConfigurationError as exc:
            logger.critical("kombu-pg: cannot use the broker: %s", exc)
            raise WorkerShutdown(1) from None

    wrapper.__name__ = connect.__name__
    wrapper._kombu_pg = True
    return wrapper


def _wrapping_new_tasks(method):
    """Tasks defined after the app was finalized (``@app.task`` in a test, then the worker's
    ``reload()``) get server-side retries too: the consumer reads its tasks here, at start and
    on reload."""
    def update_strategies(self):
        if getattr(self.app, "_kombu_pg_installed", False):
            for task in list(self.app.tasks.values()):
                retries.wrap(task)
        return method(self)

    update_strategies._kombu_pg = True
    return update_strategies


def install() -> None:
    if getattr(Consumer.on_decode_error, "_kombu_pg", False):
        return
    Consumer.connect = _exit_on_configuration_error(Consumer.connect)
    Consumer.update_strategies = _wrapping_new_tasks(Consumer.update_strategies)
    Consumer.on_decode_error = _before(Consumer.on_decode_error, "undecodable")
    Consumer.on_unknown_task = _before(Consumer.on_unknown_task, "unregistered")
    Consumer.on_unknown_message = _before(Consumer.on_unknown_message, "unknown_message")
    Consumer.on_invalid_task = _before(Consumer.on_invalid_task, "invalid")
    Request.on_failure = _request_on_failure(Request.on_failure)
