"""Upgrading to the lease layout of migration 0006 while workers run and messages are in flight.

A worker of the previous release claims by moving ``visible_at`` to the lease's end; the new
one leaves ``visible_at`` alone and writes ``leased_until``. The test plays a worker of the
previous release with that release's own claim and ack statements, consuming a backlog from a
schema at version 0005; the migration is applied under it, a new worker joins, and the old one
stops, abandoning a claimed batch as a killed worker would. Every task must run exactly once.
"""
from __future__ import annotations

import threading
import time
import uuid

import kombu
import psycopg
import pytest
from psycopg import sql

from conftest import wait_for
from kombu_pg import migrate

TASKS = 1500
VISIBILITY_TIMEOUT = 3

# The statements of the previous release (queries.sql before migration 0006).
OLD_CLAIM = """
WITH c AS (
    SELECT id FROM {t}
    WHERE queue = 'celery' AND visible_at <= now() AND (expires_at IS NULL OR expires_at > now())
      AND (lease_token IS NULL OR delivery_count < 5)
    ORDER BY priority DESC, visible_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {t} m
SET lease_token = gen_random_uuid(), visible_at = now() + %(lease)s * interval '1 second',
    delivery_count = m.delivery_count + 1
FROM c WHERE m.id = c.id
RETURNING m.id, m.lease_token, m.task_id
"""
OLD_ACK = "DELETE FROM {t} WHERE id = %s AND lease_token = %s"


class OldReleaseWorker(threading.Thread):
    """Consumes as a worker of the previous release, recording each run as the `mark` task does."""

    def __init__(self, env):
        super().__init__(daemon=True)
        self.env = env
        self.stopping = threading.Event()
        self.abandoned: list[str] = []
        self.table = sql.SQL("{}.messages").format(sql.Identifier(env.broker_schema))

    def run(self):
        with psycopg.connect(self.env.url, autocommit=True, application_name="kp_old_release") as conn:
            claim, ack = (sql.SQL(OLD_CLAIM).format(t=self.table), sql.SQL(OLD_ACK).format(t=self.table))
            runs = sql.SQL("INSERT INTO {}.runs (task_id, label, hostname) VALUES (%s, 'upgrade', 'old')").format(
                sql.Identifier(self.env.app_schema))
            while True:
                rows = conn.execute(claim, {"limit": 10, "lease": VISIBILITY_TIMEOUT}).fetchall()
                if self.stopping.is_set():  # killed with a batch in hand: its leases expire
                    self.abandoned = [task_id for _, _, task_id in rows]
                    return
                for message_id, token, task_id in rows:
                    conn.execute(runs, (task_id,))
                    time.sleep(0.005)
                    conn.execute(ack, (message_id, token))
                if not rows:
                    time.sleep(0.02)


def celery_payloads(app, env, count: int) -> list[tuple[str, str]]:
    """(task id, payload) of ``count`` real task messages of ``app``: one published to a scratch
    schema by the current code, its id swapped for each copy."""
    scratch = f"{env.broker_schema}_x"
    with kombu.Connection(app.broker_url, transport_options={"schema": scratch}) as conn:
        app.sleepy.apply_async(("upgrade", 0.02), connection=conn, task_id="TEMPLATE-ID")
    template = env.db.scalar(sql.SQL("SELECT payload FROM {}.messages").format(sql.Identifier(scratch)))
    env.db.query(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(scratch)))
    assert template and "TEMPLATE-ID" in template
    ids = [str(uuid.uuid4()) for _ in range(count)]
    return [(task_id, template.replace("TEMPLATE-ID", task_id)) for task_id in ids]


def run_counts(env) -> dict[str, int]:
    return dict(env.db.query(sql.SQL("SELECT task_id, count(*) FROM {}.runs WHERE label = 'upgrade' GROUP BY 1")
                             .format(sql.Identifier(env.app_schema))))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_upgrade_under_load_loses_and_duplicates_nothing(env, make_app, procs):
    app = make_app(visibility_timeout=VISIBILITY_TIMEOUT)
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, env.broker_schema, up_to=5)  # the previous release's schema
    messages = celery_payloads(app, env, TASKS)
    env.db.query(sql.SQL("INSERT INTO {}.messages (queue, payload, task_id, task_name)"
                         " SELECT 'celery', p, t, %s FROM unnest(%s::text[], %s::text[]) AS u(t, p)").format(
        sql.Identifier(env.broker_schema)), (app.task_name("sleepy"), [t for t, _ in messages], [p for _, p in messages]))

    old = OldReleaseWorker(env)
    old.start()
    wait_for(lambda: len(run_counts(env)) >= TASKS // 5, 60, what="the old worker to make progress")
    with psycopg.connect(env.url, autocommit=True) as conn:
        assert 6 in migrate.migrate(conn, env.broker_schema)  # under load
    worker = procs.worker(app, concurrency=2)  # the new release, next to the old one
    wait_for(lambda: len(run_counts(env)) >= TASKS // 2, 120, what="both workers to make progress")
    old.stopping.set()
    old.join(30)
    assert old.abandoned, "the old worker left a claimed batch behind"

    task_ids = [t for t, _ in messages]
    wait_for(lambda: len(run_counts(env)) >= TASKS, 180, what=lambda: f"{TASKS} tasks run (have {len(run_counts(env))})")
    wait_for(lambda: env.message_count("celery") == 0, 60, what="an empty queue")
    time.sleep(2 * VISIBILITY_TIMEOUT)  # a lease taken twice would show as a second run by now
    counts = run_counts(env)
    twice = {t: n for t, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} task(s) ran twice: {list(twice.items())[:5]}"
    assert set(counts) == set(task_ids)
    hosts = dict(env.db.query(sql.SQL("SELECT hostname = 'old', count(*) FROM {}.runs GROUP BY 1")
                              .format(sql.Identifier(env.app_schema))))
    assert hosts.get(True) and hosts.get(False), f"both releases ran tasks: {hosts}"
    assert worker.alive()
