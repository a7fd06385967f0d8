"""The password of the broker URL and of URL-valued transport options (listen_url) appears in
nothing Celery shows: the worker's banner and log, `celery inspect stats`, `celery inspect conf`,
`celery report`, `conf.humanize()`, the worker's metrics, connection errors."""
from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import kombu
import pytest


#: The test server trusts local connections: any password is accepted.
SECRET = "Sup3r-S3cret-xyz"


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{hosts}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_secret(text: str, what: str) -> None:
    assert text.strip(), f"{what}: no output"
    assert SECRET not in text, f"{what} shows the password:\n{text}"


def test_password_appears_nowhere(make_app, procs, env):
    url = with_password(env.url, SECRET)
    port = free_port()
    app = make_app(broker_url=url, transport_options={"listen_url": url},
                   conf={"kombu_pg_metrics_port": port})
    worker = procs.worker(app)
    assert app.add.delay(1, 2).get(timeout=30) == 3

    stats = procs.celery(app, "inspect", "stats", "--json", "-d", worker.hostname, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert '"broker"' in stats.stdout and "listen_url" in stats.stdout  # the masked entries are there
    assert_no_secret(stats.stdout + stats.stderr, "celery inspect stats")
    conf = procs.celery(app, "inspect", "conf", "--json", "-d", worker.hostname, timeout=60)
    assert conf.returncode == 0, conf.stderr
    assert_no_secret(conf.stdout + conf.stderr, "celery inspect conf")
    report = procs.celery(app, "report")
    assert report.returncode == 0, report.stderr
    assert "listen_url" in report.stdout
    assert_no_secret(report.stdout + report.stderr, "celery report")
    assert_no_secret(app.app.conf.humanize(with_defaults=False, censored=True), "conf.humanize(censored=True)")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert_no_secret(response.read().decode(), "the worker's /metrics")
    assert_no_secret(worker.log(), "the worker's banner and log")
    # What still connects with the password: the pidbox replies above came through Celery's
    # clones of the broker connection, and a clone made here works too.
    with app.app.connection_for_write() as conn, conn.clone() as clone:
        clone.ensure_connection(max_retries=1)


@pytest.mark.parametrize("option", [None, "listen_url", "direct_url"])
def test_connection_errors_do_not_show_the_password(env, option):
    # A Unix socket directory with no server: fails at once.
    unreachable = f"postgresql://kp_user:{SECRET}@/test?host=/nonexistent-kp-socket-dir"
    url, options = (env.url, {option: unreachable}) if option else (unreachable, {})
    conn = kombu.Connection(url, transport_options=dict(env.transport_options, **options))
    try:
        with pytest.raises(Exception) as info:
            conn.connect()
            conn.SimpleQueue("q").get(timeout=1)  # consuming opens the LISTEN connection
    finally:
        conn.release()
    text = f"{type(info.value).__name__}: {info.value}"
    assert "nonexistent-kp-socket-dir" in text, text
    assert_no_secret(text, "the connection error")


def test_masked_info_keeps_what_reconnects_need(env):
    """Kombu's own info() and clone() keep the password: only what Celery shows is masked."""
    url = with_password(env.url, SECRET)
    with kombu.Connection(url, transport_options=env.transport_options) as conn:
        assert conn.as_uri().count(SECRET) == 0
        with conn.clone() as clone:
            clone.connect()
            assert clone.info()["hostname"] == conn.info()["hostname"]
