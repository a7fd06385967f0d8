"""Which statements wait for the WAL flush at commit.

A publish, an ack, a release and a failed attempt always wait, so that what the caller was told
happened survives a crash of the server. Taking or extending a lease waits too by default
(durable_leases): a lease lost in a crash would let a running task's message run again. With
durable_leases off they commit without waiting.
"""
import psycopg
import pytest

from kombu_pg import migrate
from kombu_pg.config import Options
from kombu_pg.database import Database
from kombu_pg.store import store_for

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
        yield conn, store_for(env.broker_schema)


@pytest.mark.parametrize("durable_leases", [True, False])
def test_which_statements_wait_for_the_flush(db, durable_leases):
    conn, q = db
    lease_commit = Options(durable_leases=durable_leases)
    lease_setting = "on" if durable_leases else "off"
    assert synchronous_commit_after(conn, q.sql["publish_direct"], PUBLISH) == "on"
    assert synchronous_commit_after(conn, q.sql["publish_direct"], PUBLISH) == "on"

    commit = {"synchronous_commit": Database("", lease_commit, "").lease_commit}
    rows, setting = run(conn, q.sql["claim"], {"queue": "q", "limit": 10, "default_max_attempts": 5, "lease_seconds": 30,
                                        "held": [], "holder": "w1@host[1]", **commit})
    assert len(rows) == 2 and setting == lease_setting
    ids, tokens = [r[0] for r in rows], [r[1] for r in rows]
    assert synchronous_commit_after(
        conn, q.sql["renew"], {"ids": ids, "tokens": tokens, "lease_seconds": 30, **commit}) == lease_setting
    # The setting was local to those transactions.
    assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"

    assert synchronous_commit_after(conn, q.sql["ack"], {"ids": ids[:1], "tokens": tokens[:1]}) == "on"
    assert synchronous_commit_after(conn, q.sql["release"], {"ids": ids[1:], "tokens": tokens[1:], "channel": "kombu_pg"}) == "on"
    remaining = conn.execute(f'SELECT count(*) FROM "{q.schema}".messages').fetchone()[0]
    assert remaining == 1  # one acked, one released: the claim and renewal really committed
