"""The Prometheus exporter: the worker's /metrics (celery_ext.metrics) and ``kombu-pg metrics``.

After a scripted workload (tasks that succeed, tasks that always fail and use up their two
attempts, countdown tasks, a replayed dead letter) the exported values are compared with counts
taken here with SQL from the test's broker schema, and with the numbers the workload implies.
"""
from __future__ import annotations

import math
import signal
import socket
import urllib.error
import urllib.request

import pytest
from psycopg import sql

from conftest import console_script, wait_for

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

#: Families every exporter shows (with HELP), database-backed.
DB_FAMILIES = ("kombu_pg_queue_ready_messages", "kombu_pg_queue_delayed_messages",
               "kombu_pg_queue_leased_messages", "kombu_pg_queue_oldest_ready_age_seconds",
               "kombu_pg_dead_letters", "kombu_pg_dead_letters_replayed", "kombu_pg_up")
EVENTS = ("published", "delivered", "acked", "released", "requeued", "retried",
          "dead_lettered", "replayed", "duplicates_dropped")
#: Retries come fast: the always-failing tasks are dead-lettered within a second.
FAST_FAILURES = {"max_attempts": 2, "backoff_base": 0.1, "backoff_cap": 0.5}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One /metrics response, parsed."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, default=None, **labels):
        return self.samples.get((name, frozenset(labels.items())), default)

    def by_label(self, name: str, *keys: str) -> dict:
        """{label values: value} of one metric's samples."""
        out = {}
        for (sample, labels), value in self.samples.items():
            if sample == name:
                labels = dict(labels)
                out[tuple(labels[k] for k in keys) if len(keys) > 1 else labels[keys[0]]] = value
        return out

    def has_help(self, name: str) -> bool:
        return f"# HELP {name} " in self.text


def scrape(port: int) -> Scrape | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            return Scrape(response.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


# --- what the database says ---------------------------------------------------------------

def db_queues(env) -> dict[str, dict]:
    """Per queue (declared or holding messages): ready, delayed, leased, by plain SQL."""
    rows = env.db.query(sql.SQL(
        "SELECT queue,"
        " count(*) FILTER (WHERE visible_at <= now() AND NOT (lease_token IS NOT NULL AND coalesce(leased_until, visible_at) > now())),"
        " count(*) FILTER (WHERE visible_at > now() AND lease_token IS NULL),"
        " count(*) FILTER (WHERE lease_token IS NOT NULL AND coalesce(leased_until, visible_at) > now())"
        " FROM {} GROUP BY queue").format(env.t("messages")))
    out = {name: {"ready": 0, "delayed": 0, "leased": 0} for name in env.queue_names()}
    for queue, ready, delayed, leased in rows:
        out[queue] = {"ready": ready, "delayed": delayed, "leased": leased}
    return out


def db_dead_letters(env) -> dict[tuple[str, str], int]:
    rows = env.db.query(sql.SQL("SELECT queue, reason, count(*) FROM {} WHERE replayed_at IS NULL"
                                " GROUP BY 1, 2").format(env.t("dead_letters")))
    return {(queue, reason): count for queue, reason, count in rows}


def db_replayed(env) -> int:
    return env.db.scalar(sql.SQL("SELECT count(*) FROM {} WHERE replayed_at IS NOT NULL")
                         .format(env.t("dead_letters")))


def db_oldest_ready_age(env, queue: str) -> float:
    return float(env.db.scalar(sql.SQL(
        "SELECT coalesce(extract(epoch FROM now() - min(visible_at)), 0) FROM {}"
        " WHERE queue = %s AND visible_at <= now() AND NOT (lease_token IS NOT NULL AND coalesce(leased_until, visible_at) > now())").format(env.t("messages")), (queue,)))


def exported_db_view(s: Scrape) -> tuple[dict, dict, int]:
    queues: dict[str, dict] = {}
    for key, name in (("ready", "kombu_pg_queue_ready_messages"),
                      ("delayed", "kombu_pg_queue_delayed_messages"),
                      ("leased", "kombu_pg_queue_leased_messages")):
        for queue, value in s.by_label(name, "queue").items():
            queues.setdefault(queue, {})[key] = int(value)
    dead = {k: int(v) for k, v in s.by_label("kombu_pg_dead_letters", "queue", "reason").items()}
    return queues, dead, int(s.get("kombu_pg_dead_letters_replayed", -1))


def assert_db_series_match(env, port: int) -> Scrape:
    """The exporter's database series equal the SQL counts (retried while the state settles)."""
    last = {}

    def matches():
        before = (db_queues(env), db_dead_letters(env), db_replayed(env))
        s = scrape(port)
        after = (db_queues(env), db_dead_letters(env), db_replayed(env))
        last.update(db=after, exported=s and exported_db_view(s))
        return s if s is not None and before == after == exported_db_view(s) else None

    s = wait_for(matches, 20, interval=0.5,
                 what=lambda: f"exported {last.get('exported')} to equal the database's {last.get('db')}")
    assert s.get("kombu_pg_up") == 1
    for name in DB_FAMILIES:
        assert s.has_help(name), name
    return s


def counter(s: Scrape, event: str, queue: str = "celery") -> int:
    return int(s.get(f"kombu_pg_messages_{event}_total", 0, queue=queue))


def runtime_count(s: Scrape, task: str) -> int:
    return int(s.get("kombu_pg_task_runtime_seconds_count", 0, task=task))


# --- the worker's exporter ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pool, configured_by", [("prefork", "setting"), ("threads", "setting"),
                                                 ("solo", "env")])
def test_worker_exporter_after_workload(make_app, procs, env, pool, configured_by):
    n_ok, m_fail, k_delayed = 6, 3, 2
    port = free_port()
    conf = {"kombu_pg_metrics_port": port} if configured_by == "setting" else {}
    if configured_by == "env":
        procs.env["KOMBU_PG_METRICS_PORT"] = str(port)
    app = make_app(conf=conf, transport_options=FAST_FAILURES)
    worker = procs.worker(app, name="w1", pool=pool, concurrency=2)
    wait_for(lambda: scrape(port), 20, what=f"/metrics on port {port}")
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in worker.log()

    ok = [app.mark.delay(f"ok{i}") for i in range(n_ok)]
    for _ in range(m_fail):
        app.add.delay(1, "x")  # TypeError, at every attempt
    for _ in range(k_delayed):
        app.tsum.apply_async(([1, 2],), countdown=600)
    assert [r.get(timeout=30) for r in ok] == [f"ok{i}" for i in range(n_ok)]
    wait_for(lambda: db_dead_letters(env).get(("celery", "max_attempts")) == m_fail, 30,
             what=f"{m_fail} dead letters")

    mark, add = app.task_name("mark"), app.task_name("add")

    def expect(s: Scrape, failing_runs: int) -> dict:
        """What this worker must report once `failing_runs` always-failing tasks settled."""
        acked = counter(s, "acked")
        return {
            "delivered": (counter(s, "delivered"), n_ok + 2 * failing_runs),
            # Celery also acks a message after a retry; its lease was settled already by the
            # failure's record (the DELETE matches nothing). The batching acker (acker.py)
            # counts such acks too, the transport used to count only deleted rows: accept both.
            "acked": (acked, n_ok if acked == n_ok else n_ok + failing_runs),
            "retried": (counter(s, "retried"), failing_runs),
            "dead_lettered": (counter(s, "dead_lettered"), failing_runs),
            "requeued": (counter(s, "requeued"), 0),
            "released": (counter(s, "released"), 0),
            "published": (counter(s, "published"), 0),  # the test process published them
            "runtime ok": (runtime_count(s, mark), n_ok),
            # Celery measures the runtime of successful executions only.
            "runtime failing": (runtime_count(s, add), 0),
        }

    def settled(failing_runs):
        def check():
            s = scrape(port)
            return s if s and all(a == b for a, b in expect(s, failing_runs).values()) else None
        return check

    def describe(failing_runs):
        def what():
            s = scrape(port)
            return f"worker counters {expect(s, failing_runs) if s else 'unreachable'} (actual, expected)"
        return what

    s = wait_for(settled(m_fail), 20, interval=0.3, what=describe(m_fail))
    # The counter and histogram families are there, with their HELP.
    for event in EVENTS:
        assert s.has_help(f"kombu_pg_messages_{event}_total"), event
    assert s.has_help("kombu_pg_task_runtime_seconds")
    assert s.get("kombu_pg_task_runtime_seconds_sum", task=mark) >= 0
    assert s.get("kombu_pg_task_runtime_seconds_bucket", task=mark, le="+Inf") == n_ok

    s = assert_db_series_match(env, port)
    queues, dead, replayed = exported_db_view(s)
    assert queues["celery"] == {"ready": 0, "delayed": k_delayed, "leased": 0}
    assert s.get("kombu_pg_queue_oldest_ready_age_seconds", queue="celery") == 0
    assert dead == {("celery", "max_attempts"): m_fail}
    assert replayed == 0

    # Replay one dead letter (from this process): it fails twice more and is dead-lettered again.
    from kombu_pg.admin import Admin

    admin = Admin(env.url, env.broker_schema)
    first = admin.dead_letters(reason="max_attempts", limit=1)[0]
    assert admin.replay(ids=[first.id]) == 1
    wait_for(lambda: env.db.scalar(sql.SQL("SELECT count(*) FROM {}").format(env.t("dead_letters")))
             == m_fail + 1, 30, what="the replayed task to be dead-lettered again")
    wait_for(settled(m_fail + 1), 20, interval=0.3, what=describe(m_fail + 1))
    s = assert_db_series_match(env, port)
    _, dead, replayed = exported_db_view(s)
    assert dead == {("celery", "max_attempts"): m_fail}  # m_fail - 1 old ones, 1 new
    assert replayed == 1
    assert counter(s, "replayed") == 0  # replayed by this test process, not by the worker
    assert worker.alive()


# --- the standalone exporter ----------------------------------------------------------------

@pytest.mark.slow
def test_standalone_exporter_reports_the_database(make_app, procs, env):
    m_fail, k_delayed, idle = 2, 3, 4
    app = make_app(visibility_timeout=120, transport_options=FAST_FAILURES)
    worker = procs.worker(app, name="w1", pool="prefork", concurrency=1)
    for _ in range(m_fail):
        app.add.delay(1, "x")
    wait_for(lambda: db_dead_letters(env).get(("celery", "max_attempts")) == m_fail, 30,
             what=f"{m_fail} dead letters")
    for _ in range(k_delayed):
        app.tsum.apply_async(([1, 2],), countdown=600)
    for i in range(idle):
        app.mark.apply_async((f"idle{i}",), queue="idle")  # no worker consumes it
    app.sleepy.delay("holds-a-lease", 300)
    env.wait_runs(1, label="holds-a-lease", timeout=30)
    worker.kill_group()  # SIGKILL: the lease stays held until the visibility timeout
    worker.wait_exit(10)

    from kombu_pg.admin import Admin

    admin = Admin(env.url, env.broker_schema)
    first = admin.dead_letters(limit=1)[0]
    assert admin.replay(ids=[first.id]) == 1  # ready again in "celery"

    port = free_port()
    exporter = procs.spawn([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema,
                            "metrics", "--port", str(port), "--host", "127.0.0.1"], name="metrics")
    wait_for(lambda: scrape(port) or (not exporter.alive() and pytest.fail(exporter.log())), 20,
             what=f"kombu-pg metrics on port {port}")
    assert f"serving http://127.0.0.1:{port}/metrics" in exporter.log()

    s = assert_db_series_match(env, port)
    queues, dead, replayed = exported_db_view(s)
    assert queues["celery"] == {"ready": 1, "delayed": k_delayed, "leased": 1}
    assert queues["idle"] == {"ready": idle, "delayed": 0, "leased": 0}
    assert dead == {("celery", "max_attempts"): m_fail - 1}
    assert replayed == 1
    for queue in ("celery", "idle"):
        exported_age = s.get("kombu_pg_queue_oldest_ready_age_seconds", queue=queue)
        assert exported_age > 0
        assert math.isclose(exported_age, db_oldest_ready_age(env, queue), abs_tol=2.0), queue
    # A process of its own: no in-process counters (they would all be zero), no task runtimes.
    assert not [name for name, _ in s.samples if name.startswith("kombu_pg_messages_")]
    assert "kombu_pg_task_runtime_seconds" not in s.text

    exporter.popen.send_signal(signal.SIGTERM)  # a clean exit
    assert exporter.wait_exit(10) == 0


def test_standalone_exporter_without_broker_tables_reports_down(procs, env):
    """A schema that is not migrated (or a database that is down): kombu_pg_up 0, still serving."""
    port = free_port()
    exporter = procs.spawn([console_script("kombu-pg"), "metrics", "--port", str(port),
                            "--url", env.url, "--schema", env.broker_schema], name="metrics")
    s = wait_for(lambda: scrape(port) or (not exporter.alive() and pytest.fail(exporter.log())), 20,
                 what=f"kombu-pg metrics on port {port}")
    assert s.get("kombu_pg_up") == 0
    assert not [name for name, _ in s.samples if name.startswith("kombu_pg_queue_")]
    assert scrape(port).get("kombu_pg_up") == 0
    wait_for(lambda: "cannot read" in exporter.log(), 5, what="the error in the exporter's log")
    assert exporter.log().count("cannot read") == 1, "logged once, not at every scrape"
    assert not env.broker_ready(), "the exporter never creates the broker tables"


def test_worker_exporter_is_off_unless_configured(make_app, monkeypatch):
    from celery_ext import metrics

    monkeypatch.delenv(metrics.PORT_ENV, raising=False)
    assert metrics.settings_of(make_app().app) is None
    app = make_app(conf={"kombu_pg_metrics_port": 9999, "kombu_pg_metrics_host": "0.0.0.0"}).app
    assert metrics.settings_of(app) == {"port": 9999, "host": "0.0.0.0", "buckets": metrics.DEFAULT_BUCKETS}
    monkeypatch.setenv(metrics.PORT_ENV, "9123")  # per process: wins over the shared setting
    assert metrics.settings_of(app)["port"] == 9123
    assert metrics.WorkerMetrics in app.steps["worker"]
