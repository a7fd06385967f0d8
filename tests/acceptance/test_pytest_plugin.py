"""The pytest plugin (kombu_pg/testing/pytest_plugin.py), used as a user would: a project of its
own with a tasks module, a conftest and tests, run by pytest in a subprocess. Its tests assert
that a failing task is tried max_attempts times, then dead-lettered: in a worker thread
(celery.contrib.pytest's celery_worker) and in a real prefork worker process (kombu_pg_worker)."""
from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)

TASKS = '''
from celery import Celery, shared_task

# The production broker; the tests put each test's own schema in its place.
app = Celery("tasks", broker="postgresql://app@db.example.invalid/proj")


@shared_task(max_attempts=3, backoff_base=0.1)
def charge(order_id):
    raise ConnectionError(f"payment service down for order {order_id}")
'''

CONFTEST = '''
import pytest

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture
def celery_config(kombu_pg_celery_config):
    return kombu_pg_celery_config
'''

TESTS = '''
import socket

import pytest

import tasks


def check(letter, task_id):
    assert letter.task_id == task_id and letter.task_name == "tasks.charge"
    assert (letter.reason, letter.attempts) == ("max_attempts", 3)
    assert [error["type"] for error in letter.errors] == ["ConnectionError"] * 3
    assert letter.message["headers"]["argsrepr"] in ("(42,)", "[42]")


def test_in_a_worker_thread(celery_app, celery_worker, kombu_pg_broker):
    result = tasks.charge.delay(42)
    [letter] = kombu_pg_broker.wait_for_dead_letters(1)
    check(letter, result.id)


def test_in_a_prefork_worker_process(celery_app, kombu_pg_worker, kombu_pg_broker):
    worker = kombu_pg_worker("tasks:app", "--pool", "prefork", "--concurrency", "2")
    # Without celery_worker, the app current in the test may be the tasks module's own (its
    # production broker): send through the test's app.
    result = celery_app.send_task("tasks.charge", (42,))
    [letter] = kombu_pg_broker.wait_for_dead_letters(1)
    check(letter, result.id)
    assert {error["worker"] for error in letter.errors} == {f"w1@{socket.gethostname()}"}
    assert "kombu-pg: PostgreSQL broker integration active" in worker.log()


SCHEMAS = []


@pytest.mark.parametrize("n", [1, 2])
def test_each_test_has_a_fresh_schema(kombu_pg_broker, n):
    assert kombu_pg_broker.schema not in SCHEMAS
    SCHEMAS.append(kombu_pg_broker.schema)
    assert kombu_pg_broker.admin.stats() == {"queues": [], "dead_letters": []}
'''


@pytest.fixture
def project(pytester, pg_url, monkeypatch):
    monkeypatch.setenv("KOMBU_PG_TEST_URL", pg_url)
    pytester.makepyfile(tasks=TASKS, conftest=CONFTEST, test_tasks=TESTS)
    return pytester


def _schemas(db) -> set[str]:
    return {row[0] for row in db.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'kp_test_%'")}


@pytest.mark.slow
def test_a_users_tests_see_retries_and_dead_letters(project, _session_db):
    before = _schemas(_session_db)
    result = project.runpytest_subprocess("-v", "-p", "no:cacheprovider", "--timeout", "120", timeout=300)
    result.assert_outcomes(passed=4)
    assert "PytestAssertRewriteWarning" not in result.stdout.str()
    assert _schemas(_session_db) == before  # every test's schema was dropped


def test_the_plugin_does_nothing_unless_asked(pytester, monkeypatch):
    monkeypatch.setenv("KOMBU_PG_TEST_URL", "postgresql://nobody@/nowhere?host=/nonexistent-kp-dir")
    pytester.makepyfile(test_plain='''
        import sys

        def test_plain(request):
            assert request.config.pluginmanager.has_plugin("kombu_pg")
            loaded = [m for m in sys.modules if m.split(".")[0] in ("psycopg", "celery") or m in (
                "kombu_pg.admin", "kombu_pg.embedded", "kombu_pg.transport")]
            assert loaded == []
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    assert "PytestAssertRewriteWarning" not in result.stdout.str()
