"""What the Celery integration decides from an app's settings alone, before any connection:
whether the broker is this transport, and that censored settings show no broker password."""
from __future__ import annotations

import pytest
from celery import Celery

from celery_ext.install import uses_pg_broker


@pytest.mark.parametrize("broker, ours", [
    ("postgresql://u@h/db", True),
    ("pg://u@h/db;pg://u@h2/db", True),
    ("PostgreSQL://u@h/db", True),
    ("postgresql+psycopg://u@h/db", True),  # the worker then refuses it, naming the URL to write
    ("redis://localhost:6379/0", False),
    ("amqp://guest@localhost//", False),
])
def test_which_brokers_are_this_transport(broker, ours):
    app = Celery("unit_broker_check", broker=broker, set_as_current=False)
    try:
        assert uses_pg_broker(app) is ours
    finally:
        app.close()


def test_censored_settings_mask_urls_in_transport_options():
    app = Celery("unit_censored", broker="postgresql://u:s3cret@h/db", set_as_current=False)
    app.conf.broker_transport_options = {"listen_url": "postgresql://u:s3cret@direct/db", "schema": "app"}
    try:
        text = app.conf.humanize(with_defaults=False, censored=True)
    finally:
        app.close()
    assert "s3cret" not in text
    assert "postgresql://u:********@direct/db" in text and "'schema': 'app'" in text
