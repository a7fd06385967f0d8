"""Idle workers are nearly free for the server, and a DBA can tell their connections apart.

With LISTEN working, an idle consumer's safety-net poll backs off to max_polling_interval (one
statement for all its queues, which also keeps them alive and elects the housekeeper); the
cluster-wide housekeeping runs in one elected process; Celery's heartbeat events go out every
10 s and reach the other workers' gossip queues as notifications, not rows (with gossip off,
they are not sent to the server again and again while no queue takes them). What stays
bounded: a message whose worker died is handed to an idle worker soon after its lease expired
(the housekeeper returns it and wakes the queue), and housekeeping goes on when the process
running it is killed. Measured on a PostgreSQL server the test starts itself.
"""
from __future__ import annotations

import re
import statistics
import time

import psycopg
import pytest
from psycopg import sql

from kombu_pg import config

from conftest import console_script, dead_letters, wait_for

IDLE_WORKERS = 5
SETTLE_SECONDS = 40  # the poll backs off 1, 2, 4, 8, 16 s, then stays at 30 s
WINDOW_SECONDS = 60
BASELINE_SECONDS = 30
#: The target: server transactions per second per idle worker, LISTEN working.
MAX_IDLE_XACTS_PER_WORKER = 0.2


def server_xacts(conn: psycopg.Connection) -> int:
    """Transactions the server committed or rolled back in this database so far (each call is
    one more, the same number in every window measured)."""
    return conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                        " WHERE datname = current_database()").fetchone()[0]


def rate(conn, server, seconds: float) -> tuple[float, float]:
    """Server transactions per second and CPU share of a core over ``seconds``."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    xacts, cpu, started = server_xacts(conn), server.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    time.sleep(1.5)  # the sessions report their statistics when idle, at most once a second
    elapsed = time.monotonic() - started - 1.5
    return (server_xacts(conn) - xacts) / elapsed, (server.cpu_seconds() - cpu) / elapsed


def app_on(make_app, server, **transport_options):
    return make_app(broker_url=server.url, transport_options=transport_options)


def broker(server, env) -> psycopg.Connection:
    return psycopg.connect(server.url, autocommit=True, application_name="kp_test_harness")


@pytest.mark.slow
def test_idle_workers_cost_the_server_almost_nothing(make_app, private_server, procs, env):
    server = private_server()
    app = app_on(make_app, server)
    with broker(server, env) as conn:
        baseline, baseline_cpu = rate(conn, server, BASELINE_SECONDS)
        workers = [procs.worker(app, name=f"idle{i}", pool="prefork", concurrency=1, wait=False)
                   for i in range(IDLE_WORKERS)]
        for worker in workers:
            worker.wait_ready(120)
        # LISTEN works for every worker (else it would poll every polling_interval).
        listening = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE"
                                 " 'kombu-pg listen idle%%' AND query LIKE 'LISTEN %%'").fetchone()[0]
        assert listening == IDLE_WORKERS, listening
        time.sleep(SETTLE_SECONDS)
        busy, busy_cpu = rate(conn, server, WINDOW_SECONDS)
    per_worker = (busy - baseline) / IDLE_WORKERS
    print(f"\nserver transactions/s: {baseline:.3f} without workers, {busy:.3f} with {IDLE_WORKERS} idle "
          f"workers: {per_worker:.3f} per worker; server CPU: {baseline_cpu:.2%} of a core without, "
          f"{busy_cpu:.2%} with")
    assert per_worker <= MAX_IDLE_XACTS_PER_WORKER, f"{per_worker:.3f} transactions/s per idle worker"
    # They were idle, not gone: each one still takes work.
    results = [app.add.delay(i, i) for i in range(IDLE_WORKERS * 2)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(IDLE_WORKERS * 2)]


def housekeeper(env) -> str | None:
    if not env.db.table_exists(env.broker_schema, "housekeeper"):
        return None
    return env.db.scalar(sql.SQL("SELECT holder FROM {} WHERE leader_until > now()").format(env.t("housekeeper")))


def runs_the_housekeeping(env, worker) -> bool:
    return (housekeeper(env) or "").startswith(f"{worker.hostname}[{worker.pid}] ")


#: Lease expiry to delivery while the housekeeper runs: its next round (sweep_interval), the
#: event loop's tick (1 s), then the claim and the hand-over to the task.
LEASE_TO_DELIVERY = 0.5 + 1.0 + 1.0
VISIBILITY = 2.0


@pytest.mark.slow
def test_message_of_a_killed_worker_reaches_an_idle_worker_soon_after_its_lease_expired(make_app, procs, env):
    # Idle consumers poll at most every 60 s here: only the housekeeper's wake-up can explain a
    # delivery within seconds.
    app = make_app(visibility_timeout=VISIBILITY,
                   transport_options={"sweep_interval": 0.5, "max_polling_interval": 60})
    keeper = procs.worker(app, name="keeper", pool="solo", concurrency=1, extra_args=("-Q", "elsewhere"))
    wait_for(lambda: runs_the_housekeeping(env, keeper), 30, what="the first worker to run the housekeeping")
    # Three tries at once, each on a queue of its own: a victim and an idle worker per queue.
    tries = range(3)

    def workers(role: str) -> list:
        started = [procs.worker(app, name=f"{role}{i}", pool="solo", concurrency=1,
                                extra_args=("-Q", f"victim{i}"), wait=False) for i in tries]
        return [worker.wait_ready() for worker in started]

    victims = workers("victim")
    for i in tries:  # sleeps on its first delivery only
        app.slow_first_time.apply_async((f"lost{i}", 300), queue=f"victim{i}")
    for i in tries:
        env.wait_runs(1, f"lost{i}")
    idles = workers("idle")
    # Their safety-net polls come about 1, 3, 7, 15 and 31 s after they started: kill the
    # victims now, and the leases run out well before the next one.
    time.sleep(17)
    killed_at = []
    for victim in victims:
        victim.kill9()
        killed_at.append(env.db.scalar("SELECT clock_timestamp()"))
        time.sleep(1.3)  # the next kill at another point of the housekeeper's rounds
    delays = []
    for i in tries:
        first, second = env.wait_runs(2, f"lost{i}", timeout=60)
        assert second["hostname"] == idles[i].hostname and second["redelivered"], second
        delays.append((second["started_at"] - killed_at[i]).total_seconds())
    print(f"\nkill to redelivery to an idle worker: {', '.join(f'{d:.2f}' for d in delays)} s")
    # The lease ends at most VISIBILITY after the kill (it was renewed every third of it).
    assert statistics.median(delays) <= VISIBILITY + LEASE_TO_DELIVERY, delays
    assert runs_the_housekeeping(env, keeper)


STUCK_TASK = '''
@app.task(bind=True, max_attempts=1)
def stuck(self):
    record(self, "stuck")
    time.sleep(600)
'''


@pytest.mark.slow
def test_housekeeping_goes_on_after_the_housekeeper_is_killed(make_app, procs, env):
    app = make_app(visibility_timeout=2, extra_source=STUCK_TASK, conf={"control_queue_expires": 2.0},
                   transport_options={"sweep_interval": 0.5, "max_polling_interval": 5})
    # Threads: the stuck task must not block the first worker's event loop, whose polls keep
    # its housekeeper lease (3 s) while the second worker starts.
    first = procs.worker(app, name="first", pool="threads", concurrency=1)
    wait_for(lambda: runs_the_housekeeping(env, first), 30, what="the first worker to run the housekeeping")
    app.stuck.delay()  # its only delivery: once its lease expires, only a reaper may move it
    env.wait_runs(1, "stuck")
    second = procs.worker(app, name="second", pool="solo", concurrency=1)
    assert runs_the_housekeeping(env, first)
    first.kill9()
    # The lease of the housekeeper (3 s here) runs out, and the second worker's next poll
    # (every 5 s at most here) takes it over.
    wait_for(lambda: runs_the_housekeeping(env, second), 30,
             what=lambda: f"the second worker to take over the housekeeping (holder: {housekeeper(env)})")
    # Its rounds reap: the expired lease at its delivery cap goes to the dead letters...
    [letter] = wait_for(lambda: dead_letters(env), 30, what="the killed worker's task in the dead letters", interval=0.2)
    assert letter["reason"] == "lease_expired" and letter["task_name"] == app.task_name("stuck")
    # ... and sweep: the killed worker's remote-control queue expires (x-expires 2 s, after the
    # keep-alive its last poll gave it: twice max_polling_interval).
    pidbox = f"{first.hostname}.celery.pidbox"
    wait_for(lambda: pidbox not in env.queue_names(), 40, what=f"{pidbox} to expire")
    assert f"{second.hostname}.celery.pidbox" in env.queue_names()
    assert "now runs the housekeeping" in second.log()


@pytest.mark.slow
def test_an_events_receiver_gets_the_heartbeats_of_idle_workers(make_app, procs, env):
    # Without gossip and while nobody receives events, the worker does not send its heartbeats
    # to the server (they would match no queue); a receiver that binds its queue gets the next.
    app = make_app(transport_options={"max_polling_interval": 60})
    worker = procs.worker(app, name="w1", pool="solo", concurrency=1,
                          extra_args=("--without-gossip", "--heartbeat-interval", "2"))
    time.sleep(5)  # a couple of heartbeats that matched no queue
    got = []

    def on_heartbeat(event):
        got.append(event)
        receiver.should_stop = True

    with app.app.connection_for_read() as conn:
        receiver = app.app.events.Receiver(conn, handlers={"worker-heartbeat": on_heartbeat})
        try:
            receiver.capture(limit=None, timeout=15, wakeup=False)
        except TimeoutError:
            pass
    assert got and got[0]["hostname"] == worker.hostname, got


PASSWORD = "s3cret-pw"


def application_names(server) -> list[str]:
    with psycopg.connect(server.url, autocommit=True, application_name="kp_test_harness") as conn:
        return [row[0] for row in conn.execute("SELECT application_name FROM pg_stat_activity"
                                               " WHERE backend_type = 'client backend'")]


@pytest.mark.slow
def test_connections_say_whose_they_are_and_what_for(make_app, private_server, procs, env):
    server = private_server(log_connections="on")
    url = server.url.replace("postgres@", f"postgres:{PASSWORD}@")  # trusted: the password is only carried
    app = make_app(broker_url=url, visibility_timeout=3)
    worker = procs.worker(app, name="named", pool="prefork", concurrency=1)
    main = f"named@kptest[{worker.pid}]"
    app.spawn.delay("in-child").get(timeout=30)  # a task that publishes: the child's own pool
    [run] = env.wait_runs(1, "in-child")
    running = app.sleepy.delay("held", 4)  # held: the lease keeper renews it every second
    wait_for(lambda: f"kombu-pg lease {main}" in application_names(server), 20,
             what=lambda: f"the lease keeper's connection (have {application_names(server)})")
    names = application_names(server)
    for expected in (f"kombu-pg pool {main}", f"kombu-pg listen {main}",
                     f"kombu-pg pool named@kptest child[{run['pid']}]"):
        assert expected in names, (expected, names)
    running.get(timeout=30)
    stats = procs.run([console_script("kombu-pg"), "--url", url, "--schema", env.broker_schema, "stats"])
    assert stats.returncode == 0, stats.stderr
    # Short-lived ones too, as the server logs them.
    log = server.logfile.read_text()
    assert f"application_name=kombu-pg migrate {main}" in log
    assert re.search(r"application_name=kombu-pg cli \S+\[\d+\]", log), log[-3000:]
    assert PASSWORD not in log and not any(PASSWORD in name for name in names)
    # The URL's own application_name wins.
    named = make_app(broker_url=f"{url}?application_name=billing-workers")
    procs.worker(named, name="billing", pool="solo", concurrency=1)
    names = application_names(server)
    assert names.count("billing-workers") >= 2, names  # its pool and LISTEN connections
    assert not any("billing@" in name for name in names), names


def test_a_process_that_stops_consuming_gives_the_housekeeping_up(env, kombu_conn):
    # E.g. `celery inspect` or an events receiver in a web process: while it consumes it may be
    # elected; once it stops, the next consumer to poll takes over rather than waiting for
    # the lease to run out.
    queue = kombu_conn().SimpleQueue("brief")
    with pytest.raises(queue.Empty):
        queue.get(timeout=1.5)  # consumes: its first poll finds the housekeeping vacant
    # This process's name: its host name, or the node name of a Celery worker it ran in-process.
    assert (housekeeper(env) or "").startswith(f"{config.client_name()} ")
    queue.close()  # cancels its consumer
    assert housekeeper(env) is None


@pytest.mark.slow
def test_delayed_messages_published_while_nobody_listened_run_on_time(make_app, procs, env):
    # Their wake-ups (with the delay) went out before any worker listened; a worker's polls,
    # 60 s apart once idle, report when the earliest one is due, and it sets a timer for it.
    # Three tries at once: a worker of its own for each queue.
    app = make_app(transport_options={"max_polling_interval": 60})
    countdown, queues = 25, ["eta0", "eta1", "eta2"]
    published = {}
    for queue in queues:
        app.mark.apply_async((queue,), countdown=countdown, queue=queue)
        published[queue] = env.db.scalar("SELECT clock_timestamp()")
    workers = [procs.worker(app, name=queue, pool="solo", concurrency=1, extra_args=("-Q", queue), wait=False)
               for queue in queues]
    for worker in workers:
        worker.wait_ready()
    late = []
    for queue in queues:
        [run] = env.wait_runs(1, queue, timeout=60)
        late.append((run["started_at"] - published[queue]).total_seconds() - countdown)
    print(f"\nlateness of delayed messages: {', '.join(f'{s:.2f}' for s in late)} s")
    # At their ETA, within the event loop's tick (1 s) and the hand-over; the polls about 15
    # and 31 s after a worker started would find them several seconds late.
    assert statistics.median(late) <= 2.0, late


@pytest.mark.slow
def test_without_listen_an_idle_worker_keeps_polling_every_polling_interval(make_app, procs, env):
    # Poll-only mode (e.g. behind a pooler in transaction mode): no wake-up ever comes, so the
    # poll must not back off, however long the worker has been idle.
    # Three tries at once: a worker of its own for each queue, each idle since it started.
    app = make_app(transport_options={"listen": False, "max_polling_interval": 60})
    queues = ["polled0", "polled1", "polled2"]
    workers = [procs.worker(app, name=queue, pool="solo", concurrency=1, extra_args=("-Q", queue), wait=False)
               for queue in queues]
    for worker in workers:
        worker.wait_ready()
    time.sleep(16)  # backing off, the polls would now come 16 s apart
    sent = {}
    for queue in queues:
        sent[queue] = env.db.scalar("SELECT clock_timestamp()")
        app.mark.apply_async((queue,), queue=queue)
    waits = []
    for queue in queues:
        [run] = env.wait_runs(1, queue, timeout=90)
        waits.append((run["started_at"] - sent[queue]).total_seconds())
    print(f"\npublish to start without LISTEN: {', '.join(f'{w:.2f}' for w in waits)} s")
    # polling_interval (1 s), plus the claim and the hand-over.
    assert statistics.median(waits) <= 2.0, waits
