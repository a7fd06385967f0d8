"""Prometheus metrics from a Celery worker: ``/metrics`` served by the worker's main process.

Off unless a port is configured: the environment variable ``KOMBU_PG_METRICS_PORT`` (it wins:
per-process, so several workers of one host can share a configuration module), else the Celery
setting ``kombu_pg_metrics_port``. The address is ``KOMBU_PG_METRICS_HOST`` /
``kombu_pg_metrics_host`` (default 127.0.0.1; 0.0.0.0 for all interfaces); the runtime
histogram's buckets ``kombu_pg_metrics_buckets`` (seconds). Port 0 picks a free port (logged).
Needs ``prometheus-client`` (``pip install 'kombu-pg[metrics]'``). Installed into every app of
this broker by :func:`celery_ext.install.install` (a worker bootstep, :class:`WorkerMetrics`).

Where each series comes from, and why it is right for prefork, solo and threads pools:

* Database gauges (``kombu_pg_queue_*``, ``kombu_pg_dead_letters*``, ``kombu_pg_up``): read
  from PostgreSQL at each scrape by :class:`kombu_pg.metrics.KombuPgCollector`. Broker-wide:
  every worker (and ``kombu-pg metrics``) reports the same values. The dead letters table is
  the durable source of truth for dead letters by reason.
* ``kombu_pg_messages_{delivered,acked,released,requeued}_total``: counted by the transport in
  the main process, which consumes, acks and rejects every message whatever the pool
  (:mod:`kombu_pg.counters`). Complete for this worker.
* ``kombu_pg_messages_{retried,dead_lettered}_total``: counted where the failure is recorded in
  PostgreSQL. Failures the main process records (rejects with requeue, lost pool processes,
  unregistered or undecodable messages, expired leases) are counted there by the transport.
  A task's own failure is recorded by the process that ran it (celery_ext.retries): with
  solo, threads (or green) pools that is the main process too; with prefork it is a pool
  child, whose counters we never see. For those, the main process counts what comes back
  with the result: a :class:`~celery_ext.retries.ServerSideRetry` is one retry; an
  exception marked ``_kombu_pg_dead_lettered`` is one dead letter. (A task's own
  ``self.retry()`` is a plain Retry: a new message, not counted as retried.)
* ``kombu_pg_messages_published_total``: publishes by the main process only; tasks that
  publish from prefork children are not included. ``replayed``: replays by this process.
* ``kombu_pg_task_runtime_seconds{task}``: the runtime Celery's tracer measures around the
  task body in the pool (the ``runtime`` of the "succeeded in ...s" log line and of the
  ``task-succeeded`` event), which the pool hands to the request's ``on_success`` callback in
  the main process. That callback runs in the main process for prefork (result pipe), solo
  (inline) and threads (the pool thread, same process), unlike the ``task_success`` and
  ``task_failure`` signals, which fire in the prefork child. Celery's fast path defines
  ``on_success`` on a per-task Request subclass (``create_request_cls``), so that is where we
  wrap it. Celery measures successful executions only: failures and retries come back
  through the same callback without a runtime, and are not observed (timing them from the
  main process would be unreliable: with prefork a result may arrive before the pool's
  acceptance notice that records the start time).
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import threading

from celery import bootsteps

from kombu_pg.messages import queue_of

from . import patches

logger = logging.getLogger(__name__)

PORT_SETTING, HOST_SETTING, BUCKETS_SETTING = ("kombu_pg_metrics_port", "kombu_pg_metrics_host",
                                               "kombu_pg_metrics_buckets")
PORT_ENV, HOST_ENV = "KOMBU_PG_METRICS_PORT", "KOMBU_PG_METRICS_HOST"
DEFAULT_HOST = "127.0.0.1"
#: Task runtimes run from milliseconds to hours.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)
RUNTIME_HELP = ("Seconds successful task executions ran in the pool, per task name, as measured "
                "by Celery's tracer (failed and retried attempts are not timed by Celery).")

#: Counted in this (main) process for what prefork pool children recorded: {(event, queue): n}.
_from_children: collections.Counter = collections.Counter()
_lock = threading.Lock()
#: The running exporter of this process, if any (one worker per process).
_active: "Exporter | None" = None


def settings_of(app) -> dict | None:
    """``{"port", "host", "buckets"}``, or None when the exporter is off."""
    port = os.environ.get(PORT_ENV)
    if port is None or not port.strip():
        port = app.conf.get(PORT_SETTING)
    if port is None or (isinstance(port, str) and not port.strip()):
        return None
    try:
        port = int(port)
        if not 0 <= port <= 65535:
            raise ValueError
    except (TypeError, ValueError):
        from celery.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"{PORT_ENV} / {PORT_SETTING} must be a port number, got {port!r}") from None
    host = os.environ.get(HOST_ENV) or app.conf.get(HOST_SETTING) or DEFAULT_HOST
    buckets = tuple(float(b) for b in (app.conf.get(BUCKETS_SETTING) or DEFAULT_BUCKETS))
    return {"port": port, "host": str(host), "buckets": buckets}


def broker_target(app) -> tuple[str, str]:
    """The URL and schema the worker consumes from (as ``celery pg`` does)."""
    from kombu_pg import config

    url = app.conf.broker_url
    if isinstance(url, (list, tuple)):
        url = url[0]
    url = str(url).split(";", 1)[0].strip()
    schema = (app.conf.broker_transport_options or {}).get("schema", config.Options.schema)
    return url, schema


def counts() -> dict:
    """This worker's event counts: the main process's own, plus what it saw its children do."""
    from kombu_pg import counters

    merged = collections.Counter(counters.snapshot())
    with _lock:
        merged.update(_from_children)
    return dict(merged)


class Exporter:
    """The HTTP server and the runtime histogram of one worker."""

    def __init__(self, app, port: int, host: str, buckets: tuple, pool_forks: bool):
        self.app, self.port, self.host, self.buckets = app, port, host, buckets
        #: Tasks run in other processes (prefork): their failures are counted from results.
        self.pool_forks = pool_forks
        self.server = None
        self.runtime = None

    def start(self):
        global _active
        from prometheus_client import Histogram

        from kombu_pg import metrics

        url, schema = broker_target(self.app)
        collector = metrics.KombuPgCollector(url, schema, counts=counts)
        registry = metrics.registry_for(collector)
        self.runtime = Histogram("kombu_pg_task_runtime_seconds", RUNTIME_HELP, ["task"],
                                 registry=registry, buckets=self.buckets)
        try:
            self.server = metrics.start_server(registry, self.port, self.host)
        except OSError as exc:  # metrics must not keep the worker from working
            logger.error("kombu-pg: cannot serve Prometheus metrics on %s:%s: %s", self.host, self.port, exc)
            return
        _active = self
        host, port = self.server.server_address[:2]
        logger.info("kombu-pg: serving Prometheus metrics on http://%s:%s/metrics",
                    f"[{host}]" if ":" in host else host, port)

    def stop(self):
        global _active
        if _active is self:
            _active = None
        if self.server is not None:
            from kombu_pg import metrics

            metrics.stop_server(self.server)
            self.server = None

    def observe(self, request, failed__retval__runtime) -> None:
        failed, retval, runtime = failed__retval__runtime
        task_name = getattr(request.task, "name", None) or request.type
        if isinstance(runtime, (int, float)):
            self.runtime.labels(task_name).observe(runtime)
        if not failed or not self._ran_in_child(request):
            return  # in this process, the transport counted it already
        exc = _exception_of(retval)
        from .retries import DEAD_LETTERED_ATTR, ServerSideRetry

        if isinstance(exc, ServerSideRetry):
            event = "retried"
        elif getattr(exc, DEAD_LETTERED_ATTR, None):
            event = "dead_lettered"
        else:
            return
        with _lock:
            _from_children[(event, _queue_of(request))] += 1

    def _ran_in_child(self, request) -> bool:
        # worker_pid is set when the pool acknowledges the job; a prefork result can arrive
        # before that acknowledgement, hence the pool type as the fallback.
        pid = getattr(request, "worker_pid", None)
        return pid != os.getpid() if pid else self.pool_forks


def _exception_of(exc_info):
    from billiard.einfo import ExceptionWithTraceback

    exc = getattr(exc_info, "exception", None)
    # In-process pools pass the wrapper; unpickling a prefork result unwraps it already.
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _queue_of(request) -> str:
    return queue_of(getattr(getattr(request, "message", None), "delivery_info", None))


def _observing(on_success):
    @functools.wraps(on_success)
    def on_success_observed(self, failed__retval__runtime, **kwargs):
        exporter = _active
        if exporter is not None:
            try:
                exporter.observe(self, failed__retval__runtime)
            except Exception:  # never in the way of the result
                logger.exception("kombu-pg: metrics could not observe task %s", getattr(self, "id", None))
        return on_success(self, failed__retval__runtime, **kwargs)

    on_success_observed._kombu_pg_metrics = True
    return on_success_observed


def install_request_hook() -> None:
    """Wrap ``on_success`` of the Request classes the worker's default strategy creates
    (celery_ext.patches: applied when the exporter starts, before the consumer builds its task
    strategies)."""
    from celery.worker import strategy

    create_request_cls = strategy.create_request_cls
    if getattr(create_request_cls, "_kombu_pg_metrics", False):
        return

    @functools.wraps(create_request_cls)
    def create_request_cls_observed(*args, **kwargs):
        cls = create_request_cls(*args, **kwargs)
        if not getattr(cls.on_success, "_kombu_pg_metrics", False):
            cls.on_success = _observing(cls.on_success)
        return cls

    create_request_cls_observed._kombu_pg_metrics = True
    strategy.create_request_cls = create_request_cls_observed


class WorkerMetrics(bootsteps.StartStopStep):
    """Serves /metrics from the worker's main process while the worker runs (when enabled)."""

    label = "kombu-pg metrics"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent, **kwargs):
        self.settings = settings_of(parent.app)
        super().__init__(parent, **kwargs)

    def include_if(self, parent):
        return self.settings is not None

    def create(self, parent):
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            from celery.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"{PORT_ENV} / {PORT_SETTING} is set but prometheus-client is not installed: "
                "pip install 'kombu-pg[metrics]'") from None
        patches.apply(patches.WORKER_METRICS)  # before the consumer builds its task strategies
        return Exporter(parent.app, buckets=self.settings["buckets"], port=self.settings["port"],
                        host=self.settings["host"], pool_forks=_pool_forks(parent.pool))


def _pool_forks(pool) -> bool:
    try:
        from celery.concurrency.prefork import TaskPool
    except ImportError:  # pragma: no cover
        return False
    return isinstance(pool, TaskPool)
