"""What the console shows and does, read from and written to the database: queues with their
rates, dead letters, the beat schedule, lease holders, task lookup. The pages and the JSON API
both go through :class:`Console`; dead letters, queue statistics and task lookup through
:class:`kombu_pg.admin.Admin`, the schedule through :class:`kombu_pg.beat_store.BeatStore`, the
rest through the console's statements of the store (kombu_pg.store.console)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

import kombu
from kombu.utils import json as kombu_json

from .. import config
from ..admin import Admin, Filter
from ..beat_store import BeatStore

#: The events of queue_stats the console charts, in the order shown.
RATE_EVENTS = ("published", "acked", "retried", "dead_lettered")
#: Minutes of history on the queues page.
HISTORY_MINUTES = 60
#: "Per minute" on the queues page: the mean over this many minutes, the current one included.
RATE_WINDOW_MINUTES = 5


class NotFound(LookupError):
    """No such dead letter, beat entry or task: the pages and the API answer 404."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """A consumer holding leases now."""

    leased_by: str | None  # "<worker>[<pid>]"
    worker: str | None
    pid: int | None
    since: dt.datetime | None  # its oldest lease's start
    leases: int
    queues: list[str]


class Console:
    def __init__(self, url: str, schema: str = config.Options.schema):
        self.url = url
        self.schema = schema
        self.admin = Admin(url, schema, role="web")  # validates the URL (ConfigurationError)
        self.beat_store = BeatStore(schema)
        self.description = self.admin.description  # the masked URL

    # -- queues ----------------------------------------------------------------------------------

    def queues(self, minutes: int = HISTORY_MINUTES) -> dict:
        """Per queue: counts, dead letters by reason, per-minute rates and their last hour."""
        stats = self.admin.stats()
        with self.admin.session() as conn:
            rows = self.admin.store.console_rates(conn, minutes=minutes - 1)
            now = self.admin.store.console_minute(conn)
        minutes_axis = [now - dt.timedelta(minutes=minutes - 1 - i) for i in range(minutes)]
        index = {minute: i for i, minute in enumerate(minutes_axis)}
        series: dict[str, dict[str, list[int]]] = {}
        for minute, queue, event, count in rows:
            if event in RATE_EVENTS and minute in index:
                per_event = series.setdefault(queue, {e: [0] * minutes for e in RATE_EVENTS})
                per_event[event][index[minute]] += count
        dead: dict[str, dict[str, int]] = {}
        for d in stats["dead_letters"]:
            dead.setdefault(d["queue"], {})[d["reason"]] = d["count"]
        # ("" is where a process counts what it cannot attribute to a queue.)
        names = sorted(({q["queue"] for q in stats["queues"]} | set(series) | set(dead)) - {""})
        counts = {q["queue"]: q for q in stats["queues"]}
        empty = {"ready": 0, "delayed": 0, "leased": 0, "oldest_ready_age_s": None}
        queues = []
        for name in names:
            history = series.get(name, {e: [0] * minutes for e in RATE_EVENTS})
            window = min(RATE_WINDOW_MINUTES, minutes)
            queues.append({
                "queue": name,
                "celery_internal": is_celery_internal(name),
                **{k: counts.get(name, empty)[k] for k in empty},
                "dead_letters": dead.get(name, {}),
                "dead_letters_total": sum(dead.get(name, {}).values()),
                "per_minute": {e: round(sum(history[e][-window:]) / window, 2) for e in RATE_EVENTS},
                "history": history,
            })
        return {"minutes": [m.isoformat() for m in minutes_axis], "queues": queues}

    # -- dead letters ----------------------------------------------------------------------------

    def dead_letters(self, filter: Filter, *, after: int, limit: int) -> dict:
        items = self.admin.dead_letters(filter, after=after, limit=limit + 1)
        more = len(items) > limit
        items = items[:limit]
        return {"items": [dataclasses.asdict(item) for item in items],
                "count": self.admin.count(filter),
                "next_after": items[-1].id if more and items else None}

    def dead_letter(self, dead_letter_id: int) -> dict:
        letter = self.admin.dead_letter(dead_letter_id)
        if letter is None:
            raise NotFound(f"no dead letter with id {dead_letter_id}")
        return dataclasses.asdict(letter)

    def dead_letter_tasks(self) -> list[str]:
        with self.admin.session() as conn:
            return self.admin.store.console_dead_letter_tasks(conn)

    def count(self, filter: Filter) -> int:
        return self.admin.count(filter)

    def replay(self, filter: Filter) -> int:
        return self.admin.replay(filter)

    def purge(self, filter: Filter) -> int:
        return self.admin.purge(filter)

    # -- beat ------------------------------------------------------------------------------------

    def beat(self) -> dict:
        with self.admin.session() as conn:
            if not self.beat_store.tables_exist(conn):
                return {"entries": [], "leader": None}
            rows = self.beat_store.entries(conn)
            leader = self.beat_store.leader(conn)
        entries = []
        for row in rows:
            entry = row.as_dict()
            next_run = row.next_run_at
            if next_run is None and row.every is not None:
                next_run = row.last_run_at + dt.timedelta(seconds=row.every)
            entry["next_run_at"] = None if row.paused else next_run
            entry["last_run_at"] = row.last_run_at if row.total_run_count else None
            entries.append(entry)
        active = bool(leader.holder) and not leader.expired and leader.session_alive
        return {"entries": entries,
                "leader": {"holder": leader.holder, "elected_at": leader.elected_at,
                           "leader_until": leader.leader_until, "active": active}}

    def set_paused(self, name: str, paused: bool) -> None:
        with self.admin.session() as conn:
            if not self.beat_store.set_paused(conn, name, paused):
                raise NotFound(f"no beat entry named {name!r}")

    def run_now(self, name: str) -> str:
        """Send the entry's task once, now, as Celery would (protocol 2, JSON), to the queue or
        exchange of its options; the schedule is left as it is. Returns the task id."""
        with self.admin.session() as conn:
            row = next((e for e in self.beat_store.entries(conn) if e.name == name), None)
        if row is None:
            raise NotFound(f"no beat entry named {name!r}")
        if row.from_config:
            raise ValueError(f"beat entry {name!r} has arguments or options only its app can "
                             "decode: run it from the app instead")
        args, kwargs = kombu_json.loads(row.args), kombu_json.loads(row.kwargs)
        options = kombu_json.loads(row.options)
        task_id = str(uuid.uuid4())
        headers = {"lang": "py", "task": row.task, "id": task_id, "root_id": task_id,
                   "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                   "timelimit": [None, None], "argsrepr": repr(args), "kwargsrepr": repr(kwargs),
                   "origin": f"kombu-pg web ({name})", "ignore_result": False}
        body = [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        queue = options.get("queue") or "celery"
        if isinstance(queue, dict):
            queue = queue.get("name") or "celery"
        exchange = options.get("exchange", "")
        routing_key = options.get("routing_key") or (queue if not exchange else "")
        with kombu.Connection(self.url, transport_options={"schema": self.schema}) as connection:
            producer = connection.Producer(serializer="json")
            declare = [kombu.Queue(queue)] if not exchange else []
            producer.publish(body, exchange=exchange if isinstance(exchange, str) else exchange.get("name", ""),
                             routing_key=routing_key, headers=headers, declare=declare,
                             priority=options.get("priority") or 0, correlation_id=task_id, retry=False)
        return task_id

    # -- workers and tasks -------------------------------------------------------------------------

    def workers(self, limit: int = 200) -> dict:
        with self.admin.session() as conn:
            holders = self.admin.store.console_lease_holders(conn)
            leases = self.admin.store.console_leases(conn, limit=limit)
        result = []
        for leased_by, since, count, queues in holders:
            worker, _, pid = (leased_by or "").rpartition("[")
            parsed_pid = int(pid[:-1]) if leased_by and pid.endswith("]") and pid[:-1].isdigit() else None
            result.append(dataclasses.asdict(Holder(
                leased_by, (worker if parsed_pid is not None else leased_by) or None, parsed_pid,
                since, count, queues)))
        return {"holders": result, "leases": [lease._asdict() for lease in leases]}

    def task(self, task_id: str) -> dict:
        lookup = self.admin.task(task_id)
        data = dataclasses.asdict(lookup)
        data["state"] = lookup.state
        for message, raw in zip(data["messages"], lookup.messages):
            message["worker"], message["pid"] = raw.worker, raw.pid
        if lookup.state == "not_found":
            raise NotFound(f"task {task_id!r} is not in the broker: acked (done), or never published "
                           "here", data)
        return data


def is_celery_internal(queue: str) -> bool:
    """Celery's remote-control (pidbox) and event queues: not task queues."""
    return queue.endswith(".pidbox") or queue.startswith(("celeryev.", "celery@")) \
        or queue.endswith(".reply.celery.pidbox")


def to_json(value: Any) -> Any:
    """Datetimes as ISO 8601 for the JSON API."""
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)
