"""Install the Celery integration into every Celery app whose broker is PostgreSQL.

Imported at interpreter start by ``kombu_pg.pth``; costs nothing until Celery is imported. Once
``celery._state`` executes, we wrap its ``_register_app`` (called by every ``Celery()``; applied
by celery_ext.patches, like every patch of Celery) so that each new app is checked once its
configuration is complete: when it is first read, after every layer is in (constructor
arguments, ``conf``, ``config_from_object``, ``add_defaults``, Django settings), and again when
it is reloaded. Two later checks catch a broker URL set after that: when the app is finalized
(before its tasks read their settings), and when a worker starts.
"""
import logging

from . import patches

logger = logging.getLogger(__name__)

_worker_hook_connected = False


def check_every_app(state_module) -> None:
    """Wrap ``celery._state._register_app`` (celery_ext.patches)."""
    register_app = state_module._register_app
    if getattr(register_app, "_kombu_pg", False):
        return

    def _register_app(app):
        register_app(app)
        _connect_worker_hook()
        app.on_after_configure.connect(_on_configured, weak=False)
        if app.configured:  # read before it was registered (a fix-up, a subclass)
            _check(app)

    _register_app._kombu_pg = True
    state_module._register_app = _register_app
    state_module.connect_on_app_finalize(_check)


def _on_configured(sender=None, **kwargs) -> None:
    _check(sender)


def _check(app) -> None:
    """Install the integration if ``app``'s broker is PostgreSQL. Never breaks the app: an error
    is kept for the worker to report."""
    try:
        from .install import ensure  # Celery is loaded by now: import the real thing

        ensure(app)
        app._kombu_pg_error = None
    except Exception as exc:
        app._kombu_pg_error = exc
        logger.warning("kombu-pg: could not check or install the PostgreSQL broker integration: %r", exc)


def _connect_worker_hook() -> None:
    global _worker_hook_connected
    if not _worker_hook_connected:
        from celery import signals

        signals.celeryd_init.connect(_on_celeryd_init, weak=False, dispatch_uid="kombu_pg.celeryd_init")
        signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="kombu_pg.worker_init")
        _worker_hook_connected = True


def _on_celeryd_init(instance=None, **kwargs) -> None:
    """``celery worker``, before it creates the transport: broken broker settings end the
    program with one line (SystemExit passes through Celery's signal dispatch)."""
    app = getattr(instance, "app", None)
    if app is not None:
        from .install import check_broker_settings

        check_broker_settings(app)


def _on_worker_init(sender=None, **kwargs) -> None:
    app = getattr(sender, "app", None)
    if app is None:
        return
    _check(app)  # the broker URL may have been set after the app was configured and finalized
    error = getattr(app, "_kombu_pg_error", None)
    if error is not None and not getattr(app, "_kombu_pg_installed", False):
        logger.warning("kombu-pg: the PostgreSQL broker integration could not be installed (%r): "
                       "tasks run without lease renewal, server-side retries or dead letters", error)


def censor_urls(utils_module) -> None:
    """Wrap ``celery.app.utils.filter_hidden_settings``, which ``Settings.table()`` (behind
    humanize, bugreport and inspect conf) looks up at each call, so that censored settings also
    mask the passwords of URLs in any value, such as the transport option listen_url, whichever
    app asks."""
    original = utils_module.filter_hidden_settings
    if getattr(original, "_kombu_pg", False):
        return

    def filter_hidden_settings(conf):
        from kombu_pg.config import masked

        return masked(original(conf), "*" * 8)  # Celery's own mask there

    filter_hidden_settings._kombu_pg = True
    filter_hidden_settings.__doc__ = original.__doc__
    utils_module.filter_hidden_settings = filter_hidden_settings


patches.apply(patches.START)
