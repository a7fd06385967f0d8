"""The console's JSON API (`kombu-pg web`, kombu_pg/web/): every endpoint against a real broker
schema, its answers compared with the tables; bad input answered 4xx with a JSON error and
nothing changed; who may change what (token, basic auth, read-only, CSRF on the pages); the
per-minute counts behind the rates; the command itself, as `kombu-pg web` and `celery -A app pg web`."""
from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request

import psycopg
import pytest
from psycopg import sql

from conftest import console_script, wait_for

pytest.importorskip("flask")

from kombu_pg import counters, minute_stats  # noqa: E402
from kombu_pg.beat_store import BeatStore, EntryDef  # noqa: E402
from kombu_pg.web import Access, Console, create_app  # noqa: E402

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sql_value(env, query: str, *params):
    return env.db.query(sql.SQL(query).format(s=sql.Identifier(env.broker_schema)), params or None)[0][0]


def state(env) -> tuple:
    """Everything a refused request must leave as it was."""
    cur = env.db.conn.cursor()
    dead = cur.execute(sql.SQL("SELECT id, replayed_at FROM {}.dead_letters ORDER BY id").format(
        sql.Identifier(env.broker_schema))).fetchall()
    beat = cur.execute(sql.SQL("SELECT name, paused, total_run_count FROM {}.beat_entries ORDER BY name").format(
        sql.Identifier(env.broker_schema))).fetchall()
    messages = cur.execute(sql.SQL("SELECT count(*) FROM {}.messages").format(
        sql.Identifier(env.broker_schema))).fetchone()[0]
    return dead, beat, messages


@pytest.fixture
def broker(make_app, kombu_conn, env):
    """A Celery app's tasks published (no worker): 3 ready `add`, 2 `mark` dead-lettered by a
    consumer's reject, 1 `mark` leased; one beat entry."""
    app = make_app()
    ready = [app.add.delay(i, i) for i in range(3)]
    marks = [app.mark.delay(f"m{i}") for i in range(3)]
    conn = kombu_conn()
    queue = conn.SimpleQueue("celery")
    taken = [queue.get(timeout=10) for _ in range(6)]
    mark_name = app.task_name("mark")
    by_task = {}
    for message in taken:
        by_task.setdefault(message.headers["task"], []).append(message)
    by_task[mark_name][0].reject()
    by_task[mark_name][1].reject()
    for message in by_task[app.task_name("add")]:
        message.requeue()  # given back: ready again
    with psycopg.connect(env.url, autocommit=True) as db:
        BeatStore(env.broker_schema).add(db, EntryDef(name="tick", task=mark_name, every=3600.0,
                                                      args='["from-beat"]'))
    return {"app": app, "ready": ready, "leased": marks[2], "queue": queue, "conn": conn,
            "mark": mark_name, "add": app.task_name("add")}


def client(env, **access):
    return create_app(Console(env.url, env.broker_schema), Access(**access)).test_client()


def test_every_endpoint_shows_what_the_tables_hold(broker, env):
    web = client(env, token=TOKEN)
    queues = web.get("/api/queues", headers=AUTH)
    assert queues.status_code == 200
    celery = {q["queue"]: q for q in queues.json["queues"]}["celery"]
    where = "queue = 'celery' AND visible_at <= now() AND lease_token IS NULL"
    assert celery["ready"] == sql_value(env, f"SELECT count(*) FROM {{s}}.messages WHERE {where}") == 3
    assert celery["leased"] == 1 and celery["delayed"] == 0
    assert celery["dead_letters"] == {"rejected": 2} and celery["dead_letters_total"] == 2
    assert len(queues.json["minutes"]) == 60 and len(celery["history"]["published"]) == 60

    listed = web.get("/api/dead-letters", headers=AUTH).json
    assert listed["count"] == 2 == sql_value(env, "SELECT count(*) FROM {s}.dead_letters")
    assert {d["task_name"] for d in listed["items"]} == {broker["mark"]}
    assert all(d["reason"] == "rejected" for d in listed["items"])
    first, second = (d["id"] for d in listed["items"])
    # Keyset pagination: one per page, then the next, then none.
    page1 = web.get("/api/dead-letters?limit=1", headers=AUTH).json
    assert [d["id"] for d in page1["items"]] == [first] and page1["next_after"] == first
    page2 = web.get(f"/api/dead-letters?limit=1&after={first}", headers=AUTH).json
    assert [d["id"] for d in page2["items"]] == [second] and page2["next_after"] is None
    # Filters
    assert web.get("/api/dead-letters?queue=other", headers=AUTH).json["count"] == 0
    assert web.get(f"/api/dead-letters?task={broker['mark']}&reason=rejected", headers=AUTH).json["count"] == 2
    assert web.get("/api/dead-letters?reason=max_attempts", headers=AUTH).json["count"] == 0

    detail = web.get(f"/api/dead-letters/{first}", headers=AUTH).json
    assert detail["id"] == first and detail["errors"][0]["type"] == "Rejected"
    assert detail["message"]["headers"]["task"] == broker["mark"]

    beat = web.get("/api/beat", headers=AUTH).json
    assert [(e["name"], e["paused"], e["args"]) for e in beat["entries"]] == [("tick", False, ["from-beat"])]
    assert beat["entries"][0]["next_run_at"] and beat["leader"]["active"] is False

    workers = web.get("/api/workers", headers=AUTH).json
    holders = workers["holders"]
    assert len(holders) == 1 and holders[0]["leases"] == 1 and holders[0]["queues"] == ["celery"]
    assert holders[0]["pid"] is not None and holders[0]["leased_by"].endswith(f"[{holders[0]['pid']}]")
    assert [m["task_id"] for m in workers["leases"]] == [broker["leased"].id]

    task = web.get(f"/api/tasks/{broker['ready'][0].id}", headers=AUTH).json
    assert task["state"] == "ready" and task["messages"][0]["queue"] == "celery"
    leased = web.get(f"/api/tasks/{broker['leased'].id}", headers=AUTH).json
    assert leased["state"] == "leased" and leased["messages"][0]["pid"] == holders[0]["pid"]


def test_bad_input_is_refused_with_a_json_error_and_nothing_changes(broker, env):
    web = client(env, token=TOKEN)
    before = state(env)
    cases = [
        ("get", "/api/dead-letters/999999", None, 404, "no dead letter with id 999999"),
        ("get", "/api/dead-letters/abc", None, 404, "ids are whole numbers"),
        ("get", "/api/dead-letters?reason=bogus", None, 400, "unknown reason 'bogus'"),
        ("get", "/api/dead-letters?replayed=maybe", None, 400, "replayed must be one of"),
        ("get", "/api/dead-letters?colour=red", None, 400, "unknown parameter 'colour'"),
        ("get", "/api/dead-letters?after=-1", None, 400, "after must be at least 0"),
        ("get", "/api/dead-letters?after=two", None, 400, "after must be a whole number"),
        ("get", "/api/dead-letters?limit=0", None, 400, "limit must be between 1 and 500"),
        ("get", "/api/dead-letters?limit=100000", None, 400, "limit must be between 1 and 500"),
        ("get", "/api/queues?minutes=0", None, 400, "minutes must be between"),
        ("get", "/api/tasks/no-such-task", None, 404, "is not in the broker"),
        ("get", "/api/workers?x=1", None, 400, "unknown parameter 'x'"),
        ("get", "/api/nothing-here", None, 404, ""),
        ("post", "/api/dead-letters/replay", {"ids": []}, 400, "non-empty list"),
        ("post", "/api/dead-letters/replay", {"ids": ["1; DROP TABLE x"]}, 400, "positive integers"),
        ("post", "/api/dead-letters/replay", {}, 400, "send {\"ids\""),
        ("post", "/api/dead-letters/purge", {"filter": {"reason": "nope"}}, 400, "unknown reason"),
        ("post", "/api/dead-letters/purge", {"filter": {"queue'": "x"}}, 400, "the filter takes"),
        ("post", "/api/dead-letters/explode", {"ids": [1]}, 400, "unknown action 'explode'"),
        ("post", "/api/beat/no-such-entry/pause", {}, 404, "no beat entry named 'no-such-entry'"),
        ("post", "/api/beat/tick/explode", {}, 400, "unknown action 'explode'"),
    ]
    for method, path, body, status, message in cases:
        response = getattr(web, method)(path, headers=AUTH, json=body) if method == "post" \
            else web.get(path, headers=AUTH)
        assert response.status_code == status, (path, response.status_code, response.data)
        assert response.is_json and response.json["status"] == status, (path, response.data)
        assert message in response.json["error"], (path, response.json)
    # A purge by ids that match nothing is not an error: it deletes nothing.
    assert web.post("/api/dead-letters/purge", headers=AUTH, json={"ids": [999999]}).json["done"] == 0
    assert state(env) == before


def test_replay_purge_pause_and_run_through_the_api(broker, env):
    web = client(env, token=TOKEN)
    ids = [d["id"] for d in web.get("/api/dead-letters", headers=AUTH).json["items"]]
    dry = web.post("/api/dead-letters/replay", headers=AUTH, json={"filter": {}, "dry_run": True}).json
    assert dry == {"action": "replay", "matching": 2, "done": 0, "dry_run": True}
    assert sql_value(env, "SELECT count(*) FROM {s}.dead_letters WHERE replayed_at IS NULL") == 2

    replayed = web.post("/api/dead-letters/replay", headers=AUTH, json={"ids": [ids[0]]}).json
    assert replayed["done"] == 1
    assert sql_value(env, "SELECT count(*) FROM {s}.messages WHERE task_name = %s AND lease_token IS NULL",
                     broker["mark"]) == 1
    # Replayed already: a second replay of it does nothing.
    assert web.post("/api/dead-letters/replay", headers=AUTH, json={"ids": [ids[0]]}).json["done"] == 0
    purged = web.post("/api/dead-letters/purge", headers=AUTH,
                      json={"filter": {"replayed": "yes", "reason": "rejected"}}).json
    assert purged["done"] == 1
    assert sql_value(env, "SELECT array_agg(id) FROM {s}.dead_letters") == [ids[1]]

    assert web.post("/api/beat/tick/pause", headers=AUTH, json={}).json["paused"] is True
    assert sql_value(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'tick'") is True
    assert web.post("/api/beat/tick/resume", headers=AUTH, json={}).json["paused"] is False
    assert sql_value(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'tick'") is False
    sent = web.post("/api/beat/tick/run", headers=AUTH, json={}).json
    row = env.messages(where=f"task_id = '{sent['task_id']}'")
    assert len(row) == 1 and row[0]["task_name"] == broker["mark"] and row[0]["queue"] == "celery"
    assert json.loads(json.loads(row[0]["payload"])["body"])[0] == ["from-beat"]


def test_who_may_change_what(broker, env):
    before = state(env)
    # No credentials: read-only whatever the flag says.
    open_console = client(env)
    assert open_console.get("/api/queues").status_code == 200
    refused = open_console.post("/api/dead-letters/purge", json={"filter": {}})
    assert refused.status_code == 403 and "read-only" in refused.json["error"]
    assert open_console.post("/beat/tick/pause", data={}).status_code == 403
    assert b'id="read-only"' in open_console.get("/dead-letters").data
    assert b"<form method=\"post\"" not in open_console.get("/beat").data

    read_only = client(env, token=TOKEN, read_only=True)
    assert read_only.get("/api/beat", headers=AUTH).status_code == 200
    assert read_only.post("/api/beat/tick/pause", headers=AUTH, json={}).status_code == 403

    protected = client(env, token=TOKEN)
    assert protected.get("/api/queues").status_code == 401
    assert protected.get("/api/queues", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert protected.get("/queues").status_code == 302  # to the login form
    # JSON mutations need a JSON body (a cross-site form cannot send one).
    form_post = protected.post("/api/beat/tick/pause", headers=AUTH, data={"x": "1"})
    assert form_post.status_code == 415
    # Pages: logged in by the token, POSTs need the session's CSRF token.
    assert protected.post("/login", data={"token": "wrong"}).status_code == 401
    assert protected.post("/login", data={"token": TOKEN}).status_code == 302
    assert protected.post("/beat/tick/pause", data={}).status_code == 403
    assert protected.post("/beat/tick/pause", data={"csrf_token": "forged"}).status_code == 403
    # A logged-in session is not enough for the API's changes: they need the header.
    assert protected.post("/api/beat/tick/pause", json={}).status_code == 401
    assert state(env) == before
    page = protected.get("/beat").data.decode()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert protected.post("/beat/tick/pause", data={"csrf_token": csrf}).status_code == 302
    assert sql_value(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'tick'") is True

    basic = client(env, user="ops", password="pw")
    good = "Basic " + base64.b64encode(b"ops:pw").decode()
    bad = "Basic " + base64.b64encode(b"ops:nope").decode()
    assert basic.get("/queues").status_code == 401 and "Basic" in basic.get("/queues").headers["WWW-Authenticate"]
    assert basic.get("/queues", headers={"Authorization": bad}).status_code == 401
    resumed = basic.post("/api/beat/tick/resume", headers={"Authorization": good}, json={})
    assert resumed.status_code == 200 and resumed.json["paused"] is False
    # The pages' forms under basic auth: the session (cookie) carries the CSRF token.
    page = basic.get("/beat", headers={"Authorization": good}).data.decode()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert basic.post("/beat/tick/pause", headers={"Authorization": good}, data={}).status_code == 403
    assert basic.post("/beat/tick/pause", headers={"Authorization": good},
                      data={"csrf_token": csrf}).status_code == 302
    assert sql_value(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'tick'") is True


def test_the_pages_render_and_mask_the_password(broker, env):
    url = env.url.replace("postgres@", "postgres:hunter2@", 1) if "@" in env.url else env.url
    web = create_app(Console(url, env.broker_schema), Access(token=TOKEN)).test_client()
    web.post("/login", data={"token": TOKEN})
    for path in ("/queues", "/dead-letters", "/beat", "/workers", f"/tasks?id={broker['ready'][0].id}"):
        page = web.get(path)
        assert page.status_code == 200, path
        assert b"hunter2" not in page.data
    first = web.get("/api/dead-letters", headers=AUTH).json["items"][0]["id"]
    detail = web.get(f"/dead-letters/{first}").data.decode()
    assert "Rejected" in detail and "Replay…" in detail
    confirm = web.get(f"/dead-letters/confirm?action=purge&reason=rejected").data.decode()
    assert 'id="confirm-count">2<' in confirm
    assert web.get("/dead-letters?reason=bogus").status_code == 400
    assert web.get("/dead-letters/999999").status_code == 404


def test_counts_reach_the_table_once_a_minute_and_only_when_something_was_counted(kombu_conn, env):
    conn = kombu_conn()
    queue = conn.SimpleQueue("stats")
    for i in range(3):
        queue.put({"i": i})
    assert minute_stats.flush() > 0
    assert minute_stats.flush() == 0  # nothing new: nothing written
    rows = dict(env.db.query(sql.SQL("SELECT event, sum(count) FROM {}.queue_stats WHERE queue = 'stats'"
                                     " GROUP BY 1").format(sql.Identifier(env.broker_schema))))
    assert rows["published"] == 3
    counters.add("acked", "stats", 2)
    assert minute_stats.flush() == 1
    web = client(env)
    stats = {q["queue"]: q for q in web.get("/api/queues").json["queues"]}["stats"]
    assert sum(stats["history"]["published"]) == 3 and sum(stats["history"]["acked"]) == 2
    assert stats["per_minute"]["published"] == 0.6  # the mean of the last 5 minutes


def test_flushes_prune_counts_older_than_a_day(kombu_conn, env):
    conn = kombu_conn()
    conn.connect()
    db = conn.default_channel.db
    table = sql.SQL("{}.queue_stats").format(sql.Identifier(env.broker_schema))
    env.db.query(sql.SQL("INSERT INTO {} VALUES (date_trunc('minute', now()) - interval '25 hours', 'old',"
                         " 'published', 7), (date_trunc('minute', now()) - interval '23 hours', 'recent',"
                         " 'published', 5)").format(table))
    flusher = minute_stats.Flusher()  # a process's first flush prunes
    flusher.watch(db, thread=False)
    assert flusher.flush() == 0  # nothing counted: no statement at all, so no pruning either
    counters.add("published", "pruning", 1)
    assert flusher.flush() == 1
    left = env.db.query(sql.SQL("SELECT queue, count FROM {} ORDER BY queue").format(table))
    assert left == [("pruning", 1), ("recent", 5)]


def get_json(port: int, path: str, token: str | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def serving_port(proc) -> int | None:
    assert proc.alive(), proc.log()
    match = re.search(r"serving http://127\.0\.0\.1:(\d+)/", proc.log())
    return int(match.group(1)) if match else None


@pytest.mark.slow
def test_the_command_serves_the_console_for_a_url_and_for_a_celery_app(broker, procs, env):
    procs.env["KOMBU_PG_WEB_TOKEN"] = TOKEN
    standalone = procs.spawn([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema,
                              "web", "--port", "0"], name="web")
    port = wait_for(lambda: serving_port(standalone), 30, what="kombu-pg web to serve")
    assert get_json(port, "/api/queues")[0] == 401
    status, data = get_json(port, "/api/queues", TOKEN)
    assert status == 200 and {q["queue"]: q for q in data["queues"]}["celery"]["ready"] == 3
    assert "changes need the token" in standalone.log()

    from_app = procs.spawn([console_script("celery"), "-A", broker["app"].name, "pg", "web", "--port", "0",
                            "--read-only"], name="web-celery")
    port = wait_for(lambda: serving_port(from_app), 30, what="celery pg web to serve")
    status, data = get_json(port, "/api/dead-letters", TOKEN)
    assert status == 200 and data["count"] == 2
    assert "read-only" in from_app.log()
