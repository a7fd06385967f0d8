"""A runtime role with only the privileges of ``kombu-pg grants``: no CREATE on the database.

Start-up reads which migrations are applied before anything else: against a current schema it
takes no lock and creates nothing. Against a schema that needs migrating, such a role (or a
migrator kept waiting on the migration lock) fails with one line naming ``auto_migrate`` and
``kombu-pg migrate``.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import kombu
import psycopg
import pytest
from psycopg import sql

from conftest import console_script, unique, wait_for
from test_beat import beat_conf, start_beat

README = Path(__file__).resolve().parents[2] / "README.md"
FAILING_TASK = '''
@app.task(bind=True, max_attempts=1)
def always_fails(self):
    record(self, "fails")
    raise ValueError("this task always fails")
'''


def one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text, f"not one line:\n{text}"
    return text


def with_user(url: str, user: str) -> str:
    """``url`` with another user (the test server trusts local connections)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{hosts}"))


class Role:
    def __init__(self, name: str, url: str):
        self.name, self.url = name, url


@pytest.fixture
def runtime_role(env, procs):
    """A fresh LOGIN role without CREATE on the database; dropped at teardown."""
    name = unique("kp_role_")
    role = sql.Identifier(name)
    env.db.query(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    assert not env.db.scalar("SELECT has_database_privilege(%s, current_database(), 'CREATE')", (name,))
    yield Role(name, with_user(env.url, name))
    procs.stop_all()  # its processes first: they would log the role's disappearance
    env.db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
    env.db.query(sql.SQL("DROP OWNED BY {}").format(role))
    env.db.query(sql.SQL("DROP ROLE {}").format(role))


def kombu_pg(procs, *args: str, url: str, schema: str):
    return procs.run([console_script("kombu-pg"), "--url", url, "--schema", schema, *args])


def migrate_and_grant(procs, env, role: Role) -> None:
    """What the schema's owner does once: migrate, then grant the runtime role its privileges."""
    migrated = kombu_pg(procs, "migrate", url=env.url, schema=env.broker_schema)
    assert migrated.returncode == 0, migrated.stderr
    granted = kombu_pg(procs, "grants", role.name, "--apply", url=env.url, schema=env.broker_schema)
    assert granted.returncode == 0, granted.stderr
    assert f"role {role.name}: granted" in granted.stdout


def assert_names_the_fix(message: str) -> None:
    assert "auto_migrate" in message and "kombu-pg migrate" in message, message


def test_runtime_role_with_granted_privileges_runs_everything(make_app, procs, env, runtime_role):
    migrate_and_grant(procs, env, runtime_role)
    app = make_app(broker_url=runtime_role.url, extra_source=FAILING_TASK,
                   conf=beat_conf({"every-second": ("mark", 1.0, ["beat-tick"])}))
    worker = procs.worker(app)
    assert app.add.delay(2, 3).get(timeout=30) == 5  # the producer publishes, the worker runs it
    app.always_fails.delay()  # its only attempt fails: to the dead letters
    beat = start_beat(procs, app, "beat")
    env.wait_runs(1, "beat-tick", timeout=30, what="a periodic task sent by beat to run")
    env.wait_runs(1, "fails")
    wait_for(lambda: env.db.scalar(sql.SQL("SELECT count(*) FROM {}").format(env.t("dead_letters"))), 30,
             what="the failed task in the dead letters")
    listed = kombu_pg(procs, "dlq", "list", "--json", url=runtime_role.url, schema=env.broker_schema)
    assert listed.returncode == 0, listed.stderr
    assert app.task_name("always_fails") in listed.stdout
    stats = kombu_pg(procs, "stats", url=runtime_role.url, schema=env.broker_schema)
    assert stats.returncode == 0 and "DEAD LETTERS" in stats.stdout, stats.stderr
    assert procs.celery(app, "pg", "stats").returncode == 0
    for proc in (worker, beat):
        assert "permission denied" not in proc.log(), proc.name
    # It ran as the runtime role, and that role owns nothing.
    assert env.db.scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (runtime_role.name,))
    assert not env.db.scalar("SELECT count(*) FROM pg_class WHERE relowner = %s::regrole", (runtime_role.name,))


def test_unmigrated_schema_and_no_create_right_give_one_line_naming_the_fix(make_app, procs, env,
                                                                            runtime_role):
    app = make_app(broker_url=runtime_role.url)
    # A producer.
    with pytest.raises(Exception) as info:
        app.add.delay(1, 1)
    message = one_line(str(info.value))
    assert_names_the_fix(message)
    assert "permission denied" in message and runtime_role.name in message
    # A worker: the reason on one line, no traceback, and it exits.
    worker = procs.worker(app, wait=False)
    assert worker.wait_exit(60) != 0
    log = worker.log()
    assert_names_the_fix(log)
    assert "Traceback" not in log, log
    # The CLI.
    result = kombu_pg(procs, "migrate", url=runtime_role.url, schema=env.broker_schema)
    assert result.returncode != 0
    assert_names_the_fix(one_line(result.stderr))
    assert not env.db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (env.broker_schema,))


def test_role_without_the_grants_is_told_to_get_them(make_app, procs, env, runtime_role):
    migrated = kombu_pg(procs, "migrate", url=env.url, schema=env.broker_schema)
    assert migrated.returncode == 0, migrated.stderr
    app = make_app(broker_url=runtime_role.url)
    with pytest.raises(Exception) as info:
        app.add.delay(1, 1)
    message = one_line(str(info.value))
    assert f"kombu-pg grants {runtime_role.name} --apply" in message and "permission denied" in message


def test_migration_lock_holder_blocks_no_start_and_times_out_a_migration(make_app, procs, env, runtime_role):
    migrate_and_grant(procs, env, runtime_role)
    # Any role that can connect can take the migration lock and keep it.
    holder = psycopg.connect(runtime_role.url, autocommit=True, application_name="kp_lock_holder")
    try:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))",  # the key of kombu_pg/migrate.py
                       (0x6B706D67, env.broker_schema))
        # A current schema: a worker starts regardless.
        app = make_app(broker_url=runtime_role.url)
        procs.worker(app)
        assert app.add.delay(1, 2).get(timeout=30) == 3
        # A schema that needs a migration: a migrator (here a superuser) waits for the lock, at
        # most migrate_lock_timeout, then fails with one line naming the lock's holder.
        env.db.query(sql.SQL("DELETE FROM {}.schema_migrations WHERE version = 5").format(
            sql.Identifier(env.broker_schema)))
        producer = make_app(transport_options={"migrate_lock_timeout": 1})
        with pytest.raises(Exception) as info:
            producer.add.delay(1, 2)
        message = one_line(str(info.value))
        assert_names_the_fix(message)
        assert "0005" in message and "lock" in message and "kp_lock_holder" in message, message
        worker = procs.worker(producer, name="w2", wait=False)
        assert worker.wait_exit(60) != 0
        assert "migration lock stayed taken" in worker.log() and "Traceback" not in worker.log()
        result = kombu_pg(procs, "migrate", "--lock-timeout", "1", url=env.url, schema=env.broker_schema)
        assert result.returncode != 0
        assert_names_the_fix(one_line(result.stderr))
    finally:
        holder.close()
    # Once the holder is gone, the owner's migration goes through.
    result = kombu_pg(procs, "migrate", url=env.url, schema=env.broker_schema)
    assert result.returncode == 0 and "applied migrations 0005" in result.stdout, result.stderr


def test_grants_are_identifiers_and_the_readme_lists_them(procs, make_app):
    printed = procs.run([console_script("kombu-pg"), "grants", 'odd "role"', "--schema", "My Schema"])
    assert printed.returncode == 0, printed.stderr
    assert 'GRANT USAGE ON SCHEMA "My Schema" TO "odd ""role""";' in printed.stdout.splitlines()
    # The README's section is this command's output for the default schema.
    default = procs.run([console_script("kombu-pg"), "grants", "app_worker"]).stdout.strip()
    section = README.read_text().split("## Least privilege", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1).strip()
    assert block == default
    # The same from the app's command group.
    app = make_app()
    via_celery = procs.celery(app, "pg", "grants", "app_worker")
    assert via_celery.returncode == 0, via_celery.stderr
    assert f'ON SCHEMA "{app.app.conf.broker_transport_options["schema"]}"' in via_celery.stdout
