"""Messages the worker cannot even start go to the dead letters instead of being dropped.

Celery acks an undecodable message and rejects (without requeue) a message naming an unknown
task or carrying invalid task headers. We dead-letter such a message, with its reason, before
Celery settles it; Celery's ack or reject then finds no lease and changes nothing.

Celery catches only some of the ways a message can be malformed: others raise out of its
message handler and stop the worker (a body that is not ``[args, kwargs, embed]``, a missing
``id`` header, ...), or fail later in the pool, or even let the message be acked unrun (kwargs
that are not a mapping). The task message handler is therefore guarded: such a message is
treated as an invalid task message, before Celery builds a request from it, and anything else
its content makes the handler (or the hand-over of its request to the pool) raise dead-letters
it too, rather than stopping the worker.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from billiard.exceptions import WorkerLostError
from celery.exceptions import InvalidTaskError, TimeLimitExceeded, WorkerShutdown
from celery.worker import state
from celery.worker.consumer.consumer import Consumer
from celery.worker.request import Request
from celery.worker.worker import WorkController
from kombu.exceptions import ContentDisallowed, DecodeError

from kombu_pg.config import ConfigurationError
from kombu_pg.database import error_entry
from kombu_pg.messages import delivery
from kombu_pg.reasons import Reason
from kombu_pg.transport import Channel, parse_tag

from . import retries, revoke

# Not __name__: the README documents the "kombu_pg" logger for every transition of a message
# (retried, dead-lettered, ...): users configure and filter on that name.
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


def task_message_defect(message) -> str | None:
    """What makes a protocol 2 task message impossible to run, among the defects Celery does
    not report itself; None if there is none (Celery's own checks still apply)."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # not protocol 2: Celery reports unknown formats and checks protocol 1
    if not isinstance(headers["task"], str):
        return "the 'task' header is not a string"
    if not isinstance(headers.get("id"), str):
        return "the 'id' header is missing or not a string"
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (isinstance(timelimit, (list, tuple)) and len(timelimit) == 2
                                      and all(_seconds_or_none(limit) for limit in timelimit)):
        # Checked here: the pool would take the job, then fail to set its timers.
        return "the 'timelimit' header is not [soft, hard] (seconds or null)"
    try:
        body = message.payload  # decoded once: the request Celery builds next reuses it
    except Exception:
        return None  # undecodable: Celery reports it (on_decode_error)
    if isinstance(body, dict):
        return None  # the hybrid protocol 1/2 format: Celery checks it
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        return "the body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        return "the task's args are not a list"
    if not isinstance(kwargs, Mapping):
        return "the task's kwargs are not a mapping"
    if embed is not None and not isinstance(embed, Mapping):
        return "the body's embed (callbacks, chord, ...) is not a mapping"
    return None


def _seconds_or_none(value) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _guarded_task_handler(create):
    def create_task_handler(self, *args, **kwargs):
        on_task_received = create(self, *args, **kwargs)

        def guarded_on_task_received(message):
            try:
                revoke.note_flagged(message)
                defect = task_message_defect(message)
                if defect is not None:
                    return self.on_invalid_task(None, message, InvalidTaskError(defect))
                return on_task_received(message)
            except (MemoryError, *self.connection_errors):
                raise
            except Exception as exc:  # raised by the message's content: not the worker's end
                if not isinstance(getattr(message, "channel", None), Channel):
                    raise
                if message.acknowledged:  # settled already: nothing left to dead-letter
                    logger.exception("kombu_pg: error handling task message %s", message.delivery_tag)
                    return None
                _forget_request(message)
                return self.on_invalid_task(None, message, exc)

        return guarded_on_task_received

    create_task_handler.__name__ = create.__name__
    create_task_handler._kombu_pg = True
    return create_task_handler


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


def _guarded_process_task(process):
    # A request can also fail on its content when it is handed to the pool, which happens
    # later, from the event loop, when the pool was full as the message came in.
    def _process_task(self, req):
        try:
            return process(self, req)
        except MemoryError:
            raise
        except Exception as exc:
            if not isinstance(getattr(req.message, "channel", None), Channel):
                raise
            logger.error("kombu_pg: task %s[%s] cannot be run (%s: %s): moving it to the dead letters",
                         req.name, req.id, type(exc).__name__, exc)
            dead_letter(req.message, Reason.undecodable, exc)
            state.task_ready(req)
            req.reject(requeue=False)  # settles the delivery (its lease is gone already)
            try:
                self._quick_release()  # its pool slot, as Celery does for a revoked task
            except AttributeError:  # no semaphore for this pool
                pass
            return None

    _process_task._kombu_pg = True
    return _process_task


def _forget_request(message) -> None:
    """Drop the request Celery may have registered for ``message`` before failing on it, so
    that it is not listed as reserved forever."""
    request = state.requests.get((message.headers or {}).get("id"))
    if request is not None and request.message is message:
        state.task_ready(request)


def _request_on_failure(method):
    def on_failure(self, exc_info, *args, **kwargs):
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)
        if isinstance(exc, (DecodeError, ContentDisallowed)):
            # Protocol 2 bodies are decoded in the pool, so a corrupt body fails there.
            dead_letter(self.message, Reason.undecodable, exc)
        elif (isinstance(exc, WorkerLostError) and self.task.acks_late and self.task.reject_on_worker_lost
              and not getattr(self, "_already_revoked", False)):  # revoke(terminate=True): no attempt
            outcome = _record_failed_attempt(self, exc)
            if outcome and outcome["dead_letter_id"]:  # Celery leaves it PENDING
                self.task.backend.mark_as_failure(self.id, exc, request=self._context,
                                                  store_result=self.store_errors)
        return method(self, exc_info, *args, **kwargs)

    on_failure._kombu_pg = True
    return on_failure


def _request_on_timeout(method):
    def on_timeout(self, soft, timeout):
        # Celery requeues a task that hit its hard time limit (unless acks_on_timeout), and a
        # requeue is redelivered at once: record it as the failed attempt it is, with backoff.
        if (not soft and not state.should_terminate and self.task.acks_late
                and not self.task.acks_on_timeout):
            _record_failed_attempt(self, TimeLimitExceeded(timeout))
        return method(self, soft, timeout)

    on_timeout._kombu_pg = True
    return on_timeout


def _record_failed_attempt(request, exc) -> dict | None:
    """A killed pool process (os._exit, OOM, segfault) or a hard time limit is a failed attempt:
    record it with its cause (retried after backoff, or dead-lettered at the cap)."""
    message = request.message
    channel = getattr(message, "channel", None)
    if not isinstance(channel, Channel):
        return
    message_id, token = parse_tag(message.delivery_tag)
    queue = delivery(message.delivery_info).get("queue", "")
    try:
        outcome = channel.db.fail(message_id, token, error_entry(type(exc).__name__, str(exc),
                                                                  worker=request.hostname),
                                  queue=queue, max_attempts=getattr(request.task, "max_attempts", None))
    except Exception as db_exc:  # Celery's requeue that follows counts the delivery instead
        logger.error("kombu_pg: could not record the failed attempt (%s) of message %s: %s",
                     type(exc).__name__, message_id, db_exc)
        return None
    if outcome and outcome["dead_letter_id"]:
        logger.error("kombu_pg: task %s[%s] failed (%s) %d time(s): dead-lettered as #%s",
                     request.task.name, request.id, type(exc).__name__, outcome["attempt"],
                     outcome["dead_letter_id"])
    elif outcome:
        logger.warning("kombu_pg: task %s[%s] failed (%s, attempt %d of %d): retry at %s",
                       request.task.name, request.id, type(exc).__name__, outcome["attempt"],
                       outcome["max_attempts"], outcome["retry_at"].isoformat())
    return outcome


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


def exit_on_configuration_error() -> None:
    """Wrap Consumer.connect (celery_ext.patches)."""
    if not getattr(Consumer.connect, "_kombu_pg", False):
        Consumer.connect = _exit_on_configuration_error(Consumer.connect)


def wrap_new_tasks() -> None:
    """Wrap Consumer.update_strategies (celery_ext.patches)."""
    if not getattr(Consumer.update_strategies, "_kombu_pg", False):
        Consumer.update_strategies = _wrapping_new_tasks(Consumer.update_strategies)


def dead_letter_unrunnable_messages() -> None:
    """Wrap the Consumer's handlers of messages it cannot run, its task message handler and the
    worker's hand-over to the pool (celery_ext.patches)."""
    if getattr(Consumer.on_decode_error, "_kombu_pg", False):
        return
    Consumer.on_decode_error = _before(Consumer.on_decode_error, Reason.undecodable)
    Consumer.on_unknown_task = _before(Consumer.on_unknown_task, Reason.unregistered)
    # Neither can become a task request: one reason for every message Celery cannot read.
    Consumer.on_unknown_message = _before(Consumer.on_unknown_message, Reason.undecodable)
    Consumer.on_invalid_task = _before(Consumer.on_invalid_task, Reason.undecodable)
    Consumer.create_task_handler = _guarded_task_handler(Consumer.create_task_handler)
    WorkController._process_task = _guarded_process_task(WorkController._process_task)


def record_pool_failures() -> None:
    """Wrap Request.on_failure and on_timeout (celery_ext.patches)."""
    if getattr(Request.on_failure, "_kombu_pg", False):
        return
    Request.on_failure = _request_on_failure(Request.on_failure)
    Request.on_timeout = _request_on_timeout(Request.on_timeout)
