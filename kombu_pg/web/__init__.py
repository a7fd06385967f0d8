"""The operator's web console: ``kombu-pg web`` (and ``celery -A app pg web``).

Queues with their rates, dead letters (filter, inspect, replay, purge), the beat schedule
(pause, resume, run now), who holds leases, task lookup: HTML pages usable without JavaScript
and the same under /api/ as JSON. Reads the truth from the database on every request. Needs the
``web`` extra (Flask and waitress): ``pip install 'kombu-pg[web]'``.

    from kombu_pg.web import Access, Console, create_app
    app = create_app(Console(url, schema), Access(token="..."))  # any WSGI server
"""
from __future__ import annotations

__all__ = ["Access", "Console", "create_app"]


def __getattr__(name: str):
    # Lazily: Flask is needed only once a console is made (the extra `web`).
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "Console":
        from .data import Console
        return Console
    if name == "Access":
        from .security import Access
        return Access
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
