"""Install the Celery integration into every Celery app whose broker is PostgreSQL.

Imported at interpreter start by ``kombu_pg.pth``; costs nothing until Celery is imported. Once
``celery._state`` executes, we wrap its ``_register_app`` (called by every ``Celery()``) so that
each new app gets our settings as a *defaults* layer: evaluated lazily when the app reads its
configuration, before any task is bound to it, and overridden by anything the user configured.
"""
from kombu_pg._autoload import after_import


def _on_celery_state(state_module) -> None:
    register_app = state_module._register_app

    def _register_app(app):
        register_app(app)
        app.add_defaults(lambda: _defaults_for(app))

    state_module._register_app = _register_app


def _defaults_for(app) -> dict:
    from .install import install  # Celery is loaded by now: import the real thing

    return install(app)


def censor_urls(utils_module) -> None:
    """Wrap ``celery.app.utils.filter_hidden_settings``, which ``Settings.table()`` (behind
    humanize, bugreport and inspect conf) looks up at each call, so that censored settings also
    mask the passwords of URLs in any value, such as the transport option listen_url."""
    original = utils_module.filter_hidden_settings
    if getattr(original, "_kombu_pg", False):
        return

    def filter_hidden_settings(conf):
        from kombu_pg.config import masked

        return masked(original(conf), "*" * 8)  # Celery's own mask there

    filter_hidden_settings._kombu_pg = True
    filter_hidden_settings.__doc__ = original.__doc__
    utils_module.filter_hidden_settings = filter_hidden_settings


after_import("celery._state", _on_celery_state)
# Censored settings (celery report, conf.humanize) must not show passwords of URL-valued
# options such as listen_url, whichever app asks.
after_import("celery.app.utils", censor_urls)
