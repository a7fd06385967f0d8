"""Remote control (broadcast + replies across processes) and monitoring events."""
from __future__ import annotations

import time

from conftest import HOST, console_script


def test_inspect_ping_and_shutdown_one_worker(make_app, procs, env):
    app = make_app()
    w1 = procs.worker(app, name="w1", pool="solo", concurrency=1)
    w2 = procs.worker(app, name="w2", pool="solo", concurrency=1)

    # With destinations the command returns as soon as both replied.
    ping = procs.celery(app, "inspect", "ping", "-d", f"{w1.hostname},{w2.hostname}", "--timeout", "5")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert f"w1@{HOST}" in ping.stdout and f"w2@{HOST}" in ping.stdout, ping.stdout
    assert ping.stdout.count("pong") == 2, ping.stdout

    # A worker does not reply to shutdown (it raises WorkerShutdown), so the command's own
    # "No nodes replied" exit status says nothing: the worker process exiting does.
    procs.celery(app, "control", "shutdown", "-d", w2.hostname, "--timeout", "1")
    assert w2.wait_exit(30) == 0
    assert "Got shutdown from remote" in w2.log()
    assert w1.alive()

    ping = procs.celery(app, "inspect", "ping", "-d", w1.hostname, "--timeout", "5")
    assert ping.returncode == 0 and f"w1@{HOST}" in ping.stdout, ping.stdout + ping.stderr
    ping = procs.celery(app, "inspect", "ping", "-d", w2.hostname, "--timeout", "1")
    assert ping.returncode != 0 and "No nodes replied" in ping.stderr, ping.stdout + ping.stderr
    # The survivor still works.
    assert app.add.delay(20, 22).get(timeout=30) == 42


def test_events_receiver_sees_heartbeat_and_task_succeeded(make_app, procs, env):
    app = make_app()
    procs.worker(app, name="w1", pool="solo", concurrency=1, extra_args=("-E",))
    seen: dict[str, list] = {}
    sent: list = []
    deadline = time.monotonic() + 40

    def on_event(event):
        seen.setdefault(event["type"], []).append(event)
        if not sent and event["type"] == "worker-heartbeat":
            # Our queue exists (we got an event): now run a task and wait for its events.
            sent.append(app.add.delay(1, 1))

    def done() -> bool:
        return bool(sent) and any(e.get("uuid") == sent[0].id for e in seen.get("task-succeeded", []))

    with app.app.connection_for_read() as conn:
        receiver = app.app.events.Receiver(conn, handlers={"*": on_event})

        def on_iteration():
            if done() or time.monotonic() > deadline:
                receiver.should_stop = True

        receiver.on_iteration = on_iteration
        receiver.capture(limit=None, timeout=30, wakeup=False)

    assert seen.get("worker-heartbeat"), sorted(seen)
    assert any(e["hostname"] == f"w1@{HOST}" for e in seen["worker-heartbeat"])
    assert done(), f"no task-succeeded event for the task; saw {sorted(seen)}"
    [succeeded] = [e for e in seen["task-succeeded"] if e["uuid"] == sent[0].id]
    assert succeeded["result"] == "2"


def test_event_and_reply_consumers_hold_no_leases(make_app, procs, env):
    """``celery events`` and the replies to ``celery inspect`` take messages without ack: they
    hold no lease, so none is renewed, and none is reported lost, while a busy worker sends
    events. A visibility timeout of 2 s renews leases every 2/3 s: this 15 s run makes more
    renewal rounds than a minute does at the default 30 s (one round every 10 s)."""
    app = make_app(visibility_timeout=2)
    worker = procs.worker(app, name="w1", pool="prefork", concurrency=2, extra_args=("-E",))
    events = procs.spawn([console_script("celery"), "-A", app.name, "events", "--dump"], name="events")
    pings = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for result in [app.add.delay(i, i) for i in range(20)]:
            assert result.get(timeout=30) >= 0
        if len(pings) < 3:
            pings.append(procs.celery(app, "inspect", "ping", "--timeout", "3"))
    for ping in pings:
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        assert "lost the lease" not in ping.stdout + ping.stderr
    assert events.alive()
    assert "task succeeded" in events.log(), events.log()[-2000:]  # it did consume events
    assert "lost the lease" not in events.log()
    assert "lost the lease" not in worker.log()
