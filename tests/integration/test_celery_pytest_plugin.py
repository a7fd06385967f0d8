"""Celery's own pytest fixtures (``celery.contrib.pytest``) with a PostgreSQL broker, through
kombu-pg's pytest plugin: ``celery_config`` returns the plugin's ``kombu_pg_celery_config`` (the
test's own schema); the ``celery_app`` fixture configures its app through ``add_defaults``, and
``celery_worker`` runs a worker in a thread of the test process (solo pool). The integration is
active there too: a failing task is retried server-side, then dead-lettered."""
from __future__ import annotations

import pytest

from conftest import wait_for

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture
def celery_config(kombu_pg_celery_config):
    options = {**kombu_pg_celery_config["broker_transport_options"],
               "max_attempts": 3, "backoff_base": 0.2, "polling_interval": 0.2}
    return {**kombu_pg_celery_config, "broker_transport_options": options}


def test_celery_pytest_fixtures_get_the_integration(celery_app, celery_worker, kombu_pg_broker):
    assert celery_app.conf.task_acks_late is True and celery_app.conf.task_reject_on_worker_lost is True
    assert celery_app.conf.broker_transport_options["schema"] == kombu_pg_broker.schema
    attempts = []

    # Defined in the test, as Celery's documentation shows: after the app was finalized, so the
    # worker learns of it through reload().
    @celery_app.task(bind=True)
    def always_fails(self, label):
        attempts.append(bool(self.request.delivery_info.get("redelivered")))
        raise ValueError(f"boom {label}")

    celery_worker.reload()
    result = always_fails.delay("fixture")
    wait_for(lambda: result.state == "FAILURE", 30, what=lambda: f"{result.id} to fail (is {result.state})")
    assert attempts == [False, True, True]  # the same message, redelivered by the broker

    [letter] = kombu_pg_broker.wait_for_dead_letters(1, timeout=10)
    assert (letter.task_id, letter.reason, letter.attempts) == (result.id, "max_attempts", 3)
    assert [error["type"] for error in letter.errors] == ["ValueError"] * 3
    assert isinstance(result.result, ValueError)
