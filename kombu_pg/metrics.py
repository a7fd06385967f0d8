"""Prometheus exporter: the broker's state, read from PostgreSQL on each scrape, and this
process's event counters (:mod:`kombu_pg.counters`).

Needs ``prometheus-client`` (``pip install 'kombu-pg[metrics]'``). Served by ``kombu-pg metrics``
(standalone: database series only) and by the Celery worker bootstep of
:mod:`celery_ext.metrics` (database series, the worker's counters, task runtimes).

From the database, identical whichever process exports them (one query set per scrape):

=========================================================  ======================================
``kombu_pg_queue_ready_messages{queue}``                   deliverable now
``kombu_pg_queue_delayed_messages{queue}``                 waiting for an ETA/countdown or a
                                                           retry backoff
``kombu_pg_queue_leased_messages{queue}``                  held by a consumer (being processed
                                                           or prefetched)
``kombu_pg_queue_oldest_ready_age_seconds{queue}``         how long the longest-waiting ready
                                                           message has been deliverable (0: none)
``kombu_pg_dead_letters{queue,reason}``                    dead letters not yet replayed
``kombu_pg_dead_letters_replayed``                         dead letters replayed and still stored
                                                           (until ``kombu-pg dlq purge``)
``kombu_pg_up``                                            1 if this scrape read the database
``kombu_pg_scrape_duration_seconds``                       time the database reads took
=========================================================  ======================================

The queue gauges follow ``kombu-pg stats`` (the ``stats_queues`` statement): every declared
queue and every queue holding messages has a series.

From the exporting process only (counters, reset when it restarts):
``kombu_pg_messages_<event>_total{queue}`` for each event of :data:`kombu_pg.counters.EVENTS`
(published, delivered, acked, released, requeued, retried, dead_lettered, replayed,
duplicates_dropped). The collector takes the counts from a callable, so that the Celery
bootstep can add what the worker's pool processes did (see :mod:`celery_ext.metrics`).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import config, counters
from .admin import Admin

logger = logging.getLogger(__name__)

PREFIX = "kombu_pg"
DEFAULT_PORT = 9808

#: HELP texts of the in-process counters, by event.
EVENT_HELP = {
    "published": "Messages this process stored in a queue (one per receiving queue).",
    "delivered": "Messages this process leased from a queue (or took, for no-ack consumers).",
    "acked": "Messages this process acknowledged: processed and deleted.",
    "released": "Leases given back unprocessed (consumer shutdown, lost connection), or returned "
                "to their queue by the lease reaper after expiring.",
    "requeued": "Messages rejected with requeue by a consumer of this process (a failed attempt).",
    "retried": "Failed attempts recorded in PostgreSQL with a retry after backoff.",
    "dead_lettered": "Messages moved to the dead letters (max attempts, rejected, max retries, "
                     "lease expired, unregistered, undecodable, ...).",
    "replayed": "Dead letters this process put back on their queues.",
    "duplicates_dropped": "Publishes dropped because a message with the same unique key was "
                          "waiting or running.",
}

_QUEUE_GAUGES = (
    ("ready", "queue_ready_messages", "Messages deliverable now, per queue."),
    ("delayed", "queue_delayed_messages",
     "Messages waiting for their ETA/countdown or a retry backoff, per queue."),
    ("leased", "queue_leased_messages",
     "Messages leased by a consumer (being processed or prefetched), per queue."),
)
_AGE_HELP = ("Seconds the oldest ready message of the queue has been deliverable "
             "(0 when none is ready).")
_DEAD_HELP = "Dead letters not yet replayed, per queue and reason."
_REPLAYED_HELP = "Dead letters that were replayed and are still stored (until purged), all queues."
_UP_HELP = "1 if this scrape read the broker tables in PostgreSQL, 0 if that failed (see the log)."
_DURATION_HELP = "Seconds this scrape spent reading PostgreSQL."


class KombuPgCollector(Collector):
    """Reads the broker's state from PostgreSQL at each scrape; adds in-process counters.

    ``counts``: a callable returning ``{(event, queue): count}`` (default: this process's
    :func:`kombu_pg.counters.snapshot`), or None to export no counters (the standalone
    exporter, whose own counters would always be zero).
    """

    def __init__(self, url: str, schema: str = config.Options.schema, *,
                 counts: Callable[[], dict] | None = counters.snapshot):
        self.admin = Admin(url, schema, role="metrics")  # validates the URL: raises config.ConfigurationError
        self.counts = counts
        self._last_error: str | None = None

    def describe(self) -> Iterable:
        # Names only (for the registry's duplicate check): no database access on register.
        yield from self._db_families()
        yield GaugeMetricFamily(f"{PREFIX}_up", _UP_HELP)
        yield GaugeMetricFamily(f"{PREFIX}_scrape_duration_seconds", _DURATION_HELP)
        if self.counts is not None:
            yield from self._counter_families({})

    def collect(self) -> Iterable:
        started = time.monotonic()
        try:
            stats = self.admin.stats()
            replayed = self.admin.count(replayed=True)
        except Exception as exc:  # the database is down, the schema not migrated, ...
            error = " ".join(str(exc).split())
            if error != self._last_error:  # once per distinct error, not at every scrape
                logger.warning("kombu_pg metrics: cannot read %s (schema %s): %s",
                               self.admin.description, self.admin.schema, error)
            self._last_error = error
            stats, replayed = None, None
        else:
            if self._last_error is not None:
                logger.info("kombu_pg metrics: reading %s again", self.admin.description)
            self._last_error = None
        duration = time.monotonic() - started

        if stats is not None:
            yield from self._db_families(stats, replayed)
        yield GaugeMetricFamily(f"{PREFIX}_up", _UP_HELP, value=1 if stats is not None else 0)
        yield GaugeMetricFamily(f"{PREFIX}_scrape_duration_seconds", _DURATION_HELP, value=duration)
        if self.counts is not None:
            yield from self._counter_families(self.counts())

    @staticmethod
    def _db_families(stats: dict | None = None, replayed: int | None = None) -> list:
        queue_families = {key: GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["queue"])
                          for key, name, help_text in _QUEUE_GAUGES}
        age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_ready_age_seconds", _AGE_HELP, labels=["queue"])
        dead = GaugeMetricFamily(f"{PREFIX}_dead_letters", _DEAD_HELP, labels=["queue", "reason"])
        replayed_family = GaugeMetricFamily(f"{PREFIX}_dead_letters_replayed", _REPLAYED_HELP)
        if stats is not None:
            for q in stats["queues"]:
                for key, family in queue_families.items():
                    family.add_metric([q["queue"]], q[key])
                age.add_metric([q["queue"]], q["oldest_ready_age_s"] or 0.0)
            for d in stats["dead_letters"]:
                dead.add_metric([d["queue"], d["reason"]], d["count"])
            replayed_family.add_metric([], replayed or 0)
        return [*queue_families.values(), age, dead, replayed_family]

    @staticmethod
    def _counter_families(counts: dict) -> list:
        events = list(counters.EVENTS) + sorted({event for event, _ in counts} - set(counters.EVENTS))
        families = {event: CounterMetricFamily(
            f"{PREFIX}_messages_{event}", EVENT_HELP.get(event, f"Messages: {event} (this process)."),
            labels=["queue"]) for event in events}
        for (event, queue), value in sorted(counts.items()):
            families[event].add_metric([queue], value)
        return list(families.values())


def registry_for(*collectors) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def start_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """Serve ``registry`` on http://host:port/metrics from a daemon thread.

    Returns the server (``server.server_address[1]`` is the port, useful with port 0); stop it
    with :func:`stop_server`.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def stop_server(server) -> None:
    server.shutdown()
    server.server_close()


def serve_forever(url: str, schema: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                  echo: Callable[[str], None] = print) -> None:
    """The standalone exporter (``kombu-pg metrics``): database series only, until SIGINT/SIGTERM."""
    collector = KombuPgCollector(url, schema, counts=None)
    server = start_server(registry_for(collector), port, host)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        bound_host, bound_port = server.server_address[:2]
        echo(f"kombu-pg metrics: serving http://{_url_host(bound_host)}:{bound_port}/metrics "
             f"for {collector.admin.description} (schema {schema})")
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_server(server)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
