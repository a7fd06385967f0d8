"""The command line's answers to the first mistakes a new user makes: a schema that was never
migrated (or is mistyped), a dead letter id that does not exist or was replayed already, a
reason that does not exist. One line on stderr, naming the problem and the fix; exit status 1
(2 for a usage error)."""
from __future__ import annotations

import pytest

from conftest import console_script, dead_letters
from test_urls_cli import one_line

from kombu_pg.admin import REASONS


def kombu_pg(procs, env, *args, schema=None):
    return procs.run([console_script("kombu-pg"), "--url", env.url, "--schema", schema or env.broker_schema, *args])


@pytest.mark.parametrize("command", [
    ("stats",), ("dlq", "list"), ("dlq", "show", "1"), ("dlq", "replay", "1"), ("dlq", "replay", "--all"),
    ("dlq", "purge", "--all"),
], ids=" ".join)
def test_unmigrated_schema_names_the_fix(env, procs, command):
    out = kombu_pg(procs, env, *command)
    assert out.returncode == 1, (out.stdout, out.stderr)
    err = one_line(out.stderr)
    assert f"schema {env.broker_schema!r} has no kombu-pg tables" in err, err
    assert f"kombu-pg --schema {env.broker_schema} migrate" in err, err
    assert "relation" not in err and "LINE" not in err, err  # not PostgreSQL's own words
    assert not env.broker_ready()  # read-only commands create nothing


def test_partly_migrated_schema_names_the_missing_migrations(env, procs):
    assert kombu_pg(procs, env, "migrate").returncode == 0
    # As if the schema had been made by an older release that lacked dead letters.
    env.db.query(f'DROP TABLE "{env.broker_schema}".dead_letters CASCADE')
    env.db.query(f'DELETE FROM "{env.broker_schema}".schema_migrations WHERE version >= 2')
    out = kombu_pg(procs, env, "dlq", "list")
    assert out.returncode == 1
    err = one_line(out.stderr)
    assert f"schema {env.broker_schema!r} lacks migrations 0002" in err, err
    assert f"run `kombu-pg --schema {env.broker_schema} migrate`" in err, err


def test_replay_of_unknown_or_replayed_ids_fails_and_replays_nothing(env, procs, kombu_conn):
    simple = kombu_conn().SimpleQueue("cli_errors")
    for i in range(2):
        simple.put({"n": i})
    for _ in range(2):
        simple.get(timeout=10).reject(requeue=False)
    simple.close()
    first, second = [row["id"] for row in dead_letters(env)]

    unknown = first + second + 1000
    out = kombu_pg(procs, env, "dlq", "replay", str(unknown))
    assert out.returncode == 1 and "replayed 0" not in out.stdout, (out.stdout, out.stderr)
    assert f"no dead letter with id {unknown}" in one_line(out.stderr)

    # A known id with an unknown one: nothing is replayed.
    out = kombu_pg(procs, env, "dlq", "replay", str(first), str(unknown))
    assert out.returncode == 1 and str(unknown) in one_line(out.stderr)
    assert all(row["replayed_at"] is None for row in dead_letters(env))

    out = kombu_pg(procs, env, "dlq", "replay", str(first))
    assert out.returncode == 0 and "replayed 1 dead letter(s)" in out.stdout, (out.stdout, out.stderr)
    out = kombu_pg(procs, env, "dlq", "replay", str(first))
    assert out.returncode == 1
    assert f"dead letter {first} already replayed" in one_line(out.stderr)

    # Given ids that the filters exclude: said so, with a failing status.
    out = kombu_pg(procs, env, "dlq", "replay", str(second), "--queue", "another_queue")
    assert out.returncode == 1
    assert "replayed 0 of the 1 dead letters given" in one_line(out.stderr)
    assert [row["replayed_at"] is None for row in dead_letters(env)] == [False, True]


@pytest.mark.parametrize("command", [("dlq", "list"), ("dlq", "replay", "--all"), ("dlq", "purge", "--all")],
                         ids=" ".join)
def test_unknown_reason_is_a_usage_error_listing_the_reasons(env, procs, command):
    out = kombu_pg(procs, env, *command, "--reason", "nonsense")
    assert out.returncode == 2
    assert "'nonsense' is not one of" in out.stderr and all(reason in out.stderr for reason in REASONS)
    assert not env.broker_ready()
