"""Which deliveries this worker will still run: their leases must survive a lost connection.

On AMQP a delivery tag belongs to its channel, so when the broker connection drops Celery
forgets everything it was given and not yet running (``Consumer.on_close``: reserved and
rate-limited requests, ETA timers, jobs the prefork pool has not started) and counts on the
broker to redeliver it. Here a delivery is settled by (row id, lease token) from any connection,
so nothing needs forgetting, and forgetting is what ran tasks twice: a job the prefork pool had
already written to a child still ran there, while its released message ran again elsewhere.

So for an app on this broker a lost connection changes nothing Celery holds: every message
given to Celery keeps its lease (renewed by the lease keeper), ``on_close`` keeps the requests,
timers and pool jobs, and each task is acked over the new connection when it finishes. Only
messages still in the transport's own buffer, never given to Celery, are released.

Outside a connection loss (the worker shutting down), a message keeps its lease only while its
task runs, or waits in the threads pool's executor or as a greenlet of the gevent or eventlet
pool not yet started (neither is flushed: they run before the worker exits); the rest are
released.
"""
from __future__ import annotations

import logging
import threading

from celery.concurrency import thread as thread_pool
from celery.worker.consumer.consumer import Consumer

logger = logging.getLogger(__name__)

_queued: set[str] = set()  # task ids submitted to a pool that runs them whatever happens
_lock = threading.Lock()
#: Set while Celery tears down a lost connection (on_connection_error_after_connected, then
#: on_close); the consumer's thread does both, back to back.
_connection_lost = False


def probe(message) -> bool:
    """Whether closing the connection must keep ``message``'s lease (Transport.in_progress)."""
    if _connection_lost:
        return True
    from celery.worker import state

    task_id = (message.headers or {}).get("id")
    with _lock:
        if task_id in _queued:
            return True
    return any(getattr(request, "message", None) is not None
               and request.message.delivery_tag == message.delivery_tag
               for request in list(state.active_requests))


def _ours(consumer) -> bool:
    return getattr(consumer.app, "_kombu_pg_installed", False)


def keep_deliveries_across_reconnects() -> None:
    """Wrap Consumer.on_connection_error_after_connected and on_close (celery_ext.patches)."""
    if getattr(Consumer.on_close, "_kombu_pg", False):
        return
    on_connection_lost, on_close = Consumer.on_connection_error_after_connected, Consumer.on_close

    def on_connection_error_after_connected(self, exc):
        global _connection_lost
        _connection_lost = _ours(self)
        try:
            return on_connection_lost(self, exc)
        except BaseException:
            _connection_lost = False
            raise

    def keeping_on_close(self):
        global _connection_lost
        if _connection_lost:
            _connection_lost = False
            logger.info("kombu_pg: broker connection lost: the tasks this worker was given keep "
                        "their leases and run; their acks go over the new connection")
            return None
        return on_close(self)

    on_connection_error_after_connected._kombu_pg = keeping_on_close._kombu_pg = True
    Consumer.on_connection_error_after_connected = on_connection_error_after_connected
    Consumer.on_close = keeping_on_close


def track_thread_pool_jobs() -> None:
    """Track what the threads pool was given until each job finishes (celery_ext.patches)."""
    pool_cls = thread_pool.TaskPool
    if getattr(pool_cls.on_apply, "_kombu_pg", False):
        return
    on_apply = pool_cls.on_apply

    def tracked_on_apply(self, target, args=None, kwargs=None, callback=None, accept_callback=None, **options):
        result = on_apply(self, target, args, kwargs, callback, accept_callback, **options)
        task_id = options.get("correlation_id")
        if task_id:
            with _lock:
                _queued.add(task_id)

            def done(_future, task_id=task_id):
                with _lock:
                    _queued.discard(task_id)

            result.f.add_done_callback(done)
        return result

    tracked_on_apply._kombu_pg = True
    pool_cls.on_apply = tracked_on_apply


def _discard(task_id) -> None:
    with _lock:
        _queued.discard(task_id)


def track_green_pool_jobs(module) -> None:
    """gevent and eventlet pools: a job is a greenlet, spawned by the consumer (which waits in
    the spawn while the pool is full) and started at the next switch. Track it from submission
    until its greenlet ends, however it ends: links also run for one killed before it started.
    Applied once the pool's module is imported (celery_ext.patches): importing it needs gevent or
    eventlet, and warns without the monkey patching their workers do first."""
    pool_cls = module.TaskPool
    if getattr(pool_cls.on_apply, "_kombu_pg", False):
        return
    on_apply, add_to_pool_map = pool_cls.on_apply, pool_cls._add_to_pool_map
    submitting: list = []  # the task being submitted: only the consumer's greenlet submits

    def tracked_on_apply(self, *args, **options):
        task_id = options.get("correlation_id")
        if task_id:
            with _lock:
                _queued.add(task_id)
        submitting.append(task_id)
        try:
            return on_apply(self, *args, **options)
        except BaseException:
            _discard(task_id)
            raise
        finally:
            submitting.pop()

    def tracked_add_to_pool_map(self, pid, greenlet):
        add_to_pool_map(self, pid, greenlet)
        task_id = submitting[-1] if submitting else None
        if task_id:  # gevent calls link(greenlet), eventlet link(greenthread, *curried)
            greenlet.link(lambda _ended, *_: _discard(task_id))

    tracked_on_apply._kombu_pg = tracked_add_to_pool_map._kombu_pg = True
    pool_cls.on_apply = tracked_on_apply
    pool_cls._add_to_pool_map = tracked_add_to_pool_map
