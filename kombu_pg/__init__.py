"""kombu-pg: a PostgreSQL broker for Celery and Kombu.

Importing this package is cheap (the interpreter-start hook imports it): everything else is
loaded on first use.

PYTEST_DONT_REWRITE: this package is a pytest plugin's (kombu_pg.testing.pytest_plugin) and is
imported at interpreter start, before pytest could rewrite its asserts; the marker tells pytest
not to warn about that.
"""

__all__ = ["enqueue_in", "Admin"]


def __getattr__(name):
    if name == "enqueue_in":
        from .atomic import enqueue_in

        return enqueue_in
    if name == "Admin":
        from .admin import Admin

        return Admin
    raise AttributeError(f"module 'kombu_pg' has no attribute {name!r}")
