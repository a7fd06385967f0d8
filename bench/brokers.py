"""The brokers under test, and one isolated, cleaned-up environment per benchmark run.

Every run gets its own namespace, removed afterwards: a PostgreSQL schema (kombu-pg), a
database (Kombu's SQLAlchemy transport, which always uses the tables kombu_queue/kombu_message),
queue and exchange names carrying a random tag (RabbitMQ), a dedicated Redis database number
(checked empty before the first run, flushed after each run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

DEFAULT_URLS = [
    "postgresql://postgres@127.0.0.1:5432/test",
    # Not db 9: other projects on this machine use it. The harness refuses a non-empty db.
    "redis://127.0.0.1:6379/13",
    "amqp://guest:guest@127.0.0.1:5672//",
    "sqla+postgresql+psycopg://postgres@127.0.0.1:5432/test",
]

REFERENCE = "kombu-pg"  # ratios are given relative to this broker


def pg_connect(url: str, wait: float = 60) -> psycopg.Connection:
    """An autocommit connection; waits while the server is full (other test suites share it),
    so that a run's schema or database is still dropped when connections are scarce."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def kind_of(url: str) -> str:
    scheme = url.partition("://")[0].lower()
    if scheme in ("postgresql", "postgres", "pg"):
        return "kombu-pg"
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "rabbitmq"
    if scheme.startswith(("sqla+", "sqlalchemy+")):
        return "sqla"
    raise ValueError(f"unsupported broker URL scheme {scheme!r} in {url!r}")


def libpq_url(url: str) -> str:
    """postgresql:// URL of a kombu-pg or SQLAlchemy URL (drops sqla+ and +driver)."""
    scheme, _, rest = url.partition("://")
    if kind_of(url) == "sqla":
        scheme = scheme.split("+")[1]
    return f"{scheme}://{rest}"


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What a child process needs to connect: picklable, no open resources."""
    kind: str
    url: str
    transport_options: dict

    def connection(self):
        from kombu import Connection
        return Connection(self.url, transport_options=dict(self.transport_options))


@dataclasses.dataclass
class Broker:
    name: str
    url: str

    @property
    def kind(self) -> str:
        return kind_of(self.url)

    @contextlib.contextmanager
    def session(self):
        """An isolated environment for one run, removed on exit whatever happened."""
        env = ENVS[self.kind](self)
        try:
            env.setup()
            yield env
        finally:
            env.teardown()


class Env:
    """One run's namespace on a broker. Scenarios name queues with :meth:`queue`."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.kind = broker.kind
        self.tag = uuid.uuid4().hex[:10]
        self.queues: list[str] = []
        self.endpoint = Endpoint(self.kind, broker.url, {})

    def queue(self, suffix: str) -> str:
        name = f"bench_{self.tag}_{suffix}"
        self.queues.append(name)
        return name

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def state(self, queue: str) -> dict:
        """What the broker holds for ``queue`` (messages waiting, and bytes where known)."""
        return {}

    def unsettled(self, queue: str) -> int:
        """Messages of ``queue`` still stored, neither acked nor consumed: 0 once all were acked."""
        raise NotImplementedError

    def check_settled(self, queue: str, expected: int = 0) -> None:
        """A consumer that acked and closed must leave only the messages it did not take."""
        left = self.unsettled(queue)
        if left != expected:
            raise RuntimeError(f"{left} message(s) left in {queue} after the consumer acked and closed, "
                               f"expected {expected}")


class PgEnv(Env):
    """kombu-pg: a schema ``bench_<tag>``, migrated before the run so timings exclude it."""

    def setup(self):
        from kombu_pg import migrate

        self.schema = f"bench_{self.tag}"
        self.endpoint = Endpoint(self.kind, self.broker.url, {"schema": self.schema})
        with self.sql() as conn:
            migrate.migrate(conn, self.schema)

    def teardown(self):
        with self.sql() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))

    def sql(self) -> psycopg.Connection:
        return pg_connect(self.broker.url)

    def table(self, name: str = "messages") -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(name))

    def state(self, queue):
        with self.sql() as conn:
            rows, delayed, leased = conn.execute(sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE visible_at > now() AND lease_token IS NULL),"
                " count(*) FILTER (WHERE lease_token IS NOT NULL AND coalesce(leased_until, visible_at) > now())"
                " FROM {} WHERE queue = %s"
            ).format(self.table()), (queue,)).fetchone()
            size = conn.execute("SELECT pg_total_relation_size(%s)",
                                (self.table().as_string(conn),)).fetchone()[0]
        return {"rows": rows, "delayed": delayed, "leased": leased, "table_bytes": size}

    def unsettled(self, queue):
        state = self.state(queue)
        return state["rows"] - state["delayed"]  # ready or leased: delayed ones are not due


class SqlaEnv(Env):
    """Kombu's SQLAlchemy transport: a database of its own per run (dropped WITH (FORCE))."""

    def setup(self):
        self.admin_url = libpq_url(self.broker.url)
        self.database = f"bench_sqla_{self.tag}"
        with pg_connect(self.admin_url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        self.endpoint = Endpoint(self.kind, with_database(self.broker.url, self.database), {})

    def teardown(self):
        with pg_connect(self.admin_url) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.database)))

    def sql(self) -> psycopg.Connection:
        return pg_connect(with_database(self.admin_url, self.database))

    def state(self, queue):
        with self.sql() as conn:
            rows, ready = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE m.visible) FROM kombu_message m"
                " JOIN kombu_queue q ON q.id = m.queue_id WHERE q.name = %s", (queue,)).fetchone()
            size = conn.execute("SELECT pg_total_relation_size('kombu_message')").fetchone()[0]
        # Delivered messages stay in the table with visible = false (the transport never
        # deletes them): rows - ready of them are held by a consumer or already acked.
        return {"rows": rows, "ready": ready, "table_bytes": size}

    def unsettled(self, queue):
        return self.state(queue)["ready"]  # consumed rows stay, invisible: nothing to tell from them


class RedisEnv(Env):
    """Redis: the URL's database number, which must be empty when the benchmark starts."""

    def client(self):
        import redis
        return redis.Redis.from_url(self.broker.url)

    def setup(self):
        with contextlib.closing(self.client()) as r:
            self.memory_before = r.info("memory")["used_memory"]

    def teardown(self):
        with contextlib.closing(self.client()) as r:
            r.flushdb()

    def state(self, queue):
        with contextlib.closing(self.client()) as r:
            return {"ready": r.llen(queue), "unacked": r.hlen("unacked"),
                    "memory_growth_bytes": r.info("memory")["used_memory"] - self.memory_before}

    def unsettled(self, queue):
        state = self.state(queue)
        return state["ready"] + state["unacked"]


class AmqpEnv(Env):
    """RabbitMQ: tagged queue and exchange names, deleted afterwards."""

    def teardown(self):
        with self.endpoint.connection() as conn:
            channel = conn.default_channel
            for name in self.queues:
                channel.queue_delete(name)
                channel.exchange_delete(name)

    def state(self, queue):
        with self.endpoint.connection() as conn:
            _, ready, consumers = conn.default_channel.queue_declare(queue=queue, passive=True)
        return {"ready": ready, "consumers": consumers}

    def unsettled(self, queue):
        return self.state(queue)["ready"]  # unacked ones went back to ready when the consumer closed


ENVS = {"kombu-pg": PgEnv, "sqla": SqlaEnv, "redis": RedisEnv, "rabbitmq": AmqpEnv}


def preflight(broker: Broker) -> dict:
    """Reachability, versions and durability settings of a broker; raises if unusable."""
    kind = broker.kind
    if kind in ("kombu-pg", "sqla"):
        with pg_connect(libpq_url(broker.url)) as conn:
            show = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in
                    ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                     "wal_sync_method", "shared_buffers")}
        return {"postgresql": show}
    if kind == "redis":
        import redis
        with contextlib.closing(redis.Redis.from_url(broker.url, socket_timeout=5)) as r:
            if r.dbsize():
                raise RuntimeError(f"redis database of {broker.url} is not empty: choose an unused "
                                   "database number (the harness flushes it after every run)")
            config = {k: v for key in ("appendonly", "appendfsync", "save")
                      for k, v in r.config_get(key).items()}
            return {"redis_version": r.info("server")["redis_version"], **config}
    with Endpoint(kind, broker.url, {}).connection() as conn:
        conn.ensure_connection(max_retries=1)
        props = conn.connection.server_properties
    return {"rabbitmq_version": props.get("version")}
