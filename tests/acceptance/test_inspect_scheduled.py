"""``celery inspect scheduled`` lists the delayed tasks the broker holds for the worker's queues."""
from __future__ import annotations

import datetime as dt
import json

from conftest import wait_for


def scheduled(procs, app, worker) -> list[dict]:
    out = procs.celery(app, "inspect", "scheduled", "-d", worker.hostname, "--json", "--timeout", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)[worker.hostname]


def test_inspect_scheduled_lists_eta_and_countdown_tasks_from_the_table(make_app, procs, env):
    app = make_app()
    worker = procs.worker(app, name="w1", pool="prefork", concurrency=1,
                          extra_args=("-Q", "celery,other"))
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    later = app.mark.apply_async(("later",), eta=eta, priority=4)
    sooner = app.add.apply_async((2, 3), countdown=3600)
    elsewhere = app.mark.apply_async(("elsewhere",), countdown=600, queue="other")
    unconsumed = app.mark.apply_async(("unconsumed",), countdown=600, queue="nobody")
    now = app.add.delay(1, 1)
    assert now.get(timeout=30) == 2

    entries = scheduled(procs, app, worker)
    ids = [e["request"]["id"] for e in entries]
    # Soonest first; queues the worker does not consume are not its business.
    assert ids == [elsewhere.id, sooner.id, later.id], entries
    assert unconsumed.id not in ids
    by_id = {e["request"]["id"]: e for e in entries}
    entry = by_id[later.id]
    assert dt.datetime.fromisoformat(entry["eta"]) == eta
    assert entry["priority"] == 4
    request = entry["request"]
    assert request["name"] == request["type"] == app.task_name("mark")
    assert request["args"] == ["later"] and request["kwargs"] == {}
    assert request["hostname"] == worker.hostname and request["acknowledged"] is False
    assert request["time_start"] is None and request["worker_pid"] is None
    assert by_id[sooner.id]["request"]["args"] == [2, 3]
    assert by_id[elsewhere.id]["request"]["delivery_info"]["routing_key"] == "other"

    # A revoked one is gone from the list.
    app.app.control.revoke(sooner.id)
    wait_for(lambda: sooner.id not in [e["request"]["id"] for e in scheduled(procs, app, worker)], 30,
             what="the revoked task to leave the list")
    assert worker.alive()
