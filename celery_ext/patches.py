"""Every place where kombu-pg changes Celery or Kombu code, in one table, applied from here.

Each :class:`Patch` names the attribute it replaces or extends (``module:Class.attribute``), why,
the Celery/Kombu version it was checked against, when it is applied, and the function that
applies it, which lives in the module owning the behaviour. tests/acceptance/test_celery_patches.py
checks that every target still exists in the installed Celery and Kombu (an upgrade that renames
one fails there, not in production) and that applying twice changes nothing (each owner function
marks what it wrapped and leaves it alone the second time).

When, and so in which processes (:func:`apply` is called with one of these):

``START``
    every interpreter: ``celery_ext._autoload`` (loaded by ``kombu_pg.pth``) applies these as
    soon as their module is imported, before any app exists. Cheap: nothing is imported here.
``INSTALL``
    the first time an app whose broker is PostgreSQL is installed (``celery_ext.install``), in
    the process that creates it: workers, beat, producers. Celery's classes are patched for
    every app of the process, so each wrapper checks the app is ours (``_kombu_pg_installed``)
    or the transport is this one before changing anything.
``WORKER_METRICS``
    a worker with the Prometheus exporter turned on, when its bootstep starts.

This module is imported at interpreter start: it must import nothing costly (no Celery, no
typing, no dataclasses).
"""
from __future__ import annotations

from kombu_pg._autoload import after_import

START, INSTALL, WORKER_METRICS = "start", "install", "worker metrics"
#: The Celery and Kombu version every target below was read in.
CHECKED = "5.7.0"


class Patch:
    __slots__ = ("target", "owner", "why", "when", "after_import", "applied_by", "checked")

    def __init__(self, target: str, owner: str, why: str, when: str, after_import: str | None = None,
                 applied_by: str | None = None, checked: str = CHECKED):
        #: ``module:Class.attribute`` (``[key]`` for a dict item) that is replaced or extended.
        self.target = target
        #: ``module:function`` that applies it (called with the module when ``after_import``).
        self.owner = owner
        self.why = why
        self.when = when
        #: Applied once this module is imported (at once if it already is).
        self.after_import = after_import
        #: Set when another module applies it (kombu_pg may not import celery_ext).
        self.applied_by = applied_by
        self.checked = checked

    def __repr__(self) -> str:
        return f"Patch({self.target!r} by {self.owner})"


_CONSUMER = "celery.worker.consumer.consumer:Consumer"

PATCHES: tuple[Patch, ...] = (
    # -- every interpreter ---------------------------------------------------------------------
    *(Patch(f"kombu.transport:TRANSPORT_ALIASES['{scheme}']", "kombu_pg._autoload:register",
            f"{scheme}:// URLs resolve to kombu_pg's Transport: Kombu has no plugin mechanism for "
            "transports", START, after_import="kombu.transport", applied_by="kombu_pg._autoload")
      for scheme in ("postgresql", "postgres", "pg")),
    Patch("celery._state:_register_app", "celery_ext._autoload:check_every_app",
          "every Celery() app is checked once its configuration is complete, and the integration "
          "installed if its broker is PostgreSQL", START, after_import="celery._state"),
    Patch("celery.app.utils:filter_hidden_settings", "celery_ext._autoload:censor_urls",
          "censored settings (celery report, conf.humanize, inspect conf) also mask passwords of "
          "URLs in other values, such as the transport option listen_url", START,
          after_import="celery.app.utils"),
    # -- the first app on this broker ----------------------------------------------------------
    Patch(f"{_CONSUMER}.on_connection_error_after_connected",
          "celery_ext.inflight:keep_deliveries_across_reconnects",
          "notes that the connection was lost, for on_close below", INSTALL),
    Patch(f"{_CONSUMER}.on_close", "celery_ext.inflight:keep_deliveries_across_reconnects",
          "a lost connection keeps the requests, timers and pool jobs Celery holds: their leases "
          "survive it and they are acked over the new connection, not run twice", INSTALL),
    Patch("celery.concurrency.thread:TaskPool.on_apply", "celery_ext.inflight:track_thread_pool_jobs",
          "jobs waiting in the threads pool's executor keep their lease when the worker stops",
          INSTALL),
    *(Patch(f"celery.concurrency.{pool}:TaskPool.{attribute}", "celery_ext.inflight:track_green_pool_jobs",
            "greenlets submitted and not started yet keep their lease when the worker stops",
            INSTALL, after_import=f"celery.concurrency.{pool}")
      for pool in ("gevent", "eventlet") for attribute in ("on_apply", "_add_to_pool_map")),
    Patch(f"{_CONSUMER}.connect", "celery_ext.consumer:exit_on_configuration_error",
          "a broker unusable as configured ends the worker with one line, not a retry loop or "
          "a traceback", INSTALL),
    Patch(f"{_CONSUMER}.update_strategies", "celery_ext.consumer:wrap_new_tasks",
          "tasks defined after the app was finalized get server-side retries too", INSTALL),
    *(Patch(f"{_CONSUMER}.{handler}", "celery_ext.consumer:dead_letter_unrunnable_messages",
            "a message the worker cannot run is dead-lettered with its reason, not dropped",
            INSTALL)
      for handler in ("on_decode_error", "on_unknown_task", "on_unknown_message", "on_invalid_task")),
    Patch(f"{_CONSUMER}.create_task_handler", "celery_ext.consumer:dead_letter_unrunnable_messages",
          "a malformed task message is dead-lettered instead of stopping the worker; durably "
          "revoked ones are dropped", INSTALL),
    Patch("celery.worker.worker:WorkController._process_task",
          "celery_ext.consumer:dead_letter_unrunnable_messages",
          "a request that fails on its content when handed to the pool is dead-lettered", INSTALL),
    Patch("celery.worker.request:Request.on_failure", "celery_ext.consumer:record_pool_failures",
          "a body undecodable in the pool is dead-lettered; a killed pool process is a failed "
          "attempt (retried with backoff, dead-lettered at the cap)", INSTALL),
    Patch("celery.worker.request:Request.on_timeout", "celery_ext.consumer:record_pool_failures",
          "a hard time limit is a failed attempt, not an immediate redelivery", INSTALL),
    Patch("celery.app.control:Control.broadcast", "celery_ext.revoke:revoke_in_the_database",
          "app.control.revoke also revokes durably in the database", INSTALL),
    Patch("celery.worker.control:Panel.data['scheduled']", "celery_ext.scheduled:list_delayed_tasks",
          "celery inspect scheduled also lists the delayed tasks the table holds", INSTALL),
    Patch("celery.worker.consumer.mingle:Mingle.compatible_transports",
          "celery_ext.peers:enable_mingle_and_gossip", "mingle runs for workers on this broker",
          INSTALL),
    Patch("celery.worker.consumer.gossip:Gossip.compatible_transport",
          "celery_ext.peers:enable_mingle_and_gossip",
          "gossip runs for workers on this broker unless the app sets kombu_pg_gossip = False",
          INSTALL),
    Patch("celery.worker.consumer.heart:Heart.__init__", "celery_ext.peers:space_heartbeats",
          "heartbeat events every 10 s on this broker (each is a server transaction) unless "
          "--heartbeat-interval says", INSTALL),
    # -- a worker serving /metrics -------------------------------------------------------------
    Patch("celery.worker.strategy:create_request_cls", "celery_ext.metrics:install_request_hook",
          "the Request classes it creates time successful tasks for the exporter", WORKER_METRICS),
    Patch("celery.worker.request:Request.on_success", "celery_ext.metrics:install_request_hook",
          "wrapped in each class create_request_cls makes (not in Request itself)", WORKER_METRICS),
)


#: The attribute that marks a function as kombu-pg's wrapper, so that applying twice is a no-op.
MARK = "_kombu_pg"


def mark(*functions: object) -> None:
    """Mark wrappers as ours (``is_ours`` then tells the owner function it already ran)."""
    for function in functions:
        setattr(function, MARK, True)


def is_ours(function: object) -> bool:
    return bool(getattr(function, MARK, False))


def resolve(path: str) -> object:
    """The object at ``module:Name.attribute`` or ``module:Name.mapping['key']``."""
    import importlib

    module_name, _, rest = path.partition(":")
    found: object = importlib.import_module(module_name)
    for part in rest.split("."):
        name, _, key = part.partition("[")
        found = getattr(found, name)
        if key:
            found = found[key.rstrip("]").strip("'\"")]  # type: ignore[index]
    return found


def apply(when: str) -> None:
    """Apply the patches of one trigger point, in the table's order, each owner function once.
    Idempotent."""
    done = set()
    for patch in PATCHES:
        key = (patch.owner, patch.after_import)
        if patch.when != when or patch.applied_by or key in done:
            continue
        done.add(key)
        owner = resolve(patch.owner)
        if patch.after_import:
            after_import(patch.after_import, owner)
        else:
            owner()  # type: ignore[operator]
