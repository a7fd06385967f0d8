"""Queues of dead workers and exited monitors expire; `celery purge` spares leased messages."""
from __future__ import annotations

import time

import pytest
from kombu import Consumer, Exchange, Queue

from conftest import wait_for

EXPIRES = 2.0  # seconds: control_queue_expires, event_queue_expires


def transient(names) -> set[str]:
    return {n for n in names if "pidbox" in n or n.startswith("celeryev.")}


@pytest.mark.slow
def test_queues_of_killed_worker_and_exited_receiver_expire(make_app, procs, env):
    app = make_app(conf={"control_queue_expires": EXPIRES, "event_queue_expires": EXPIRES,
                         "event_queue_ttl": 1.0})
    # A plain survivor (no events, gossip or mingle: only the `celery` queue and its pidbox).
    # Expired queues are swept by live consumers, as in a fleet where one worker dies.
    survivor = procs.worker(app, name="w2", pool="solo", concurrency=1,
                            extra_args=("--without-gossip", "--without-mingle"))
    survivor_queues = {"celery", f"{survivor.hostname}.celery.pidbox"}
    # The victim runs with events (Celery enables gossip and mingle only for amqp/redis).
    worker = procs.worker(app, name="w1", pool="solo", concurrency=1, extra_args=("-E",))
    pidbox = f"{worker.hostname}.celery.pidbox"

    # An events receiver in this process: runs until it got one event, then exits.
    names = set()

    def on_event(event):
        names.update(env.queue_names())
        receiver.should_stop = True

    with app.app.connection_for_read() as conn:
        receiver = app.app.events.Receiver(conn, handlers={"*": on_event})
        receiver.capture(limit=None, timeout=20, wakeup=True)
    assert pidbox in names and receiver.queue.name in names, names
    # A remote-control round trip (with a reply queue).
    assert len(app.app.control.ping(timeout=5, destination=[worker.hostname, survivor.hostname])) == 2

    worker.kill9()
    # Messages keep arriving for the dead worker until its queue expires.
    app.app.control.broadcast("ping", reply=False)

    def state():
        return f"queues {sorted(env.queue_names())}, {env.message_count()} message(s)"

    # Expiry (2 s) plus the transport's sweep interval; generous for a loaded machine.
    wait_for(lambda: env.queue_names() == survivor_queues and env.message_count() == 0, 45, interval=0.5,
             what=lambda: f"the dead worker's and the receiver's queues and messages to go ({state()})")


@pytest.mark.slow
def test_celery_purge_removes_ready_and_keeps_leased(make_app, procs, env, kombu_conn):
    app = make_app()
    results = [app.mark.delay(f"p{i}") for i in range(10)]
    wait_for(lambda: env.message_count("celery") == 10, 10, what="10 task messages")

    # A consumer holding three unacked messages (prefetch 3).
    conn = kombu_conn()
    held = []
    celery_queue = Queue("celery", Exchange("celery", "direct"), routing_key="celery")
    with Consumer(conn.default_channel, queues=[celery_queue], prefetch_count=3, accept=["json"],
                  callbacks=[lambda body, message: held.append(message)]):
        deadline = time.monotonic() + 10
        while len(held) < 3 and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
    assert len(held) == 3

    purge = procs.celery(app, "purge", "-f")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert "Purged 7 messages" in purge.stdout, purge.stdout
    rows = env.messages("celery")
    assert len(rows) == 3 and all(r["lease_token"] is not None for r in rows), rows
    held_ids = {m.headers["id"] for m in held}
    assert held_ids <= {r.id for r in results}
    # The holder can still settle them.
    for message in held:
        message.ack()
    env.wait_count("celery", 0)
