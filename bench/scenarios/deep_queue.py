"""deep_queue: claim+ack throughput of one consumer with 1k, 100k and 1M messages waiting, and
with 100k not-ready rows beside 1k ready ones (kombu-pg: delayed ETA messages).

The consumer takes `consume` messages from a queue filled with depth + `consume`, so that at
least `depth` messages wait throughout. The rate is timed from its first delivery: declaring the
queue at consumer start returns AMQP's message count, a one-off count(*) that grows with the
depth (0.2 s at 1M here) and is not the cost per message.

The backlog is made in SQL, not by publishing (1M publishes would take minutes): one real
message is published through the transport, and its row is cloned with INSERT ... SELECT
generate_series, so rows look exactly like published ones. The table is then VACUUM ANALYZEd
(and a CHECKPOINT taken),
as a long-standing backlog would be. Each case starts from an empty table.

For Kombu's SQLAlchemy transport, which has no delayed delivery, the not-ready rows are rows
with visible = false: what it leaves behind for every message it delivered (it never deletes them).
"""
from __future__ import annotations

import json

from psycopg import sql

from .. import messaging, procs

NAME = "deep_queue"
KINDS = {"kombu-pg", "sqla"}
PARAMS = {"quick": {"depths": [1000, 20000], "not_ready": 20000, "consume": 1000, "prefetch": 100},
          "full": {"depths": [1000, 100000, 1000000], "not_ready": 100000, "consume": 5000,
                   "prefetch": 100}}


def label(n: int) -> str:
    return f"{n // 1000000}M" if n % 1000000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def run(env, p) -> dict:
    depths = sorted(p["depths"])
    # `consume` messages on top of the depth: at least `depth` wait throughout the measurement.
    n = p["consume"]
    cases = [(f"ready_{label(d)}", d + n, 0) for d in depths]
    cases.append((f"not_ready_{label(p['not_ready'])}", depths[0] + n, p["not_ready"]))
    metrics = {}
    for name, ready, not_ready in cases:
        queue = env.queue(name)
        FILL[env.kind](env, queue, ready, not_ready)
        result = procs.call(messaging.consume, env.endpoint, queue, n, prefetch=p["prefetch"],
                            within=120, timeout=150)
        env.check_settled(queue, expected=ready - n)
        # From the first delivery: declaring the queue counts its messages (AMQP's message_count),
        # a one-off at consumer start that grows with depth and is not the per-message cost.
        metrics[f"{name}.msgs_per_s"] = (n - 1) / (result["end"] - result["first"])
    shallow, deep = (metrics[f"ready_{label(d)}.msgs_per_s"] for d in (depths[0], depths[-1]))
    metrics[f"ratio_{label(depths[-1])}_to_{label(depths[0])}"] = deep / shallow
    return metrics


def fill_pg(env, queue, ready, not_ready):
    table = env.table()
    with env.sql() as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(table))
    procs.call(messaging.publish, env.endpoint, queue, 1, timeout=60)  # the template row
    clone = sql.SQL(
        "INSERT INTO {t} (queue, priority, visible_at, expires_at, payload, task_id, task_name, max_attempts)"
        " SELECT queue, priority, now() + %(delay)s * interval '1 second', expires_at, payload,"
        "        task_id, task_name, max_attempts"
        " FROM {t}, generate_series(1, %(n)s) WHERE id = %(id)s").format(t=table)
    with env.sql() as conn:
        template = conn.execute(sql.SQL("SELECT id FROM {} WHERE queue = %s").format(table),
                                (queue,)).fetchone()[0]
        conn.execute(clone, {"delay": 3600, "n": not_ready, "id": template})
        conn.execute(clone, {"delay": 0, "n": ready - 1, "id": template})
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        # Flush the bulk fill's WAL now: otherwise the checkpoint it triggers lands in the timed
        # consume and measures the fill, not the queue depth.
        conn.execute("CHECKPOINT")


def fill_sqla(env, queue, ready, not_ready):
    with env.sql() as conn:
        if conn.execute("SELECT to_regclass('kombu_message')").fetchone()[0]:  # none before 1st publish
            conn.execute("TRUNCATE kombu_message")
    procs.call(messaging.publish, env.endpoint, queue, 1, timeout=60)  # creates the tables too
    with env.sql() as conn:
        template, payload = conn.execute(
            "SELECT m.id, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
            " WHERE q.name = %s", (queue,)).fetchone()
        # Kombu's virtual transports key unacked messages by delivery tag: keep them unique.
        tag = json.loads(payload)["properties"]["delivery_tag"]
        clone = ("INSERT INTO kombu_message (id, visible, timestamp, payload, version, queue_id)"
                 " SELECT nextval('message_id_sequence'), %(visible)s, timestamp - %(age)s * interval '1 s',"
                 "        replace(payload, %(tag)s, gen_random_uuid()::text), version, queue_id"
                 " FROM kombu_message, generate_series(1, %(n)s) WHERE id = %(id)s")
        # Delivered rows are older than the waiting ones: they come first in delivery order.
        conn.execute(clone, {"visible": False, "age": 3600, "n": not_ready, "id": template, "tag": tag})
        conn.execute(clone, {"visible": True, "age": 0, "n": ready - 1, "id": template, "tag": tag})
        conn.execute("VACUUM ANALYZE kombu_message")
        conn.execute("CHECKPOINT")


FILL = {"kombu-pg": fill_pg, "sqla": fill_sqla}
