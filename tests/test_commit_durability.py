"""Which statements wait for the WAL flush at commit.

Taking or extending a lease commits without waiting (a crash of the server can only make the
message deliverable again); a publish, an ack and a failed attempt wait, so that what the caller
was told happened survives a crash of the server.
"""
import psycopg
import pytest

from kombu_pg import migrate
from kombu_pg.queries import for_schema

PUBLISH = {"queue": "q", "priority": 0, "eta": None, "ttl_ms": None, "payload": "{}", "task_id": "t",
           "task_name": "n", "max_attempts": None, "unique_key": None, "unique_replace": False,
           "notify": False, "channel": "kombu_pg"}


def run(conn, query, params) -> tuple[list, str]:
    """The statement's rows, and the setting its own transaction would commit with."""
    with conn.transaction():
        rows = conn.execute(query, params).fetchall()
        return rows, conn.execute("SHOW synchronous_commit").fetchone()[0]


def synchronous_commit_after(conn, query, params) -> str:
    return run(conn, query, params)[1]


@pytest.fixture
def db(env):
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, env.broker_schema)
        yield conn, for_schema(env.broker_schema)


def test_leases_do_not_wait_for_the_flush_and_everything_else_does(db):
    conn, q = db
    assert synchronous_commit_after(conn, q.publish_direct, PUBLISH) == "on"
    assert synchronous_commit_after(conn, q.publish_direct, PUBLISH) == "on"

    rows, setting = run(conn, q.claim, {"queue": "q", "limit": 10, "max_attempts": 5, "lease_seconds": 30})
    assert len(rows) == 2 and setting == "off"
    ids, tokens = [r[0] for r in rows], [r[1] for r in rows]
    assert synchronous_commit_after(
        conn, q.renew, {"ids": ids, "tokens": tokens, "lease_seconds": 30}) == "off"
    # The setting was local to those transactions.
    assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"

    assert synchronous_commit_after(conn, q.ack, {"ids": ids[:1], "tokens": tokens[:1]}) == "on"
    assert synchronous_commit_after(conn, q.release, {"ids": ids[1:], "tokens": tokens[1:], "channel": "kombu_pg"}) == "on"
    remaining = conn.execute(f'SELECT count(*) FROM "{q.schema}".messages').fetchone()[0]
    assert remaining == 1  # one acked, one released: the claim and renewal really committed
