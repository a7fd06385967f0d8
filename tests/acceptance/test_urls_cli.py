"""Broker URLs, transport options, error messages and the ``kombu-pg migrate`` command."""
from __future__ import annotations

import sys
from pathlib import Path

import kombu
import psycopg
import psycopg.sql
import pytest
from psycopg.conninfo import conninfo_to_dict

from conftest import console_script, unique, wait_for, with_query
from kombu_pg.config import mask_url

BROKER_TABLES = ("messages", "queues", "bindings", "exchanges")


def one_line(text: str) -> str:
    text = text.strip()
    assert text, "empty error message"
    assert "\n" not in text, f"error message is not one line:\n{text}"
    return text


def connect_error(url: str, **transport_options) -> str:
    """The message of the error a Kombu user gets when connecting."""
    conn = kombu.Connection(url, transport_options=transport_options, connect_timeout=10)
    try:
        with pytest.raises(Exception) as info:
            conn.connect()
    finally:
        conn.release()
    print(f"{type(info.value).__name__}: {info.value}")  # shown with -rA / on failure
    return one_line(str(info.value))


# --- kombu-pg migrate ----------------------------------------------------------------------

def test_migrate_cli_is_idempotent(env, procs):
    kombu_pg = console_script("kombu-pg")
    schema = env.broker_schema
    assert not env.broker_ready()
    first = procs.run([kombu_pg, "migrate", "--url", env.url, "--schema", schema])
    assert first.returncode == 0, first.stderr
    for table in BROKER_TABLES:
        assert env.db.table_exists(schema, table), table
    second = procs.run([kombu_pg, "migrate", "--url", env.url, "--schema", schema])
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    # The migrated schema works for a broker with auto_migrate off.
    with kombu.Connection(env.url, transport_options={"schema": schema, "auto_migrate": False}) as conn:
        simple = conn.SimpleQueue("after_migrate")
        simple.put("ok")
        message = simple.get(timeout=5)
        assert message.payload == "ok"
        message.ack()


def test_no_auto_migrate_on_empty_schema_names_the_fix(env):
    message = connect_error(env.url, schema=env.broker_schema, auto_migrate=False)
    assert "kombu-pg migrate" in message
    assert not env.broker_ready()


# --- URLs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "pg"])
def test_url_schemes(env, scheme):
    _, _, rest = env.url.partition("://")
    with kombu.Connection(f"{scheme}://{rest}", transport_options=env.transport_options) as conn:
        simple = conn.SimpleQueue(f"scheme_{scheme}")
        simple.put(scheme)
        message = simple.get(timeout=5)
        assert message.payload == scheme
        message.ack()


def test_url_query_parameters_reach_libpq(env):
    name = unique("kp_app_")
    url = with_query(env.url, sslmode="disable", application_name=name)
    with kombu.Connection(url, transport_options=env.transport_options) as conn:
        simple = conn.SimpleQueue("appname")
        simple.put("x")
        message = simple.get(timeout=5)
        message.ack()
        seen = env.db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,))
        assert seen >= 1
        ssl = env.db.query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = %s",
            (name,))
        assert ssl and not any(row[0] for row in ssl)


def several_hosts(env, form: str) -> str:
    """The test server's URL naming a host with no server first, then the server, in ``form``."""
    params = conninfo_to_dict(env.url)
    host, port = params.pop("host", "localhost"), params.pop("port", "5432")
    user, dbname = params.pop("user", ""), params.pop("dbname", "")
    extra = "".join(f"&{key}={value}" for key, value in params.items())
    dead = "/nonexistent-kp-socket-dir"
    if form == "hosts":
        return f"postgresql://{user}@/{dbname}?host={dead},{host}&port={port},{port}{extra}"
    return ";".join(f"postgresql://{user}@/{dbname}?host={h}&port={port}{extra}" for h in (dead, host))


@pytest.mark.parametrize("form", ["hosts", "failover list"])
def test_several_hosts_reach_libpq(env, form):
    """libpq tries the hosts in order; a Kombu failover list (url1;url2) becomes one such URL."""
    url = several_hosts(env, form)
    with kombu.Connection(url, transport_options=env.transport_options) as conn:
        simple = conn.SimpleQueue("hosts")
        simple.put(form)
        message = simple.get(timeout=5)
        assert message.payload == form
        message.ack()
        if form == "hosts" and "password" not in url:
            assert conn.as_uri() == url  # shown as written: the host list, the empty host


@pytest.mark.parametrize("bad, problem", [
    ("postgresql://kp_user:{secret}@127.0.0.1:5432/test?nosuchparameter=1", "nosuchparameter"),
    ("postgresql://kp_user:{secret}@127.0.0.1:notaport/test", "notaport"),
    ("postgresql://kp_user:{secret}@127.0.0.1:5432/test?sslmode=sometimes", "sometimes"),
], ids=["unknown-parameter", "bad-port", "bad-sslmode"])
def test_malformed_url_gives_one_line_error_without_password(env, bad, problem):
    secret = "Sup3rSecretPw"
    message = connect_error(bad.format(secret=secret), schema=env.broker_schema)
    assert secret not in message
    assert problem in message


def test_unknown_transport_option_is_rejected(env):
    message = connect_error(env.url, schema=env.broker_schema, visibilty_timeout=5)  # sic: a typo
    assert "visibilty_timeout" in message
    assert "unknown" in message.lower()


def test_unreachable_server_gives_one_line_error_without_password(env):
    secret = "An0therSecret"
    # A Unix socket directory with no server: fails at once, no network involved.
    url = f"postgresql://kp_user:{secret}@/test?host=/nonexistent-kp-socket-dir"
    message = connect_error(url, schema=env.broker_schema)
    assert secret not in message
    assert "nonexistent-kp-socket-dir" in message or "connect" in message.lower()


# --- wrong password -------------------------------------------------------------------------

@pytest.fixture
def password_server(tmp_path):
    """A throw-away embedded server that demands a password (scram) from role kp_pw.

    The shared test server trusts every connection (and the system's pg_hba.conf is not ours
    to change), so this server's own pg_hba.conf, in its own data directory, gets a
    scram-sha-256 line for one role, ahead of the trust lines.
    """
    from kombu_pg import embedded

    with embedded.start() as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute("CREATE ROLE kp_pw LOGIN PASSWORD 'right-Pw-123'")
            conn.execute(psycopg.sql.SQL("GRANT CREATE ON DATABASE {} TO kp_pw").format(
                psycopg.sql.Identifier(conn.info.dbname)))
            hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
            hba.write_text("local all kp_pw scram-sha-256\nhost all kp_pw all scram-sha-256\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")

        def url(password):
            user_url = server.url.replace("postgres:@", f"kp_pw:{password}@", 1)
            assert user_url != server.url, server.url
            return user_url

        def wrong_password_refused():
            try:
                psycopg.connect(url("not-the-password"), connect_timeout=5).close()
            except psycopg.OperationalError:
                return True
            return False

        wait_for(wrong_password_refused, 10, what="the server to reload pg_hba.conf")
        psycopg.connect(url("right-Pw-123"), connect_timeout=5).close()
        yield url


def test_wrong_password_gives_one_line_error_without_password(password_server, procs, env):
    secret = "Wr0ngPassw0rd-xyz"
    url = password_server(secret)
    schema = env.broker_schema  # on the password server; its pools are closed at teardown
    message = connect_error(url, schema=schema)
    assert secret not in message
    assert "password" in message.lower() or "authentication" in message.lower(), message
    # The CLI too: one line on stderr, exit status not 0, no password.
    result = procs.run([console_script("kombu-pg"), "migrate", "--url", url, "--schema", schema])
    assert result.returncode != 0
    assert secret not in result.stdout + result.stderr
    err = one_line(result.stderr)
    assert "password" in err.lower() or "authentication" in err.lower(), err
    # And the right password works.
    with kombu.Connection(password_server("right-Pw-123"), transport_options={"schema": schema}) as conn:
        simple = conn.SimpleQueue("pw")
        simple.put(1)
        simple.get(timeout=5).ack()


# --- the same errors as a Celery user sees them ---------------------------------------------

def test_worker_with_unknown_transport_option_exits_naming_it(make_app, procs):
    app = make_app(transport_options={"visibilty_timeout": 5})  # sic: a typo
    worker = procs.worker(app, wait=False)
    assert worker.wait_exit(60) != 0
    # One line, naming the option and the known ones; no traceback before it.
    line = one_line(worker.log())
    assert line.startswith("kombu-pg: unknown transport option 'visibilty_timeout'"), line
    assert "known options:" in line and "visibility_timeout" in line.split("known options:")[1], line


def test_sqlalchemy_style_url_names_what_was_written_and_the_fix(env, make_app, procs):
    _, _, rest = env.url.partition("://")
    written = f"postgresql+psycopg://{rest}"
    # Messages name URLs with any password masked (the embedded server's URL has an empty one).
    fix = f"write {mask_url('postgresql://' + rest)!r}"
    # Kombu hands the transport 'psycopg://...': the message still names the URL as written.
    message = connect_error(written, schema=env.broker_schema)
    assert f"{mask_url(written)!r}" in message and fix in message, message
    out = procs.run([console_script("kombu-pg"), "--url", written, "stats"])
    assert out.returncode == 1 and fix in one_line(out.stderr), out.stderr
    worker = procs.worker(make_app(broker_url=written), wait=False)
    assert worker.wait_exit(60) != 0
    line = one_line(worker.log())
    assert "'+psycopg' names a SQLAlchemy driver" in line and fix in line, line


def test_worker_with_wrong_password_logs_reason_not_password(password_server, make_app, procs):
    secret = "Wr0ngW0rkerPw-abc"
    app = make_app(broker_url=password_server(secret))
    worker = procs.worker(app, wait=False)
    wait_for(lambda: "password authentication failed" in worker.log(), 60,
             what=lambda: f"the worker to log the authentication failure:\n{worker.log()[-2000:]}")
    assert secret not in worker.log()


def test_schemes_registered_without_any_import(procs):
    """The .pth hook: a fresh interpreter resolves the schemes with no kombu_pg import."""
    code = ("import sys, kombu\n"
            "for scheme in ('postgresql', 'postgres', 'pg'):\n"
            "    cls = kombu.Connection(scheme + '://u@/db').get_transport_cls()\n"
            "    print(scheme, cls.__module__ + ':' + cls.__name__)\n")
    result = procs.run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kombu_pg.transport:Transport") == 3, result.stdout
