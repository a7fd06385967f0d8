"""Every statement of kombu_pg/sql/*.sql is valid against a freshly migrated schema, has its
caller in the store, and the store is the only module with SQL in it.

Validity: each statement (fragments spliced in, schema rendered) is prepared by the server, with
untyped parameters as prepared.py sends them (so every parameter's type must follow from the
statement), then planned with EXPLAIN EXECUTE under a generic plan: parse, analysis, rewrite
and planning, nothing executed. Statements that cannot be prepared (utility statements) run.
"""
from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, pq, sql

from kombu_pg import migrate, queries
from kombu_pg.prepared import PreparedStatement
from kombu_pg.store import store_for
from kombu_pg.store.records import NewMessage

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "kombu_pg" / "store"
#: Statements the server does not prepare: run instead (in a transaction that is rolled back,
#: except VACUUM, which cannot run in one).
UTILITY = {"create_schema", "create_migrations_table", "migrate_lock_taken", "vacuum_messages"}


@pytest.fixture(params=["plain", "odd name"])
def schema(request, env):
    """The test's broker schema, migrated; also one whose name needs quoting and has a % (the
    statements double it for psycopg and prepared.py)."""
    name = env.broker_schema if request.param == "plain" else env.broker_schema + ' %"Odd'
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, name)
        try:
            yield name
        finally:
            if name != env.broker_schema:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def test_every_statement_is_prepared_and_planned(env, schema):
    q = queries.for_schema(schema)
    assert set(q.texts) | set(q.templates) == set(queries.NAMES)
    with psycopg.connect(env.url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for name in queries.NAMES:
            if name in q.templates:
                store_for(schema).listen(conn, channel="kombu_pg_statement_check")
            elif name in UTILITY:
                if name == "vacuum_messages":
                    conn.execute(q.texts[name], {})
                else:
                    with conn.transaction(force_rollback=True):
                        conn.execute(q.texts[name], {} if "%" in q.texts[name] else None)
            else:
                _plan(conn, name, q.texts[name])


def _plan(conn: psycopg.Connection, name: str, text: str) -> None:
    statement = PreparedStatement(name, text)  # its $n text, as prepared.py sends it
    pgconn, encoding = conn.pgconn, conn.info.encoding
    result = pgconn.prepare(name.encode(), statement.text)
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise errors.error_from_result(result, encoding=encoding)
    arguments = ", ".join(["NULL"] * pgconn.describe_prepared(name.encode()).nparams)
    with conn.transaction(force_rollback=True):
        plan = conn.execute(f"EXPLAIN EXECUTE {name}" + (f"({arguments})" if arguments else "")).fetchall()
    assert plan, name


def test_hot_statements_run_through_libpq(env):
    """publish, claim, renew and ack as prepared.py runs them (arrays included)."""
    store = store_for(env.broker_schema)
    hot = store.prepared("kombu_pg_check_")
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, env.broker_schema)
        published = hot["publish_direct"].execute(conn, dict(
            vars(NewMessage(payload="{}", task_id="t1")), queue="q", channel="kombu_pg", notify=True))
        assert published == [("q", "", "f")]  # the queue, its wake-up (void), not a broadcast
        [claimed] = hot["claim"].execute(conn, {
            "queue": "q", "limit": 5, "default_max_attempts": 3, "lease_seconds": 30, "held": [],
            "synchronous_commit": "on", "holder": "check[1]"})
        message_id, token = int(claimed[0]), claimed[1]
        assert hot["renew"].execute(conn, {"ids": [message_id], "tokens": [token], "lease_seconds": 30,
                                           "synchronous_commit": "off"}) == [(str(message_id),)]
        assert hot["ack"].execute(conn, {"ids": [message_id], "tokens": [token]}) == [("q",)]


def test_attempt_cap_precedence(env):
    """The task's own cap, then the queue's, then the default: in claim, requeue and reap alike."""
    store = store_for(env.broker_schema)
    with psycopg.connect(env.url, autocommit=True) as conn:
        migrate.migrate(conn, env.broker_schema)
        store.declare_queue(conn, queue="capped", durable=True, auto_delete=False, expires_ms=None,
                            message_ttl_ms=None, max_attempts=4, backoff_base=None, backoff_cap=None)
        for own in (2, None):
            store.publish_direct(conn, NewMessage(payload="{}", max_attempts=own), queue="capped",
                                 channel="kombu_pg")
        claimed = store.claim(conn, queue="capped", limit=5, default_max_attempts=9, lease_seconds=30,
                              held=[], synchronous_commit="on", holder="check[1]")
        caps = [store.requeue(conn, id=m.id, token=m.token, error={"type": "Check"},
                              default_max_attempts=9, channel="kombu_pg") for m in claimed]
        assert [c.max_attempts for c in caps] == [2, 4]


def test_every_statement_has_a_caller_in_the_store():
    source = "\n".join(path.read_text() for path in STORE.glob("*.py"))
    uncalled = [name for name in queries.NAMES
                if not re.search(rf"\bq\.{name}\b|[\"']{name}[\"']", source)]
    assert uncalled == []
    code = "\n".join(queries.expanded(name) for name in queries.NAMES)
    unused = [name for name in queries.TEMPLATES if name.startswith("fragment_")
              and "{" + name.removeprefix("fragment_") + "}" not in
              "\n".join(queries._code(text) for text in queries.TEMPLATES.values())]
    assert unused == [] and "{" not in code.replace("{schema}", "").replace("{channel}", "")


#: SQL text in Python: the store and its loader hold all of it.
SQL_TEXT = re.compile(r"SELECT |INSERT INTO|UPDATE .* SET|DELETE FROM")
#: Modules allowed SQL text: the loader and store; the tools that run test servers (they set
#: up replication and drop test schemas: no part of the broker).
ALLOWED = ("kombu_pg/queries.py", "kombu_pg/store/", "kombu_pg/testing/")


def test_no_sql_outside_the_store():
    offenders = []
    for package in ("kombu_pg", "celery_ext"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(ALLOWED):
                continue
            offenders += [f"{relative}:{number}: {line.strip()}"
                          for number, line in enumerate(path.read_text().splitlines(), 1)
                          if SQL_TEXT.search(line)]
    assert offenders == []
