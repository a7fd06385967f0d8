"""TLS: the URL's sslmode=verify-full and sslrootcert reach every connection.

The broker runs on a server of the test's own serving a certificate for 127.0.0.1 signed by a
certificate authority the test makes. The processes run with PGSSLMODE=disable: a connection that
lost the URL's parameters would fall back to it and show up unencrypted.
"""
from __future__ import annotations

import kombu
import psycopg
import pytest
from psycopg import sql

from conftest import console_script, wait_for, with_query
from test_beat import beat_conf, start_beat
from test_urls_cli import one_line

APP_NAME, LISTEN_APP_NAME = "kp_tls", "kp_tls_listen"


@pytest.fixture
def tls_server(private_server):
    from kombu_pg.testing.server import TlsUnavailable

    try:
        return private_server(tls=True)
    except TlsUnavailable as exc:
        pytest.skip(str(exc))


def verified(server, ca, application_name: str = APP_NAME) -> str:
    return with_query(server.url, sslmode="verify-full", sslrootcert=str(ca), application_name=application_name)


def sessions(server) -> list[dict]:
    """Every other client session of the server: application_name, ssl, last statement, pid."""
    with psycopg.connect(verified(server, server.ca_file, "kp_tls_harness"), autocommit=True) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT a.pid, a.application_name, a.query, s.ssl FROM pg_stat_activity a"
                           " JOIN pg_stat_ssl s USING (pid) WHERE a.backend_type = 'client backend'"
                           " AND a.pid <> pg_backend_pid()").fetchall()


def beat_pid(server, env) -> int | None:
    with psycopg.connect(verified(server, server.ca_file, "kp_tls_harness")) as conn:
        row = conn.execute(sql.SQL("SELECT backend_pid FROM {}.beat_leader").format(
            sql.Identifier(env.broker_schema))).fetchone()
    return row and row[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_connection_verifies_the_server(tls_server, env, make_app, procs, monkeypatch):
    monkeypatch.setenv("PGSSLMODE", "disable")
    procs.env["PGSSLMODE"] = "disable"
    url = verified(tls_server, tls_server.ca_file)
    app = make_app(broker_url=url, visibility_timeout=3,  # leases renewed every second
                   transport_options={"listen_url": verified(tls_server, tls_server.ca_file, LISTEN_APP_NAME)},
                   conf=beat_conf({"tick": ("mark", 1, ["tls-beat"])}))
    procs.worker(app)
    beat = start_beat(procs, app, "beat")
    app.sleepy.delay("tls-long", 15)
    ids = [app.mark.delay("tls").id for _ in range(20)]
    env.wait_runs(20, "tls")
    env.wait_runs(1, "tls-long")
    env.wait_runs(1, "tls-beat")
    assert {run["task_id"] for run in env.runs("tls")} == set(ids)

    def complete():
        found = sessions(tls_server)
        pid = beat_pid(tls_server, env)
        kinds = {"listen": any(s["application_name"] == LISTEN_APP_NAME and s["query"].startswith("LISTEN")
                               for s in found),
                 "lease keeper": any("SET leased_until = now()" in s["query"] for s in found),
                 "beat": any(s["pid"] == pid for s in found)}
        return found if all(kinds.values()) else None

    found = wait_for(complete, 30, what=lambda: f"the listener, lease keeper and beat sessions in {sessions(tls_server)}")
    assert all(s["ssl"] for s in found), [s for s in found if not s["ssl"]]
    assert {s["application_name"] for s in found} == {APP_NAME, LISTEN_APP_NAME}, found
    assert beat.alive()

    stats = procs.run([console_script("kombu-pg"), "stats", "--url", url, "--schema", env.broker_schema])
    assert stats.returncode == 0, stats.stderr
    assert "celery" in stats.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_wrong_root_certificate_is_one_clear_line(tls_server, env, make_app, procs, tmp_path):
    from kombu_pg.testing.server import certificate_authority

    other_ca = certificate_authority(tmp_path / "other", "other-ca")
    url = verified(tls_server, other_ca)

    with kombu.Connection(url, transport_options=env.transport_options, connect_timeout=10) as conn:
        with pytest.raises(Exception) as failed:
            conn.connect()
    message = one_line(str(failed.value))
    assert "certificate verify failed" in message, message

    cli = procs.run([console_script("kombu-pg"), "stats", "--url", url, "--schema", env.broker_schema])
    assert cli.returncode != 0
    assert "certificate verify failed" in one_line(cli.stderr)

    app = make_app(broker_url=url)
    with pytest.raises(Exception) as failed:
        app.mark.apply_async(("tls",), retry=False)
    assert "certificate verify failed" in one_line(str(failed.value))

    worker = procs.worker(app, wait=False)
    wait_for(lambda: "certificate verify failed" in worker.log(), 30, what="the worker to name the problem")
    assert "Traceback" not in worker.log()
