"""The vacuum service: the consuming process vacuums the messages table once dead rows pile up."""
import time

from psycopg import sql

from conftest import wait_for


def vacuums(env) -> int:
    """Manual (non-auto) vacuums of the test's messages table."""
    return env.db.scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE schemaname = %s"
                         " AND relname = 'messages'", (env.broker_schema,)) or 0


def test_a_consumer_vacuums_the_messages_table_after_steady_traffic(env, kombu_conn):
    conn = kombu_conn(vacuum_interval=0.2, sweep_interval=0.2)
    queue = conn.SimpleQueue("vacuumed")
    for i in range(5000):
        queue.put({"i": i})
    assert vacuums(env) == 0
    for _ in range(5000):
        queue.get(timeout=10).ack()

    def vacuumed():
        try:  # keep consuming (nothing comes): housekeeping runs in the consumer's loop
            queue.get(timeout=0.2)
        except queue.Empty:
            pass
        return vacuums(env)

    assert wait_for(vacuumed, 30, interval=0.1, what="a vacuum of the messages table") >= 1
    dead = env.db.scalar(sql.SQL("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::regclass"),
                         (f'"{env.broker_schema}".messages',))
    assert dead < 5000, dead
    queue.close()


def test_no_vacuum_when_it_is_turned_off(env, kombu_conn):
    conn = kombu_conn(vacuum_interval=0, sweep_interval=0.2)
    queue = conn.SimpleQueue("not_vacuumed")
    for i in range(3000):
        queue.put({"i": i})
    for _ in range(3000):
        queue.get(timeout=10).ack()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            queue.get(timeout=0.2)
        except queue.Empty:
            pass
    assert vacuums(env) == 0  # vacuum_count does not count autovacuum's passes
    queue.close()
