"""What the integration does to a Celery app whose broker is this transport."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import socket
import weakref

from celery import bootsteps, signals

from kombu_pg import config
from kombu_pg.config import SCHEMES
from kombu_pg.transport import MAX_ATTEMPTS_HEADER, UNIQUE_KEY_HEADER, Transport

from . import inflight, metrics, patches, retries, revoke, secrets

logger = logging.getLogger(__name__)

TRANSPORT_PATHS = {"kombu_pg.transport:Transport", "kombu_pg.transport.Transport"}

#: Settings we turn on unless the user set them: redelivery of killed workers' tasks needs
#: late acks, and a killed child must not ack (the delivery cap stops poison loops).
DEFAULTS = {"task_acks_late": True, "task_reject_on_worker_lost": True}
#: A failure the task could not report itself (its body failed to decode in the pool, a hard
#: time limit) must not be acked away: rejected, it is retried or dead-lettered by the broker.
FAILURE_DEFAULTS = {"task_acks_on_failure": False, "task_acks_on_timeout": False}


def uses_pg_broker(app) -> bool:
    transport = app.conf.broker_transport
    if isinstance(transport, str) and transport in TRANSPORT_PATHS or transport is Transport:
        return True
    url = app.conf.broker_url or ""
    if not isinstance(url, str):
        return False
    scheme = url.split(";", 1)[0].partition("://")[0].lower()
    # postgresql+psycopg:// (SQLAlchemy's form) counts: the worker then rejects it, naming the fix.
    return scheme.partition("+")[0] in SCHEMES


def ensure(app) -> None:
    """Install the integration into ``app`` if its broker is this transport; idempotent.

    Called once the app's configuration is complete (see _autoload), so every way of giving the
    broker URL counts. Our settings go in as a defaults layer holding only keys the user set
    nowhere (conf, a config module, add_defaults, ...): theirs win, now and if set later. A
    reloaded configuration (config_from_object after the first read) has lost the layer: it
    is added again.
    """
    if not uses_pg_broker(app):
        return
    if not getattr(app, "_kombu_pg_installed", False):
        install(app)
    layer = getattr(app, "_kombu_pg_defaults", None)
    if layer is None or not any(existing is layer for existing in app.conf.maps):
        app._kombu_pg_defaults = layer = _defaults(app)
        app.conf.add_defaults(layer)


def install(app) -> None:
    Transport.in_progress = inflight.probe
    Transport.on_tasks_expired = functools.partial(_revoke_expired, weakref.ref(app))
    Transport.on_tasks_revoked = revoke.marker(app)
    patches.apply(patches.INSTALL)  # Celery's worker, control and pools: see the table there
    signals.before_task_publish.connect(_publish_headers, weak=False, dispatch_uid="kombu_pg.publish")
    signals.worker_init.connect(_name_worker, weak=False, dispatch_uid="kombu_pg.name_worker")
    signals.worker_process_init.connect(_name_child, weak=False, dispatch_uid="kombu_pg.name_child")
    signals.beat_init.connect(_name_beat, weak=False, dispatch_uid="kombu_pg.name_beat")
    app.on_after_finalize.connect(_wrap_tasks, weak=False, dispatch_uid="kombu_pg.wrap")
    app.steps["worker"].add(metrics.WorkerMetrics)  # /metrics, when a port is configured
    app.steps["consumer"].add(secrets.BrokerInfo)  # celery inspect stats, without passwords
    app.steps["worker"].add(Announce)
    app._kombu_pg_installed = True
    if app.finalized:  # a broker URL set after the tasks were bound
        _wrap_tasks(app)


def _defaults(app) -> dict:
    defaults = {key: value for key, value in DEFAULTS.items() if not _explicitly_set(app, key)}
    if not _explicitly_set(app, "task_acks_on_failure_or_timeout"):
        defaults.update((key, value) for key, value in FAILURE_DEFAULTS.items()
                        if not _explicitly_set(app, key))
    return defaults


def _wrap_tasks(sender=None, **kwargs):
    for task in list(sender.tasks.values()):
        retries.wrap(task)


def _publish_headers(sender=None, headers=None, body=None, **kwargs):
    """Carry a task's max_attempts (for the reaper of expired leases) and unique key in the
    message headers."""
    from celery import current_app

    task = current_app.tasks.get(sender) if isinstance(sender, str) else None
    if task is None or headers is None:
        return
    max_attempts = getattr(task, "max_attempts", None)
    if max_attempts:
        headers[MAX_ATTEMPTS_HEADER] = int(max_attempts)
    # Static lookup: a function given as a task option is stored on the task class, where
    # plain attribute access would bind it as a method.
    unique_key = inspect.getattr_static(task, "unique_key", None)
    if isinstance(unique_key, staticmethod):
        unique_key = unique_key.__func__
    if unique_key is not None and UNIQUE_KEY_HEADER not in headers:
        if callable(unique_key):  # unique_key(args, kwargs) -> str
            args, kwargs = (body[0], body[1]) if isinstance(body, (tuple, list)) else ((), {})
            unique_key = unique_key(args, kwargs)
        headers[UNIQUE_KEY_HEADER] = str(unique_key)


def check_broker_settings(app) -> None:
    """A worker with a broken broker URL or transport option exits with the one-line reason,
    before Celery creates the transport (where the same error comes with a page of traceback)."""
    if not uses_pg_broker(app):
        return
    conn = app.connection_for_read()
    try:
        Transport.check_client(conn)
    except config.ConfigurationError as exc:
        raise SystemExit(f"kombu-pg: {exc}") from None
    finally:
        conn.release()


_worker_pid = None


def _name_worker(sender=None, **kwargs) -> None:
    """The worker's node name in its connections' application_name (kombu-pg pool w1@host[pid])."""
    global _worker_pid
    hostname = getattr(sender, "hostname", None)
    if hostname:
        config.set_client_label(hostname)
        _worker_pid = os.getpid()


def _name_child(**kwargs) -> None:
    """A prefork pool process: its parent's name (inherited across fork), marked as a child.
    (The solo pool sends this signal in the worker's own process.)"""
    if _worker_pid is not None and os.getpid() != _worker_pid:
        config.set_client_label(f"{config.client_label()} child")


def _name_beat(**kwargs) -> None:
    config.set_client_label(f"beat@{socket.gethostname()}")


def _revoke_expired(app_ref, task_ids) -> None:
    """Tasks the sweeper dead-lettered because they expired unclaimed: REVOKED (reason
    'expired') in the result backend of the app installed last (a worker's own app), as a
    worker receiving them would have marked them."""
    app = app_ref()
    if app is not None:
        for task_id in task_ids:
            app.backend.mark_as_revoked(task_id, "expired")


def _explicitly_set(app, key: str) -> bool:
    # conf is a chain of maps whose last one holds Celery's defaults.
    return any(key in layer for layer in app.conf.maps[:-1])


class Announce(bootsteps.StartStopStep):
    """One line in the worker's log, once its logging is set up: the integration is active."""

    label = "kombu-pg announce"

    def start(self, worker):
        settings = ", ".join(f"{key}={worker.app.conf[key]}" for key in DEFAULTS)
        logger.info("kombu-pg: PostgreSQL broker integration active: %s", settings)
