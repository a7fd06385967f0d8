"""A Celery app that uses PostgreSQL as its broker, and as its result backend too.

Run it against your own database:

    pip install 'kombu-pg[results]'          # SQLAlchemy, for the result backend below
    export KOMBU_PG_URL=postgresql://user:pass@localhost:5432/mydb
    celery -A app worker --loglevel INFO     # from this directory
    celery -A app beat                       # optional: the periodic `tick` task

The only broker-specific line is `broker_url`: kombu-pg registers the postgresql://,
postgres:// and pg:// schemes with Kombu when it is installed, so no import is needed.
"""
import os
import time

from celery import Celery, chord

BROKER_URL = os.environ.get("KOMBU_PG_URL", "postgresql://postgres@localhost:5432/postgres")


def result_backend_url(broker_url: str) -> str:
    """The same database as a SQLAlchemy URL, for Celery's database result backend.

    `db+` selects that backend; `postgresql+psycopg` makes SQLAlchemy use psycopg 3,
    which kombu-pg already depends on.
    """
    _scheme, rest = broker_url.split("://", 1)
    return f"db+postgresql+psycopg://{rest}"


app = Celery("app", broker=BROKER_URL, backend=result_backend_url(BROKER_URL))
app.conf.update(
    # Optional; these are the defaults. See "Transport options" in the README.
    broker_transport_options={"visibility_timeout": 30, "polling_interval": 1.0},
    # Store task names with results, so finished runs can be found by task name.
    result_extended=True,
    broker_connection_retry_on_startup=True,
    beat_schedule={
        "tick-every-second": {"task": "app.tick", "schedule": 1.0},
    },
)


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(numbers):
    return sum(numbers)


@app.task
def square(x):
    return x * x


@app.task(bind=True)
def sum_of_squares(self, n):
    """Fan out: replace this task with a chord of `n` squares summed by `tsum`.

    The caller's result for this task becomes the chord's result.
    """
    return self.replace(chord((square.s(i) for i in range(n)), tsum.s()))


@app.task
def slow(seconds):
    time.sleep(seconds)
    return f"slept {seconds}s"


@app.task
def tick():
    """Sent every second by `celery beat` (see beat_schedule)."""
    return time.time()
