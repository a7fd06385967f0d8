"""Broker URL and transport options: parsing, validation, and password masking."""
from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SCHEMES = ("postgresql", "postgres", "pg")

# Options that Kombu itself (not this transport) reads from transport_options.
KOMBU_OPTIONS = frozenset({
    "body_encoding", "deadletter_queue", "max_retries",
    "interval_start", "interval_step", "interval_max",
})


POLICY_KEYS = ("max_attempts", "backoff_base", "backoff_cap")
POOLERS = ("auto", "transaction", "none")


class ConfigurationError(ValueError):
    """A broken broker URL or transport option. The message never contains a password."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Transport options (Celery's ``broker_transport_options``), with their defaults."""

    #: PostgreSQL schema holding the transport's tables, so several apps can share a database.
    schema: str = "kombu_pg"
    #: Seconds a delivered message stays invisible to other consumers before it is redelivered.
    #: Leases of messages a consumer still holds are renewed every third of this.
    visibility_timeout: float = 30.0
    #: Seconds between safety-net polls (missed notifications, due ETAs, expired leases) right
    #: after activity. Without LISTEN (listen=False) a consumer always polls this often.
    polling_interval: float = 1.0
    #: With LISTEN working, an idle consumer doubles the time between its safety-net polls up
    #: to this many seconds (back to polling_interval on any wake-up). It also keeps its queues
    #: alive (x-expires) and looks for a vacant housekeeper at each poll.
    max_polling_interval: float = 30.0
    #: Apply pending migrations on first connect (under an advisory lock). A current schema is
    #: only read: a role with the privileges of `kombu-pg grants` suffices then.
    auto_migrate: bool = True
    #: Seconds a client that has migrations to apply waits for another session's migration
    #: lock before it fails. Longer than connect_timeout: a migration may take a while.
    migrate_lock_timeout: float = 30.0
    #: Use LISTEN/NOTIFY wake-ups. False polls only (every polling_interval).
    listen: bool = True
    #: A separate URL for the LISTEN connection; by default direct_url, else the broker URL.
    listen_url: str | None = None
    #: Short-lived broadcast queues (Celery's gossip and events receivers) take their messages
    #: as NOTIFY payloads, not rows, while their consumer LISTENs. PostgreSQL has no privileges
    #: on LISTEN and NOTIFY: any role that may connect to the database can read those messages
    #: (task events carry task arguments) or send forged ones. False keeps them as rows, claimed
    #: on a timer: about 1.5 more server transactions/s per idle worker with gossip on.
    broadcasts: bool = True
    #: What the broker URL leads to: "transaction" for a transaction-pooling pooler (PgBouncer
    #: pool_mode=transaction): no prepared statements and no session state, and what needs a
    #: session goes over direct_url. "none" for PostgreSQL itself or a session-pooling pooler.
    #: "auto" detects a pooler on the first connection and then acts as for "transaction".
    pooler: str = "auto"
    #: A URL straight to PostgreSQL, for what needs a session of its own behind a transaction
    #: pooler: LISTEN wake-ups (without it consumers poll) and beat's leader election.
    direct_url: str | None = None
    #: Size limit of each process's connection pool. With 3 or more, a consumer claims its next
    #: batch while delivering the current one (that claim holds a connection meanwhile).
    max_connections: int = 4
    #: Most messages claimed in one statement when the consumer has no prefetch limit.
    claim_batch: int = 100
    #: Seconds an auto-delete queue declared without x-expires survives with no consumer.
    auto_delete_expires: float = 60.0
    #: Seconds between housekeeping rounds (expired queues and messages, expired leases back
    #: to their queues, expired tasks), run by one consumer process elected among all. Another
    #: takes over within 3 times this (at least 3 s) plus max_polling_interval if it stops.
    sweep_interval: float = 5.0
    #: Seconds a Celery task past its ``expires`` may wait for a consumer, which marks it
    #: REVOKED; then the sweeper moves it to the dead letters (reason ``expired``).
    expired_task_grace: float = 60.0
    #: Seconds a durable revoke (app.control.revoke, `kombu-pg revoke`) is kept: a worker that
    #: leases a revoked task within this drops it, as Celery's worker_revoke_expires (3 hours).
    revoke_expires: float = 10800.0
    #: Seconds between vacuums of the messages table by the housekeeping process, when enough
    #: dead rows piled up (autovacuum comes at most once a minute; 0 leaves it to autovacuum
    #: alone). Needs a role that owns the table; others leave it to autovacuum.
    vacuum_interval: float = 10.0
    #: Seconds to wait for a connection (pool checkout and connect).
    connect_timeout: float = 10.0
    #: Seconds a statement may take. The server cancels it after this; a server that stops
    #: answering altogether (frozen, partitioned) has the client close the connection after
    #: this plus 2 seconds, which Celery and Kombu treat as a lost connection and reconnect.
    statement_timeout: float = 30.0
    #: Seconds without an acknowledgement of sent data before the kernel drops the connection
    #: (libpq ``tcp_user_timeout``): a server host that vanished is noticed within this.
    tcp_user_timeout: float = 30.0
    #: Seconds of idle time before TCP keepalive probes start; they are sent every third of
    #: this, and 3 unanswered ones drop the connection (idle LISTEN and lease connections too).
    keepalives_idle: float = 30.0
    #: Claims and lease renewals wait for the WAL flush like publishes and acks do, so a lease
    #: survives a server crash or a failover to a synchronous standby. False makes them about
    #: a disk flush faster per claim, but a crash can then undo a lease whose task is running,
    #: and the message is delivered again while it runs.
    durable_leases: bool = True
    #: Deliveries of a message before it goes to the dead letters: failed attempts (the task
    #: raised, its worker was lost) and expired leases all count.
    max_attempts: int = 5
    #: Seconds before the first retry of a failed message; doubled per attempt, with jitter.
    backoff_base: float = 1.0
    #: Longest retry delay, in seconds.
    backoff_cap: float = 300.0
    #: Per-queue overrides of max_attempts, backoff_base and backoff_cap:
    #: ``{"queue name": {"max_attempts": 10}}``.
    queue_options: dict = dataclasses.field(default_factory=dict)

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in dataclasses.asdict(self).items())))

    def policy(self, queue: str) -> dict:
        """The retry policy of ``queue``: its overrides over the global values."""
        own = self.queue_options.get(queue, {})
        return {key: own.get(key, getattr(self, key)) for key in POLICY_KEYS}

    @classmethod
    def from_transport_options(cls, raw: dict) -> "Options":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in (raw or {}).items():
            if key in KOMBU_OPTIONS:
                continue
            if key not in fields:
                raise ConfigurationError(
                    f"unknown transport option {key!r} for the PostgreSQL transport; "
                    f"known options: {', '.join(sorted(fields))}")
            values[key] = _coerce(key, fields[key].type, value)
        options = cls(**values)
        if not 0 < len(options.schema.encode()) <= 50:
            raise ConfigurationError("transport option 'schema' must be 1 to 50 bytes long")
        if options.visibility_timeout < 1:
            raise ConfigurationError("transport option 'visibility_timeout' must be >= 1 second")
        for key in ("polling_interval", "max_polling_interval", "sweep_interval"):
            if getattr(options, key) <= 0:
                raise ConfigurationError(f"transport option {key!r} must be > 0")
        for key in ("statement_timeout", "tcp_user_timeout", "keepalives_idle", "migrate_lock_timeout"):
            if getattr(options, key) <= 0:
                raise ConfigurationError(f"transport option {key!r} must be > 0 seconds")
        if options.pooler not in POOLERS:
            raise ConfigurationError(
                f"transport option 'pooler' must be one of {', '.join(map(repr, POOLERS))}, "
                f"got {options.pooler!r}")
        if options.max_attempts < 1:
            raise ConfigurationError("transport option 'max_attempts' must be >= 1")
        for queue, overrides in options.queue_options.items():
            unknown = set(overrides) - set(POLICY_KEYS)
            if unknown:
                raise ConfigurationError(
                    f"transport option 'queue_options' for queue {queue!r}: unknown keys "
                    f"{sorted(unknown)}; allowed: {', '.join(POLICY_KEYS)}")
        return options

    @property
    def notify_channel(self) -> str:
        return f"kombu_pg.{self.schema}"

    @property
    def statement_deadline(self) -> float:
        """Seconds after which the client gives up on a statement the server never answered."""
        return self.statement_timeout + 2.0

    def session_params(self) -> dict:
        """Parameters of the ``session_setup`` statement run on every new connection."""
        return {"statement_timeout": f"{round(self.statement_timeout * 1000)}ms"}

    @property
    def idle_polling_interval(self) -> float:
        """The longest time between safety-net polls (never below polling_interval)."""
        return max(self.polling_interval, self.max_polling_interval)

    @property
    def housekeeper_lease(self) -> float:
        """Seconds the elected housekeeper's lease lasts; it renews it at each round."""
        return max(3 * self.sweep_interval, 3.0)

    def connection_kwargs(self, conninfo: str, role: str = "pool") -> dict:
        """libpq parameters bounding every wait on the server, and the connection's name for
        pg_stat_activity (see :func:`application_name`), unless the URL sets them itself; with
        several hosts, the one that takes writes (all our sessions write), so that after a
        failover libpq skips the old primary and the standbys."""
        given = conninfo_to_dict(conninfo)
        wanted = {
            # libpq uses it only when neither the URL's application_name nor PGAPPNAME is set.
            "fallback_application_name": application_name(role),
            "connect_timeout": max(1, round(self.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": max(1, round(self.keepalives_idle)),
            "keepalives_interval": max(1, round(self.keepalives_idle / 3)),
            "keepalives_count": 3,
            "tcp_user_timeout": max(1, round(self.tcp_user_timeout * 1000)),
        }
        if "," in str(given.get("host") or given.get("hostaddr") or ""):
            wanted["target_session_attrs"] = "read-write"
        return {key: value for key, value in wanted.items() if key not in given}


#: Who this process is, in the names of its connections; a Celery worker sets its node name.
_client_label: str | None = None
#: PostgreSQL keeps application_name to NAMEDATALEN - 1 bytes, in printable ASCII.
MAX_APPLICATION_NAME = 63


def set_client_label(label: str) -> None:
    """Name this process in the application_name of the connections it opens from now on."""
    global _client_label
    _client_label = label


def client_label() -> str:
    """This process's name: the host name, unless a Celery worker set its node name."""
    return _client_label or socket.gethostname()


def client_name(room: int = MAX_APPLICATION_NAME) -> str:
    """``<label>[<pid>]`` in at most ``room`` bytes, the label cut to fit, in printable ASCII."""
    tail = f"[{os.getpid()}]"
    label = "".join(c if " " <= c <= "~" else "?" for c in client_label())
    return label[:max(0, room - len(tail))] + tail


def application_name(role: str) -> str:
    """``kombu-pg <role> <label>[<pid>]``, e.g. ``kombu-pg listen w1@host[4242]``: what a
    connection is for and whose it is, for pg_stat_activity and the server's logs."""
    head = f"kombu-pg {role} "
    return head + client_name(MAX_APPLICATION_NAME - len(head))


def _coerce(key, type_name, value):
    kinds = {"str": str, "float": float, "int": int, "bool": bool, "dict": dict,
             "str | None": str}
    kind = kinds[type_name]
    if value is None and type_name.endswith("None"):
        return None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
    elif kind is dict:
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            return {str(k): dict(v) for k, v in value.items()}
    else:
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise ConfigurationError(f"transport option {key!r} must be a {type_name}, got {value!r}")


#: Secrets among libpq parameters: in a URL's query, and in a ``key=value`` conninfo string
#: (whose values may be quoted, with backslash escapes).
_QUERY_SECRET = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)
_KEYWORD_SECRET = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)
_SCHEMELESS_SECRET = re.compile(r"^([^\s/@:=]+:)[^\s/=]*@")


def mask_url(url: str, mask: str = "**") -> str:
    """The URL with its password (in the user info or a ``password=`` parameter) masked, and
    nothing else changed: host lists, an empty host (``postgresql:///db?host=h1,h2``) and the
    parameters stay as written. A libpq ``key=value`` string has its password masked too."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # key=value pairs, or a URL whose scheme was left out (user:password@host)
        url = _SCHEMELESS_SECRET.sub(lambda m: m.group(1) + mask + "@", url)
        return _KEYWORD_SECRET.sub(lambda m: m.group(1) + mask, url)
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{mask}@{hosts}"
    return f"{scheme}://{netloc}{_QUERY_SECRET.sub(lambda m: m.group(1) + mask, tail)}"


#: A URL carrying a password: in its user info, or as a ``password=`` query parameter.
_URL_WITH_PASSWORD = re.compile(r"://[^/@]*:[^/@]*@|[?&]password=", re.IGNORECASE)


def masked(value, mask: str = "**"):
    """``value`` with the password of every URL in it masked: a string, or the values of a
    mapping, list or tuple (recursively). Kombu's ``a;b`` failover lists are masked per URL."""
    if isinstance(value, str):
        if "://" not in value or not _URL_WITH_PASSWORD.search(value):
            return value
        if value.count("://") > 1 and ";" in value:
            return ";".join(masked(part, mask) for part in value.split(";"))
        return mask_url(value, mask)
    if isinstance(value, Mapping):
        return {key: masked(item, mask) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(item, mask) for item in value)
    return value


def scrub(text: object, conninfo: str | None) -> str:
    """Remove the password of ``conninfo`` from a (libpq) error message."""
    password = _password_of(conninfo) if conninfo else None
    text = " ".join(str(text).split())  # one line
    return text.replace(password, "**") if password else text


def _password_of(conninfo: str) -> str | None:
    try:
        password = conninfo_to_dict(conninfo).get("password")
        return None if password is None else str(password)
    except psycopg.Error:
        match = re.search(r"://[^/@:]*:([^@/]*)@", conninfo)
        return match.group(1) if match else None


def to_conninfo(url: str) -> str:
    """A libpq connection URI for a broker URL, validated; query parameters are kept as they are.

    ``pg://`` is ours only; libpq knows ``postgresql://`` and ``postgres://``. A Kombu failover
    list (``url1;url2``) becomes one connection string naming every host (failover_conninfo).
    """
    urls = url.split(";")
    if len(urls) > 1 and all("://" in part for part in urls):
        return failover_conninfo(urls)
    scheme, sep, rest = url.partition("://")
    base, plus, driver = scheme.partition("+")
    if sep and plus and base.lower() in SCHEMES:
        # SQLAlchemy's form (a result backend URL copied into broker_url): say so, rather than
        # what Kombu makes of it (transport 'postgresql', URL 'psycopg://...').
        raise ConfigurationError(
            f"invalid PostgreSQL broker URL {mask_url(url)!r}: '+{driver}' names a SQLAlchemy "
            f"driver, which a broker URL does not take: write {mask_url(f'{base}://{rest}')!r}")
    if not sep or scheme.lower() not in SCHEMES:
        raise ConfigurationError(
            f"invalid PostgreSQL broker URL {mask_url(url)!r}: expected postgresql://, postgres:// or pg://")
    conninfo = f"postgresql://{rest}"
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"invalid PostgreSQL broker URL {mask_url(url)!r}: {scrub(str(exc), conninfo)}") from None
    return conninfo


def failover_conninfo(urls: list[str]) -> str:
    """One libpq connection string naming the hosts of every URL of a Kombu failover list
    (``url1;url2``), in order: libpq tries them at each connect, and with several hosts takes
    the read-write one (see Options.connection_kwargs). The URLs may differ only in their hosts
    and ports."""
    hosts: list[str] = []
    ports: list[str] = []
    common: dict | None = None
    for url in urls:
        params = conninfo_to_dict(to_conninfo(url))
        host = str(params.pop("host", "")).split(",")
        port = str(params.pop("port", "")).split(",")
        hosts += host
        ports += port * len(host) if len(port) == 1 else port
        if common is None:
            common = params
        elif params != common:
            raise ConfigurationError(
                f"the URLs of the failover list {masked(';'.join(urls))!r} differ in more than hosts "
                "and ports: write one URL naming every host, e.g. "
                "postgresql://user@host1:5432,host2:5432/db?target_session_attrs=read-write")
    return make_conninfo(**(common or {}), host=",".join(hosts), port=",".join(ports))


def conninfo_from_parts(hostname, port, userid, password, virtual_host) -> str:
    """For ``Connection(transport=..., hostname=..., userid=...)`` without a URL."""
    params = {"host": hostname or "localhost", "port": port or None, "user": userid or None,
              "password": password or None, "dbname": (virtual_host or "").strip("/") or None}
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def options_table() -> str:
    """The README's table of transport options, from the ``#:`` comments of :class:`Options`."""
    import inspect

    docs, pending = {}, []
    for line in inspect.getsource(Options).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif pending and re.match(r"^\w+\s*:", text):
            docs[text.split(":", 1)[0].strip()] = " ".join(pending)
            pending = []
        else:
            pending = []
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    defaults = Options()
    for field in dataclasses.fields(Options):
        rows.append(f"| `{field.name}` | `{getattr(defaults, field.name)!r}` | {docs.get(field.name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m kombu_pg.config: print the options table
    print(options_table())
