"""What managed PostgreSQL services impose: sessions closed when idle, no superuser.

The idle-session tests run on a server of the test's own with ``idle_session_timeout`` (and
``idle_in_transaction_session_timeout``) set, as managed services do for every session.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import wait_for
from test_faults import assert_each_ran_once, publish

IDLE_TIMEOUT = 2  # seconds


@pytest.fixture
def idle_closing_server(private_server):
    return private_server(idle_session_timeout=f"{IDLE_TIMEOUT}s",
                          idle_in_transaction_session_timeout=f"{IDLE_TIMEOUT}s")


def idle_sessions_closed(server) -> int:
    return Path(server.logfile).read_text().count("terminating connection due to idle-session timeout")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_worker_and_producer_idle_longer_than_the_server_allows(idle_closing_server, env, make_app, procs):
    server = idle_closing_server
    # Leases renewed every 3 s: each renewal finds its connection closed by the server.
    app = make_app(broker_url=server.url, visibility_timeout=9)
    worker = procs.worker(app)
    task_ids = publish(app, 20, "idle")  # the producer's and the worker's pools are warm
    wait_for(lambda: len(env.runs("idle")) == 20, 60, what="the first 20 runs")

    time.sleep(3 * IDLE_TIMEOUT)  # the worker and the producer sit idle
    task_ids += publish(app, 20, "idle")  # raises if an error reaches the producer
    # A task outlives its lease several times over, on connections the server keeps closing.
    task_ids.append(app.sleepy.delay("idle", 15).id)
    time.sleep(3 * IDLE_TIMEOUT)
    task_ids += publish(app, 20, "idle")

    assert_each_ran_once(env, server, "idle", task_ids, settle=2)
    assert idle_sessions_closed(server) >= 3, "the server closed no idle sessions: the test tests nothing"
    log = worker.log()
    assert worker.alive()
    assert "Connection to broker lost" not in log
    assert not re.search(r"ERROR|CRITICAL|lease renewal failed|lost the lease", log), log


PRODUCT = Path(__file__).resolve().parents[2]
SETTING_CHANGES = re.compile(r"set_config\('(\w+)'|\bSET\s+(?:LOCAL|SESSION)\s+(\w+)", re.IGNORECASE)


def product_sources() -> dict[Path, str]:
    """The SQL and Python the product runs (not its test harness)."""
    files = [*PRODUCT.glob("migrations/*.sql"), *PRODUCT.glob("kombu_pg/**/*.sql"),
             *PRODUCT.glob("kombu_pg/**/*.py"), *PRODUCT.glob("celery_ext/**/*.py")]
    return {path: path.read_text() for path in files if "testing" not in path.relative_to(PRODUCT).parts}


def test_no_extension_and_only_settings_any_role_may_change(env):
    """Managed services grant no superuser: every setting a session changes must be one any
    role may set (context 'user'), and the schema needs no extension."""
    sources = product_sources()
    assert len(sources) > 20
    changed = {name.lower() for text in sources.values()
               for match in SETTING_CHANGES.finditer(text) for name in match.groups() if name}
    assert {"statement_timeout", "synchronous_commit", "lock_timeout"} <= changed
    contexts = dict(env.db.query("SELECT name, context FROM pg_settings WHERE name = ANY(%s)", (sorted(changed),)))
    assert contexts == dict.fromkeys(changed, "user"), contexts
    assert not [path.name for path, text in sources.items() if re.search(r"create\s+extension", text, re.I)]
