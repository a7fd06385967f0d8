"""Which deliveries this worker will still run: their leases must survive a lost connection.

When the broker connection drops, Celery closes the channel, and the transport releases every
message it had delivered but not acked, so that another worker can take it. That is right for
prefetched messages Celery discards, and wrong for tasks that are running, or queued inside a
pool that will still run them (the threads pool's executor is not flushed): releasing those
would run them twice. The transport asks ``Transport.in_progress(message)``, set to ``probe``.
"""
from __future__ import annotations

import threading

from celery.concurrency import thread as thread_pool

_queued: set[str] = set()  # task ids submitted to a pool that runs them whatever happens
_lock = threading.Lock()


def probe(message) -> bool:
    from celery.worker import state

    task_id = (message.headers or {}).get("id")
    with _lock:
        if task_id in _queued:
            return True
    return any(getattr(request, "message", None) is not None
               and request.message.delivery_tag == message.delivery_tag
               for request in list(state.active_requests))


def install() -> None:
    """Track what the threads pool was given until each job finishes."""
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
