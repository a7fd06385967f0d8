"""Query-plan regression tests: the claim must use its index, however deep the queue."""
import json

import psycopg
import pytest
from psycopg import sql

from kombu_pg import migrate
from kombu_pg.store import store_for


@pytest.fixture
def deep_schema(env):
    """The broker schema with 100k ready messages in one queue and 100k delayed in another."""
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, env.broker_schema)
        messages = sql.SQL("{}.messages").format(sql.Identifier(env.broker_schema))
        conn.execute(sql.SQL(
            "INSERT INTO {} (queue, payload) SELECT 'deep', '{{}}' FROM generate_series(1, 100000)"
        ).format(messages))
        conn.execute(sql.SQL(
            "INSERT INTO {} (queue, payload, visible_at)"
            " SELECT 'later', '{{}}', now() + interval '1 hour' FROM generate_series(1, 100000)"
        ).format(messages))
        conn.execute(sql.SQL("ANALYZE {}").format(messages))
    return env.broker_schema


def plan(url, query, params) -> dict:
    with psycopg.connect(url) as conn:  # a transaction: the EXPLAIN ANALYZE claim is rolled back
        rows = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", params).fetchall()
        conn.rollback()
    return rows[0][0][0]


def nodes(node):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


@pytest.mark.parametrize("queue", ["deep", "later"])
def test_claim_uses_the_claim_index_at_100k_rows(env, deep_schema, queue):
    sql = store_for(deep_schema).sql
    result = plan(env.url, sql["claim"], {"queue": queue, "limit": 10, "default_max_attempts": 5, "lease_seconds": 30,
                                        "held": [1, 2, 3], "synchronous_commit": "on", "holder": "w1@host[1]"})
    scans = [n for n in nodes(result["Plan"]) if n.get("Relation Name") == "messages"]
    assert scans, json.dumps(result, indent=1)
    assert all(n["Node Type"] != "Seq Scan" for n in scans), json.dumps(result, indent=1)
    assert any(n.get("Index Name") == "messages_claim_idx" for n in scans), json.dumps(result, indent=1)


def test_poll_uses_the_claim_index_at_100k_rows(env, deep_schema):
    """The safety-net poll of a ready and a delayed queue of 100k rows each: by the claim index."""
    sql = store_for(deep_schema).sql
    result = plan(env.url, sql["poll"], {"queues": ["deep", "later"], "hold_s": 60, "refresh_s": 45,
                                    "holder": "plan", "lease_s": 15})
    scans = [n for n in nodes(result["Plan"]) if n.get("Relation Name") == "messages"]
    assert scans, json.dumps(result, indent=1)
    assert all(n.get("Index Name") == "messages_claim_idx" for n in scans), json.dumps(result, indent=1)
