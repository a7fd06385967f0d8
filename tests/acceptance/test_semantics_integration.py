"""The Celery integration is automatic: an app whose broker_url is postgresql:// gets it with no
import of this package and no change to its tasks; the worker says so in one log line, and the
settings it defaults are in force in the worker unless the user set them."""
from __future__ import annotations

import pytest

from conftest import INTEGRATION_LINE
from celery import Celery

SETTINGS = ("task_acks_late", "task_reject_on_worker_lost", "task_acks_on_failure", "task_acks_on_timeout")

TASKS = '''
@app.task(bind=True)
def settings(self, names):
    record(self, "settings")
    return {name: self.app.conf[name] for name in names}
'''


@pytest.mark.parametrize("user_conf", [{}, {"task_acks_late": False, "task_acks_on_failure": True}],
                         ids=["defaults", "user-overrides"])
def test_integration_is_automatic_and_user_settings_win(make_app, procs, env, user_conf):
    app = make_app(visibility_timeout=3, conf=user_conf, extra_source=TASKS)
    source = app.path.read_text()
    assert "kombu_pg" not in source and "celery_ext" not in source
    assert "import kombu" not in source

    worker = procs.worker(app, pool="prefork", concurrency=1)
    expected = {"task_acks_late": True, "task_reject_on_worker_lost": True,
                "task_acks_on_failure": False, "task_acks_on_timeout": False, **user_conf}
    assert app.settings.delay(list(SETTINGS)).get(timeout=30) == expected  # as seen in the worker
    lines = [line for line in worker.log().splitlines() if INTEGRATION_LINE in line]
    assert len(lines) == 1, lines
    assert f"task_acks_late={expected['task_acks_late']}" in lines[0]
    assert "task_reject_on_worker_lost=True" in lines[0]
    # In this process too (the same .pth hook): the publisher's app has the same settings.
    assert {name: app.app.conf[name] for name in SETTINGS} == expected


def test_other_brokers_are_left_alone():
    other = Celery("not_pg", broker="memory://", set_as_current=False)
    assert other.conf.task_acks_late is False
    assert other.conf.task_reject_on_worker_lost is None
    assert not getattr(other, "_kombu_pg_installed", False)
