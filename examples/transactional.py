"""Transactional enqueue: a task is published if and only if the transaction that creates its
data commits.

    export KOMBU_PG_URL=postgresql://user:pass@localhost:5432/mydb
    python examples/transactional.py

It creates an `orders` table, places one order in a transaction that rolls back and one in a
transaction that commits, each publishing `send_receipt` inside the transaction, then shows
what reached the queue. No worker is needed: it reads the queue with `kombu-pg stats`' API.
"""
import os

import psycopg
from celery import Celery

import kombu_pg
from kombu_pg.admin import Admin

URL = os.environ.get("KOMBU_PG_URL", "postgresql://postgres@localhost:5432/postgres")
SCHEMA = "kombu_pg_example"

app = Celery("transactional", broker=URL)
app.conf.broker_transport_options = {"schema": SCHEMA}


@app.task
def send_receipt(order_id):
    print(f"receipt for order {order_id}")


def place_order(conn: psycopg.Connection, item: str, fail: bool) -> None:
    try:
        with conn.transaction(), kombu_pg.enqueue_in(conn):
            order_id = conn.execute("INSERT INTO orders (item) VALUES (%s) RETURNING id", (item,)).fetchone()[0]
            send_receipt.delay(order_id)  # inserted through `conn`, in this transaction
            if fail:
                raise RuntimeError("payment declined")
    except RuntimeError as exc:
        print(f"order for {item!r} rolled back ({exc}): its task was never published")
    else:
        print(f"order {order_id} for {item!r} committed: its task is in the queue")


def main() -> None:
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, item text NOT NULL)")
        with app.connection_for_write() as broker:
            broker.default_channel.queue_purge("celery")  # a clean start for the demonstration
        place_order(conn, "teapot", fail=True)
        place_order(conn, "kettle", fail=False)
    ready = {q["queue"]: q["ready"] for q in Admin(URL, SCHEMA).stats()["queues"]}
    print(f"messages ready in queue 'celery': {ready.get('celery', 0)}")  # 1: the committed one


if __name__ == "__main__":
    main()
