"""The console in a real headless browser (Debian's Chromium and chromedriver, via Selenium),
after a workload through the public path: a Celery app on this broker, a worker subprocess,
`celery beat -S kombu_pg`. The pages show what the tables hold; a replay from the page makes
the fixed tasks run; pausing a beat entry from the page stops its ticks; a read-only console
shows no forms and refuses a forged POST, changing nothing.

With KOMBU_PG_SCREENSHOT=1 the queues page is saved as docs/console.png (shown in the README).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg.rows
import pytest
from psycopg import sql

from conftest import HOST, console_script, dead_letters, wait_for
from test_dlq_cli import TASKS  # the flaky task: fails while its flag says broken

pytest.importorskip("flask")
pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from kombu_pg import minute_stats  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
TOKEN = "browser-test-token"


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when missing; skip only without apt."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("needs chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver), "
                    "and apt-get is not available to install them")
    result = subprocess.run([apt, "install", "-y", "chromium", "chromium-driver"], capture_output=True,
                            text=True, timeout=900, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if result.returncode != 0:
        pytest.skip(f"apt-get install chromium chromium-driver failed: {result.stderr.strip()[-500:]}")


@pytest.fixture
def browser():
    ensure_chromium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(10)  # find_element waits for the element of the page being loaded
    try:
        yield driver
    finally:
        driver.quit()  # stops chromedriver (by its PID) and the browser


def start_console(procs, env, name: str, *args: str):
    proc = procs.spawn([console_script("kombu-pg"), "--url", env.url, "--schema", env.broker_schema,
                        "web", "--port", "0", *args], name=name)

    def port():
        assert proc.alive(), proc.log()
        match = re.search(r"serving http://127\.0\.0\.1:(\d+)/", proc.log())
        return int(match.group(1)) if match else None

    return proc, f"http://127.0.0.1:{wait_for(port, 30, what=f'{name} to serve')}"


def scalar(env, query: str, *params):
    return env.db.query(sql.SQL(query).format(s=sql.Identifier(env.broker_schema)), params or None)[0][0]


def text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is the answer (urlopen raises HTTPError with its status)


def absent(driver, css: str) -> bool:
    """No such element on the page (checked at once, without the implicit wait)."""
    driver.implicitly_wait(0)
    try:
        return not driver.find_elements(By.CSS_SELECTOR, css)
    finally:
        driver.implicitly_wait(10)


def post(url: str, data: dict | None = None, json_body: dict | None = None, headers: dict | None = None):
    body = json.dumps(json_body).encode() if json_body is not None else urllib.parse.urlencode(data or {}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json" if json_body is not None else "application/x-www-form-urlencoded",
        **(headers or {})})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=15) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def hb_ticks(env) -> int:
    return scalar(env, "SELECT count(*) FROM {s}.beat_ticks WHERE entry = 'hb'")


@pytest.mark.slow
def test_the_console_in_a_browser(browser, make_app, procs, env):
    env.db.query(sql.SQL("CREATE TABLE {}.flags (name text PRIMARY KEY, broken boolean NOT NULL)").format(
        sql.Identifier(env.app_schema)))
    env.db.query(sql.SQL("INSERT INTO {}.flags VALUES ('flaky', true)").format(sql.Identifier(env.app_schema)))

    def conf(name):
        return {"beat_schedule": {"hb": {"task": f"{name}.mark", "schedule": 1.0, "args": ("hb",)}}}

    app = make_app(conf=conf, extra_source=TASKS, transport_options={
        "max_attempts": 2, "backoff_base": 0.2, "polling_interval": 0.2})
    procs.env["KOMBU_PG_STATS_INTERVAL"] = "1"  # the worker's and beat's counts, every second
    worker = procs.worker(app, pool="prefork", concurrency=2)

    # The workload: failing tasks dead-lettered, a backlog in a queue no worker consumes, a
    # long task holding a lease, beat ticking.
    failing = [app.flaky.delay(f"job{i}") for i in range(3)]
    backlog = [app.mark.apply_async((f"b{i}",), queue="backlog") for i in range(5)]
    wait_for(lambda: len(dead_letters(env)) == 3, 60, what="three dead letters")
    beat = procs.spawn([console_script("celery"), "-A", app.name, "beat", "-S", "kombu_pg", "-l", "INFO"],
                       name="beat")
    wait_for(lambda: hb_ticks(env) >= 2, 60, what="beat to tick")
    minute_stats.flush()  # this process published the backlog
    procs.env["KOMBU_PG_WEB_TOKEN"] = TOKEN
    console, base = start_console(procs, env, "web-token")

    # Log in with the token.
    browser.get(base + "/queues")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: browser.current_url.endswith("/queues"), 30, what="the queues page after the login")

    # Queues: the figures the SQL says.
    row = 'tr[data-queue="backlog"]'
    assert int(text(browser, f"{row} .ready")) == 5 == scalar(
        env, "SELECT count(*) FROM {s}.messages WHERE queue = 'backlog' AND visible_at <= now() AND lease_token IS NULL")
    published = scalar(env, "SELECT coalesce(sum(count), 0) FROM {s}.queue_stats WHERE queue = 'backlog'"
                            " AND event = 'published' AND minute >= date_trunc('minute', now()) - interval '4 minutes'")
    assert published == 5 and float(text(browser, f"{row} .rate-published")) == round(published / 5, 2)
    dead_total = scalar(env, "SELECT count(*) FROM {s}.dead_letters WHERE queue = 'celery' AND replayed_at IS NULL")
    assert int(text(browser, 'tr[data-queue="celery"] .dead-total')) == dead_total == 3
    assert "max_attempts 3" in text(browser, 'tr[data-queue="celery"] .dead')
    assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-queue="celery"] svg.chart')
    if os.environ.get("KOMBU_PG_SCREENSHOT") == "1":
        # Let the worker's acks reach the per-minute counts, for a chart with lines in it.
        time.sleep(3)
        browser.refresh()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))

    # Workers: the worker holding a long task's lease, with its pid.
    long_task = app.sleepy.delay("long", 10)
    wait_for(lambda: scalar(env, "SELECT count(*) FROM {s}.messages WHERE task_id = %s AND leased_by IS NOT NULL",
                            long_task.id), 30, what="the long task's lease")
    browser.get(base + "/workers")
    holders = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#holders tbody tr")]
    assert any(f"w1@{HOST}" in r and str(worker.pid) in r for r in holders), holders

    # Task lookup.
    browser.get(base + f"/tasks?id={backlog[0].id}")
    assert text(browser, "#state") == "ready"

    # Dead letters: filtered list, detail with every attempt's error and traceback.
    browser.get(base + f"/dead-letters?task={app.task_name('flaky')}&reason=max_attempts")
    assert int(text(browser, "#count")) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "#dead-letters tbody tr[data-id]")) == 3
    browser.find_element(By.CSS_SELECTOR, "#dead-letters tbody tr[data-id] a").click()
    assert text(browser, "#reason") == "max_attempts"
    attempts = browser.find_elements(By.CSS_SELECTOR, ".attempt")
    assert len(attempts) == 2 and all("still broken" in a.text for a in attempts)
    assert "RuntimeError" in text(browser, ".traceback")

    # The bug is fixed: replay all matching from the page, after the confirmation step.
    env.db.query(sql.SQL("UPDATE {}.flags SET broken = false").format(sql.Identifier(env.app_schema)))
    browser.get(base + f"/dead-letters?task={app.task_name('flaky')}")
    browser.find_element(By.ID, "replay-all").click()
    assert text(browser, "#confirm-count") == "3"
    assert scalar(env, "SELECT count(*) FROM {s}.dead_letters WHERE replayed_at IS NULL") == 3  # not yet
    browser.find_element(By.ID, "confirm").click()
    assert "replayed 3 dead letter(s)" in text(browser, "#flash")

    def meta(task_id):  # uncached: the backend caches the FAILURE it read first
        return app.app.backend.get_task_meta(task_id, cache=False)

    for r in failing:
        wait_for(lambda: meta(r.id)["status"] == "SUCCESS", 60, what=f"{r.id} to succeed after the replay")
    assert sorted(meta(r.id)["result"] for r in failing) == ["fixed job0", "fixed job1", "fixed job2"]

    # Beat: run now (the worker runs it), then pause from the page; no tick after that.
    browser.get(base + "/beat")
    assert text(browser, "#leader").startswith("Leader: ") and "none" not in text(browser, "#leader")
    browser.find_element(By.CSS_SELECTOR, 'tr[data-entry="hb"] button.run').click()
    sent_id = re.search(r"task ([0-9a-f-]{36})", text(browser, "#flash")).group(1)
    wait_for(lambda: any(r["task_id"] == sent_id for r in env.runs("hb")), 30, what="the task run now to run")
    browser.get(base + "/beat")
    browser.find_element(By.CSS_SELECTOR, 'tr[data-entry="hb"] button.toggle').click()
    assert "paused hb" in text(browser, "#flash")
    assert text(browser, 'tr[data-entry="hb"] .state') == "paused"
    assert scalar(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'hb'") is True
    time.sleep(2)  # a tick already being sent when the pause landed has committed by now
    paused_at = hb_ticks(env)
    time.sleep(4)  # four periods of the entry
    assert hb_ticks(env) == paused_at, "beat ticked after the pause"

    # Read-only: no forms, and a forged POST is refused with nothing changed.
    _, read_only = start_console(procs, env, "web-read-only", "--read-only")
    browser.get(read_only + "/login")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: "/login" not in browser.current_url, 30, what="the login to complete")
    for path in ("/beat", "/dead-letters", f"/dead-letters/{dead_letters(env)[0]['id']}"):
        browser.get(read_only + path)
        assert browser.find_elements(By.ID, "read-only"), path
        assert absent(browser, "form[method=post]"), path
        assert absent(browser, "#replay-all") and absent(browser, "#replay") and absent(browser, "#purge"), path
    before = (dead_letters(env), hb_ticks(env), scalar(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'hb'"))
    assert post(read_only + "/beat/hb/resume", data={"csrf_token": "forged"}) == 403
    assert post(read_only + "/api/beat/hb/resume", json_body={},
                headers={"Authorization": f"Bearer {TOKEN}"}) == 403
    assert post(read_only + "/api/dead-letters/purge", json_body={"filter": {"replayed": "all"}},
                headers={"Authorization": f"Bearer {TOKEN}"}) == 403
    assert post(read_only + "/dead-letters/action", data={"action": "purge", "replayed": "all"}) == 403
    # The writable console refuses a forged form too: without a session, to the login page...
    assert post(base + "/dead-letters/action", data={"action": "purge", "replayed": "all"}) == 302
    assert (dead_letters(env), scalar(env, "SELECT paused FROM {s}.beat_entries WHERE name = 'hb'")) == \
        (before[0], before[2])
    # Every action is logged with who did it and how many it touched.
    assert re.search(r"session from 127\.0\.0\.1: replay of dead letters matching .*: 3", console.log())
    assert "session from 127.0.0.1: beat pause 'hb'" in console.log()
    assert TOKEN not in console.log()
