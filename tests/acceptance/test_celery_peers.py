"""Mingle and gossip: workers on this broker learn about each other, as on RabbitMQ or Redis."""
from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from psycopg import sql

from kombu_pg.broadcasts import broadcast_channel

from conftest import dead_letters, wait_for

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
    # An app can turn gossip off for its workers on this broker: no gossip queue then.
    plain = make_app(conf={"kombu_pg_gossip": False})
    unaware = procs.worker(plain, name="unaware", pool="solo", concurrency=1)
    assert not gossip_queues(env), env.queue_names()
    unaware.terminate()
    assert unaware.wait_exit(30) == 0

    app = make_app(extra_source=PEER_WATCH)  # gossip on, as by default
    first = procs.worker(app, name="first", pool="solo", concurrency=1)
    second = procs.worker(app, name="second", pool="solo", concurrency=1)

    def seen(event, by, peer) -> bool:
        return any(r["hostname"] == by.hostname and r["task_id"] == peer.hostname for r in env.runs(event))

    # Each one hears the other's worker-online event (or its first heartbeat).
    wait_for(lambda: seen("join", first, second), 30, what="the first worker to see the second join")
    wait_for(lambda: seen("join", second, first), 30, what="the second worker to see the first")
    # Their gossip queues take the heartbeats as notifications: no row is ever stored for them.
    wait_for(lambda: len(listening_gossip_queues(env)) == 2, 20, what="both gossip queues to take notifications")
    inserted = messages_inserted(env)
    time.sleep(12)  # more than a heartbeat interval (10 s on this broker)
    assert messages_inserted(env) == inserted
    assert not [m for m in env.messages() if m["queue"].startswith("celeryev.")]
    # A warm shutdown sends worker-offline.
    second.terminate()
    assert second.wait_exit(30) == 0
    wait_for(lambda: seen("leave", first, second), 30, what="the first worker to see the second leave")
    # --without-gossip: no queue on the events exchange, and nobody it hears.
    before = gossip_queues(env)
    quiet = procs.worker(app, name="quiet", pool="solo", concurrency=1, extra_args=("--without-gossip",))
    assert gossip_queues(env) == before
    wait_for(lambda: seen("join", first, quiet), 30, what="the first worker to see the quiet one join")
    third = procs.worker(app, name="third", pool="solo", concurrency=1)
    wait_for(lambda: seen("join", first, third), 30, what="the first worker to see the third join")
    wait_for(lambda: seen("join", third, first), 30, what="the third worker to see the first")
    assert not any(r["hostname"] == quiet.hostname for r in env.runs("join")), env.runs("join")
    # The heartbeats of the live ones kept coming.
    assert "missed heartbeat" not in first.log(), first.log()


def gossip_queues(env) -> set[str]:
    return {q for q in env.queue_names() if q.startswith("celeryev.")}


def listening_gossip_queues(env) -> set[str]:
    return {row[0] for row in env.db.query(sql.SQL(
        "SELECT name FROM {} WHERE name LIKE 'celeryev.%%' AND via_notify").format(env.t("queues")))}


def messages_inserted(env) -> int:
    """How far the messages table's id sequence went: every row inserted takes a number."""
    sequence = env.db.scalar("SELECT pg_get_serial_sequence(%s, 'id')", (f'"{env.broker_schema}".messages',))
    return env.db.scalar(sql.SQL("SELECT last_value FROM {}").format(sql.SQL(sequence)))


@pytest.mark.slow
def test_heartbeats_come_every_10_seconds_unless_the_worker_says(make_app, procs, env):
    app = make_app()
    default = procs.worker(app, name="default", pool="solo", concurrency=1)
    chosen = procs.worker(app, name="chosen", pool="solo", concurrency=1, extra_args=("--heartbeat-interval", "3"))
    freqs: dict[str, float] = {}

    def on_heartbeat(event):
        freqs[event["hostname"]] = event["freq"]
        receiver.should_stop = len(freqs) == 2

    with app.app.connection_for_read() as conn:
        receiver = app.app.events.Receiver(conn, handlers={"worker-heartbeat": on_heartbeat})
        receiver.capture(limit=None, timeout=30, wakeup=False)
    assert freqs == {default.hostname: 10.0, chosen.hostname: 3.0}


TRANSIENT = dict(auto_delete=True, durable=False, message_ttl=2)


def test_a_short_lived_broadcast_queue_takes_its_messages_as_notifications(env, kombu_conn):
    """Gossip's cost: every heartbeat goes to every worker's gossip queue (auto-delete, not
    durable, messages expiring within seconds). Once its no-ack consumer LISTENs, a message
    reaches it as a NOTIFY payload, not a row; one too big for a notification still arrives
    (as rows), and so do rows a publisher of an earlier version writes. A durable queue on the
    same exchange still gets rows."""
    import kombu

    exchange = kombu.Exchange("broadcasts", type="topic", durable=False)
    gossip = kombu.Queue("broadcasts.gossip", exchange, routing_key="worker.#", **TRANSIENT)
    other = kombu.Queue("broadcasts.other", exchange, routing_key="task.#", **TRANSIENT)
    durable = kombu.Queue("broadcasts.durable", exchange, routing_key="worker.#")
    got: list = []
    consumer_conn = kombu_conn()
    with kombu.Consumer(consumer_conn, [gossip, other], accept=["json"], no_ack=True,
                        callbacks=[lambda body, message: got.append(
                            (message.delivery_info["kombu_pg"]["queue"], body))]):
        durable(consumer_conn.default_channel).declare()
        drain(consumer_conn, lambda: False, 1)  # listening now
        assert listening(env) == {"broadcasts.gossip", "broadcasts.other"}
        with kombu_conn() as producer_conn:
            producer = producer_conn.Producer()
            for n in range(3):
                producer.publish({"n": n}, exchange=exchange, routing_key="worker.heartbeat", serializer="json")
            producer.publish({"n": "task"}, exchange=exchange, routing_key="task.sent", serializer="json")
            big = "x" * 9000
            producer.publish({"big": big}, exchange=exchange, routing_key="worker.big", serializer="json")
        # Before the consumer took anything: the durable queue holds its three heartbeats and
        # the big one as rows; the broadcast queues only the big one.
        stored = sorted(m["queue"] for m in env.messages())
        assert stored == ["broadcasts.durable"] * 4 + ["broadcasts.gossip"], stored
        drain(consumer_conn, lambda: len(got) == 5, 20)
        # During a rolling upgrade, publishers of an earlier version still write rows, without
        # a wake-up: the consumer's safety-net poll finds them, and it claims the queue on its
        # timer while rows come.
        env.db.query(sql.SQL("INSERT INTO {} (queue, payload) SELECT 'broadcasts.gossip', payload FROM {}"
                             " WHERE queue = 'broadcasts.durable' ORDER BY id LIMIT 3").format(
                                 env.t("messages"), env.t("messages")))
        drain(consumer_conn, lambda: len(got) == 8, 45)
        # Any role that may connect can NOTIFY: what is not a message is dropped, the consumer goes
        # on, and nothing is written to the dead letters.
        channel = broadcast_channel(env.broker_schema, "broadcasts")
        for forged in ["garbage", '0\n5\n{}', '0\n"worker.x"\n{"not": "a kombu message"}']:
            env.db.query("SELECT pg_notify(%s, %s)", (channel, forged))
        with kombu_conn() as producer_conn:
            producer_conn.Producer().publish({"n": "after"}, exchange=exchange, routing_key="worker.heartbeat",
                                             serializer="json")
        drain(consumer_conn, lambda: len(got) == 9, 20)
        assert dead_letters(env) == []
    def of(queue):  # in the order each queue received them
        return [body for name, body in got if name == queue]

    assert of("broadcasts.gossip") == [{"n": 0}, {"n": 1}, {"n": 2}, {"big": big}, {"n": 0}, {"n": 1}, {"n": 2},
                                       {"n": "after"}]
    assert of("broadcasts.other") == [{"n": "task"}]


@pytest.mark.parametrize("options", [{"listen": False}, {"broadcasts": False}])
def test_without_broadcasts_a_short_lived_broadcast_queue_is_claimed_on_a_timer(env, kombu_conn, options):
    """Behind a transaction pooler without direct_url consumers cannot LISTEN; broadcasts=False
    keeps messages out of notifications (any role may LISTEN). Either way the queue keeps rows,
    claimed every half of its TTL (no wake-up, which would wake every LISTEN session). A
    longer-lived queue on the same exchange gets its wake-up."""
    import kombu

    exchange = kombu.Exchange("broadcasts", type="topic", durable=False)
    polled = kombu.Queue("broadcasts.polled", exchange, routing_key="worker.#", **TRANSIENT)
    woken = kombu.Queue("broadcasts.woken", exchange, routing_key="worker.#", auto_delete=True,
                        durable=False, message_ttl=60)
    got = []
    consumer_conn = kombu_conn(**options)
    with psycopg.connect(env.url, autocommit=True) as listener, \
            kombu.Consumer(consumer_conn, [polled, woken], accept=["json"], no_ack=True,
                           callbacks=[lambda body, message: got.append(
                               (message.delivery_info["kombu_pg"]["queue"], body))]):
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"kombu_pg.{env.broker_schema}")))
        with kombu_conn() as producer_conn:
            producer_conn.Producer().publish({"n": 1}, exchange=exchange, routing_key="worker.heartbeat",
                                             serializer="json", retry=True)
        drain(consumer_conn, lambda: len(got) == 2, 20)
        listener.execute("SELECT 1")  # collects the notifications sent meanwhile
        woken_up = {note.payload.partition(" ")[2] for note in listener.notifies(timeout=0.5)}
    assert listening(env) == set()
    assert sorted(got) == [("broadcasts.polled", {"n": 1}), ("broadcasts.woken", {"n": 1})]
    assert "broadcasts.woken" in woken_up and "broadcasts.polled" not in woken_up, woken_up


def listening(env) -> set[str]:
    return {row[0] for row in env.db.query(sql.SQL("SELECT name FROM {} WHERE via_notify").format(env.t("queues")))}


def drain(conn, done, seconds: float) -> None:
    def step():
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            pass
        return done()

    if seconds <= 1:
        step()
    else:
        wait_for(step, seconds, interval=0, what="the messages")
