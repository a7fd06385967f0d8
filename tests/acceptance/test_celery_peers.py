"""Mingle and gossip: workers on this broker learn about each other, as on RabbitMQ or Redis."""
from __future__ import annotations

import uuid

import pytest

from conftest import wait_for

#: A consumer bootstep recording, as rows of the runs table, the peers gossip saw join and leave.
PEER_WATCH = '''
from celery import bootsteps


class PeerWatch(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.gossip:Gossip",)

    def start(self, c):
        def recorder(event):
            def record_peer(worker):
                with psycopg.connect(DB_URL, autocommit=True, application_name="kp_task") as conn:
                    conn.execute("INSERT INTO " + RUNS + " (task_id, label, hostname, pid)"
                                 " VALUES (%s, %s, %s, %s)", (worker.hostname, event, c.hostname, os.getpid()))
            return record_peer

        c.gossip.on.node_join.add(recorder("join"))
        c.gossip.on.node_leave.add(recorder("leave"))


app.steps["consumer"].add(PeerWatch)
'''


@pytest.mark.slow
def test_a_worker_started_after_a_revoke_learns_it_through_mingle(make_app, procs, env):
    app = make_app()
    first = procs.worker(app, name="first", pool="solo", concurrency=1, extra_args=("-Q", "first"))
    assert "mingle: all alone" in first.log()
    revoked = str(uuid.uuid4())
    app.app.control.revoke(revoked)
    wait_for(lambda: revoked in (app.app.control.inspect(destination=[first.hostname], timeout=2).revoked()
                                 or {}).get(first.hostname, []), 20, what="the first worker to hold the revoke")

    # Started after the revoke (its remote-control queue did not exist then): it asks its
    # peers at start and holds the revoke in memory before any task arrives.
    late = procs.worker(app, name="late", pool="solo", concurrency=1, extra_args=("-Q", "late"))
    assert "mingle: sync with 1 nodes" in late.log(), late.log()
    assert revoked in held_revokes(app, late)
    app.mark.apply_async(("must-not-run",), task_id=revoked, queue="late")
    wait_for(lambda: app.app.AsyncResult(revoked).state == "REVOKED", 30, what="the task to be revoked")
    assert app.mark.apply_async(("after",), queue="late").get(timeout=30) == "after"
    assert env.runs("must-not-run") == []

    # --without-mingle: the worker does not ask, so it holds no revoke in memory; the revoke
    # recorded in the database still stops the task there.
    alone = procs.worker(app, name="alone", pool="solo", concurrency=1,
                         extra_args=("-Q", "alone", "--without-mingle"))
    assert "mingle:" not in alone.log()
    assert revoked not in held_revokes(app, alone)
    app.mark.apply_async(("must-not-run-either",), task_id=revoked, queue="alone")
    assert app.mark.apply_async(("after",), queue="alone").get(timeout=30) == "after"
    assert env.runs("must-not-run-either") == []


def held_revokes(app, worker) -> list[str]:
    """The task ids ``worker`` holds revoked in memory (Celery's own revoke list)."""
    replies = app.app.control.inspect(destination=[worker.hostname], timeout=5).revoked() or {}
    return replies.get(worker.hostname, [])


@pytest.mark.slow
def test_workers_see_each_other_come_and_go_through_gossip(make_app, procs, env):
    # Gossip is opt-in on this broker (its idle cost): an app without the setting has none.
    plain = make_app()
    unaware = procs.worker(plain, name="unaware", pool="solo", concurrency=1)
    assert not {q for q in env.queue_names() if q.startswith("celeryev.")}, env.queue_names()
    unaware.terminate()
    assert unaware.wait_exit(30) == 0

    app = make_app(extra_source=PEER_WATCH, conf={"kombu_pg_gossip": True})
    first = procs.worker(app, name="first", pool="solo", concurrency=1)
    second = procs.worker(app, name="second", pool="solo", concurrency=1)

    def seen(event, by, peer) -> bool:
        return any(r["hostname"] == by.hostname and r["task_id"] == peer.hostname for r in env.runs(event))

    # Each one hears the other's worker-online event (or its first heartbeat).
    wait_for(lambda: seen("join", first, second), 30, what="the first worker to see the second join")
    wait_for(lambda: seen("join", second, first), 30, what="the second worker to see the first")
    # A warm shutdown sends worker-offline.
    second.terminate()
    assert second.wait_exit(30) == 0
    wait_for(lambda: seen("leave", first, second), 30, what="the first worker to see the second leave")
    # --without-gossip: no queue on the events exchange, and nobody it hears.
    def gossip_queues() -> set[str]:
        return {q for q in env.queue_names() if q.startswith("celeryev.")}

    before = gossip_queues()
    quiet = procs.worker(app, name="quiet", pool="solo", concurrency=1, extra_args=("--without-gossip",))
    assert gossip_queues() == before
    wait_for(lambda: seen("join", first, quiet), 30, what="the first worker to see the quiet one join")
    third = procs.worker(app, name="third", pool="solo", concurrency=1)
    wait_for(lambda: seen("join", first, third), 30, what="the first worker to see the third join")
    wait_for(lambda: seen("join", third, first), 30, what="the third worker to see the first")
    assert not any(r["hostname"] == quiet.hostname for r in env.runs("join")), env.runs("join")
    # The heartbeats of the live ones kept coming (their gossip queues are claimed on a timer).
    assert "missed heartbeat" not in first.log(), first.log()


def test_short_lived_broadcast_queues_are_claimed_on_a_timer_without_wake_ups(env, kombu_conn):
    """Gossip's cost: every heartbeat goes to every worker's gossip queue (auto-delete, not
    durable, messages expiring within seconds). Producers send no NOTIFY for such a queue,
    which would wake every LISTEN session of the database; its consumer claims it every half
    of its TTL. A longer-lived queue on the same exchange still gets its wake-up."""
    import kombu
    import psycopg
    from psycopg import sql

    exchange = kombu.Exchange("broadcasts", type="topic", durable=False)
    polled = kombu.Queue("broadcasts.polled", exchange, routing_key="worker.#", auto_delete=True,
                         durable=False, message_ttl=2)
    woken = kombu.Queue("broadcasts.woken", exchange, routing_key="worker.#", auto_delete=True,
                        durable=False, message_ttl=60)
    got = []
    consumer_conn = kombu_conn()
    with psycopg.connect(env.url, autocommit=True) as listener, \
            kombu.Consumer(consumer_conn, [polled, woken], accept=["json"],
                           callbacks=[lambda body, message: (got.append((message.delivery_info["kombu_pg"]["queue"], body)),
                                                             message.ack())]):
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"kombu_pg.{env.broker_schema}")))
        with kombu_conn() as producer_conn:
            producer_conn.Producer().publish({"n": 1}, exchange=exchange, routing_key="worker.heartbeat",
                                             serializer="json", retry=True)

        def both():
            try:
                consumer_conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
            return len(got) == 2

        wait_for(both, 20, interval=0, what=lambda: f"both queues to deliver (got {got})")
        listener.execute("SELECT 1")  # collects the notifications sent meanwhile
        woken_up = {note.payload.partition(" ")[2] for note in listener.notifies(timeout=0.5)}
    assert sorted(got) == [("broadcasts.polled", {"n": 1}), ("broadcasts.woken", {"n": 1})]
    assert "broadcasts.woken" in woken_up and "broadcasts.polled" not in woken_up, woken_up
