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


after_import("celery._state", _on_celery_state)
