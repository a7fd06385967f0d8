"""kombu-pg's Celery integration (installed automatically for apps whose broker is PostgreSQL).

PYTEST_DONT_REWRITE: imported at interpreter start (celery_ext._autoload), before pytest marks
the distribution's packages for assert rewriting; the marker tells pytest not to warn about it.
"""
