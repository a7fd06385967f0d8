"""Run a Celery worker for a test: ``python -m celery_ext.testing APP [worker options...]``.

The ``kombu_pg_worker`` pytest fixture (kombu_pg/testing/pytest_plugin.py) starts this, so that a
worker of the user's own app uses the test's broker schema whatever the app module configures:
the settings in the ``KOMBU_PG_TEST_SETTINGS`` environment variable (JSON) are laid over the
app's configuration before the worker starts. When the worker is ready to consume it creates
the file named by ``KOMBU_PG_TEST_READY``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from celery import signals
from celery.app.utils import find_app


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m celery_ext.testing APP [celery worker options...]")
    app = find_app(argv[0])
    app.conf.update(json.loads(os.environ.get("KOMBU_PG_TEST_SETTINGS") or "{}"))
    ready = os.environ.get("KOMBU_PG_TEST_READY")
    if ready:
        signals.worker_ready.connect(lambda **_: Path(ready).touch(), weak=False)
    app.worker_main(["worker", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
