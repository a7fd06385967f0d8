"""Celery's own pytest fixtures (``celery.contrib.pytest``) with a PostgreSQL broker: the
``celery_app`` fixture configures its app through ``add_defaults``, and ``celery_worker`` runs a
worker in a thread of the test process (solo pool). The integration is active there too: a
failing task is retried server-side, then dead-lettered."""
from __future__ import annotations

import pytest

from conftest import dead_letters, wait_for

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture
def celery_config(env):
    return {"broker_url": env.url,
            "broker_transport_options": {**env.transport_options, "max_attempts": 3,
                                         "backoff_base": 0.2, "polling_interval": 0.2}}


def test_celery_pytest_fixtures_get_the_integration(celery_app, celery_worker, env):
    assert celery_app.conf.task_acks_late is True and celery_app.conf.task_reject_on_worker_lost is True
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

    [letter] = wait_for(lambda: dead_letters(env), 10, what="the dead letter")
    assert (letter["task_id"], letter["reason"], letter["attempts"]) == (result.id, "max_attempts", 3)
    assert [error["type"] for error in letter["errors"]] == ["ValueError"] * 3
    assert isinstance(result.result, ValueError)
