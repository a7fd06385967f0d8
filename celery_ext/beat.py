"""A highly available ``celery beat`` scheduler keeping its schedule in PostgreSQL.

    celery -A proj beat -S kombu_pg          # or -S celery_ext.beat:Scheduler

Run as many beat processes as you like (on any hosts): one is the leader and sends the
periodic tasks, the others wait to take over. No schedule file: the schedule and its run
state live in the broker's schema (tables ``beat_*``, migration 0004), so they survive
restarts and are shared by all beat processes.

Schedule
    ``beat_schedule`` is synced into the table when beat starts: new entries are added,
    changed ones updated (their run state is kept), and entries that came from the
    configuration and are no longer in it are deleted. Entries added at run time with
    ``kombu-pg beat add`` (or ``celery -A proj pg beat add``) are kept until removed; entries
    are paused, resumed and removed with the same commands, and a paused entry stays paused
    across restarts. A running beat picks changes up within ``kombu_pg_beat_refresh`` (1 s).

Exactly once
    Each tick is keyed by (entry, scheduled time). In one transaction the leader advances the
    entry's ``last_run_at`` from the value it read to the tick's scheduled time (a
    compare-and-set that only succeeds for the current leader, on the session it holds the
    lease with), inserts the key into ``beat_ticks`` and inserts the task message through the
    same connection (``kombu_pg.atomic.enqueue_in``); then it commits. A tick is therefore
    enqueued once or not at all, even if two processes believe they lead. Scheduled times
    follow from the stored ``last_run_at`` only (every N seconds: ``last_run_at + N``), not
    from when a process happened to look, so all processes agree on them. Ticks missed while
    no leader ran (a failover, all beats down) are coalesced into one, sent at once (Celery's
    behaviour; a crontab honours ``beat_cron_starting_deadline``). Ticks that fell while an
    entry was paused are skipped: a resumed entry runs at its next scheduled time.

Leader election and failover
    A lease in ``beat_leader``: the leader renews it every ``kombu_pg_beat_refresh`` seconds
    (1 s) for ``kombu_pg_beat_lease`` seconds (10 s). Standbys check every refresh and take
    over when the lease has run out, or at once when the leader's database session is gone
    (``pg_stat_activity``). So:

    - the leader process dies (crash, ``kill -9``, OOM) or its host reboots cleanly: its
      session ends with it, and a standby takes over at its next check: within about
      ``refresh`` seconds (1 to 2 s with the defaults);
    - the leader is stopped (SIGTERM/SIGINT): it resigns, same delay;
    - the leader hangs, or its host or network disappears without closing the connection:
      once the lease has run out, within ``lease + refresh`` seconds (11 s with the defaults).

    A leader that cannot renew its lease, or whose connection died, stops sending: before each
    tick it checks its local lease deadline, and the tick's transaction itself only succeeds
    for the holder of an unexpired lease on the very session it was granted to.

Behind a transaction pooler
    Leadership is bound to a session, which a transaction pooler (PgBouncer
    ``pool_mode=transaction``) does not keep: the scheduler's connection goes over the transport
    option ``direct_url``, and without one beat exits at start with a one-line error saying so.

Settings (app.conf): ``kombu_pg_beat_lease`` (10), ``kombu_pg_beat_refresh`` (1),
``kombu_pg_beat_tick_retention`` (seconds ``beat_ticks`` rows are kept, 86400).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import uuid
from time import monotonic

import psycopg
from celery import beat
from celery.exceptions import ImproperlyConfigured
from celery.schedules import crontab, schedstate
from celery.schedules import schedule as interval
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads
from psycopg.conninfo import conninfo_to_dict

from kombu_pg.atomic import enqueue_in
from kombu_pg.beat_store import BeatStore, EntryDef, EntryError, EntryRow, check_crontab
from kombu_pg.config import ConfigurationError, Options, scrub
from kombu_pg.transport import Transport

logger = logging.getLogger("kombu_pg.beat")

LEASE_SETTING = "kombu_pg_beat_lease"
REFRESH_SETTING = "kombu_pg_beat_refresh"
RETENTION_SETTING = "kombu_pg_beat_tick_retention"
DEFAULT_LEASE, DEFAULT_REFRESH, DEFAULT_RETENTION = 10.0, 1.0, 86400.0
#: Seconds before an entry whose task could not be sent is tried again.
RETRY_DELAY = 5.0
#: Seconds between prunings of old beat_ticks rows (by the leader).
PRUNE_EVERY = 60.0
#: Most missed crontab ticks walked through to find the latest one.
MAX_COALESCE = 100_000
#: A server that accepts no writes (a standby, a primary being demoted in a failover) counts
#: as a lost connection too: a new one lets libpq pick the read-write host.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)


class Entry(beat.ScheduleEntry):
    """A schedule entry with its state in the table."""

    def __init__(self, *args, paused: bool = False, source: str = "config",
                 resumed_at: dt.datetime | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.paused = paused
        self.source = source
        self.resumed_at = resumed_at


@dataclasses.dataclass
class Plan:
    """What to do about an entry now."""

    #: Scheduled time of the tick to send now, or None if none is due.
    slot: dt.datetime | None
    #: The scheduled time after ``slot`` (or the next one, when nothing is due); None if the
    #: schedule cannot tell it in advance (then Celery's is_due is asked again).
    next_at: dt.datetime | None
    skipped: int = 0
    #: False for a tick scheduled while the entry was paused, or a crontab tick older than
    #: beat_cron_starting_deadline: the entry is advanced past it, nothing is sent.
    publish: bool = True
    why_not: str = ""
    #: Seconds until to look again, when next_at is None.
    check_in: float | None = None


class _Superseded(Exception):
    """The entry was not where we read it: another scheduler sent the tick, or it was paused,
    edited or removed, or we are no longer the leader. Rolls the transaction back."""


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def next_after(sched, when: dt.datetime) -> dt.datetime | None:
    """The scheduled time following ``when``, from the schedule alone (no clock involved), so
    that every process computes the same one. None for schedules that cannot tell (solar,
    relative intervals, custom classes)."""
    # In UTC throughout: datetimes sharing a tzinfo compare by wall time, wrong across DST.
    when = _aware(when).astimezone(dt.timezone.utc)
    if type(sched) is interval and not sched.relative and sched.run_every.total_seconds() > 0:
        return when + sched.run_every
    if isinstance(sched, crontab):
        start, delta, _now = sched.remaining_delta(when)
        following = _aware(start + delta).astimezone(dt.timezone.utc)
        return following if following > when else None
    return None


class Scheduler(beat.Scheduler):
    """``celery beat -S kombu_pg``: see the module documentation."""

    Entry = Entry

    def __init__(self, app, *args, **kwargs):
        conf = app.conf
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        try:
            self.lease = float(conf.get(LEASE_SETTING) or DEFAULT_LEASE)
            self.refresh = float(conf.get(REFRESH_SETTING) or DEFAULT_REFRESH)
            self.tick_retention = float(conf.get(RETENTION_SETTING) or DEFAULT_RETENTION)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"kombu_pg beat settings: {exc}") from None
        if not 0 < self.refresh <= self.lease / 2:
            raise ImproperlyConfigured(
                f"{REFRESH_SETTING} ({self.refresh:g}) must be > 0 and at most half of "
                f"{LEASE_SETTING} ({self.lease:g})")
        self.schema = (conf.broker_transport_options or {}).get("schema", Options.schema)
        self.store = BeatStore(self.schema)
        self._db = None  # the transport's kombu_pg.database.Database
        self._session_conninfo = ""  # where the leader's session connects
        self._conn: psycopg.Connection | None = None
        self._leader = False
        self._lease_deadline = 0.0
        self._next_refresh = 0.0
        self._next_prune = 0.0
        self._revision: int | None = None
        self._synced = False
        self._seen_leader: str | None = None
        self._config_entries: dict[str, Entry] = {}
        self._next_at: dict[str, dt.datetime | None] = {}
        self._check_at: dict[str, float] = {}  # monotonic: schedules without next_after
        self._retry_at: dict[str, float] = {}  # monotonic: entries whose task could not be sent
        self._load_errors: dict[str, str] = {}
        self._busy = False
        self._closed = False
        super().__init__(app, *args, **kwargs)

    # -- Celery's Scheduler interface -------------------------------------------------------

    def setup_schedule(self):
        connection = self.connection
        if not isinstance(connection.transport, Transport):
            raise ImproperlyConfigured(
                f"the kombu_pg beat scheduler needs the PostgreSQL broker (kombu_pg), "
                f"not {type(connection.transport).__module__}")
        self._ensure_connected()  # migrates the schema, as any client of the transport
        transport = connection.transport
        self._db = transport.db
        if transport.options.schema != self.schema:
            self.schema = transport.options.schema
            self.store = BeatStore(self.schema)
        try:
            self._session_conninfo = self._db.session_conninfo("celery beat -S kombu_pg (leader election)")
        except ConfigurationError as exc:  # one line and exit, as a worker does
            logger.critical("kombu-pg: cannot use the broker: %s", exc)
            raise SystemExit(1) from None
        self._config_entries = self._configured_entries()
        self.data = {}
        try:
            self._refresh()
        except CONNECTION_ERRORS as exc:  # the loop keeps trying
            self._drop_connection(exc)
        self._next_refresh = monotonic() + self.refresh

    def tick(self, *args, **kwargs):
        """One pass: renew or seek the leadership, reload a changed schedule, send what is due.
        Returns the seconds to sleep (never more than the refresh interval)."""
        if self._closed:  # asked to stop (a signal arrived during a pass that went on)
            raise SystemExit()
        self._busy = True
        try:
            return self._tick()
        except CONNECTION_ERRORS as exc:
            if self._closed:
                raise SystemExit() from None
            self._drop_connection(exc)
            return self.refresh
        except psycopg.Error as exc:
            if self._closed:
                raise SystemExit() from None
            logger.error("beat: database error: %s", self._scrub(exc))
            self._next_refresh = 0.0
            return self.refresh
        finally:
            self._busy = False

    def is_due(self, entry):
        now = self.app.now()
        plan = self._plan(entry, now)
        if plan.slot is not None:
            return schedstate(True, 0)
        if plan.next_at is not None:
            return schedstate(False, max((plan.next_at - now).total_seconds(), 0))
        return schedstate(False, plan.check_in or self.refresh)

    def apply_entry(self, entry, producer=None):
        """Send the due tick of ``entry``, if one is due and this scheduler leads (see :meth:`_send`)."""
        if not self._leader or self._conn is None:
            return None
        plan = self._plan(entry, self.app.now())
        if plan.slot is None:
            self._remember(entry.name, plan)
            return None
        return self._send(entry, plan, producer)

    def _send(self, entry, plan: Plan, producer=None):
        """Send one tick once: advance the entry, record the tick and insert the message in one
        transaction. Nothing is sent if another scheduler got there first."""
        conn = self._conn
        result = None
        try:
            with conn.transaction():
                if not self.store.advance(conn, name=entry.name, expected=entry.last_run_at, slot=plan.slot,
                                          next_at=plan.next_at, me=self.identity, runs=int(plan.publish)):
                    raise _Superseded()
                if plan.publish:
                    if not self.store.record_tick(conn, name=entry.name, slot=plan.slot, me=self.identity):
                        raise _Superseded()
                    with enqueue_in(conn):
                        result = self.apply_async(self._publishable(entry), producer=producer or self.producer,
                                                  advance=False)
                    self.store.set_tick_task(conn, name=entry.name, slot=plan.slot,
                                             task_id=getattr(result, "id", None))
        except _Superseded:
            logger.info("beat: not sending %s for %s: it was sent by another scheduler, or the entry "
                        "was paused, changed or removed, or this scheduler no longer leads; reloading",
                        entry.name, _iso(plan.slot))
            self._next_refresh = 0.0  # refresh (leadership and entries) before anything else
            return None
        except beat.SchedulingError as exc:
            cause = exc.__cause__ or exc.__context__
            if conn.closed or conn.broken or isinstance(cause, CONNECTION_ERRORS):
                raise psycopg.OperationalError(str(cause or exc)) from exc
            logger.error("beat: could not send %s (%s): %s; trying again in %gs",
                         entry.name, entry.task, exc, RETRY_DELAY)
            self._retry_at[entry.name] = monotonic() + RETRY_DELAY
            return None
        self._retry_at.pop(entry.name, None)
        entry.last_run_at = plan.slot
        entry.total_run_count += int(plan.publish)
        self._remember(entry.name, plan)
        missed = f" ({plan.skipped} earlier missed tick(s) not sent)" if plan.skipped else ""
        if plan.publish:
            logger.info("beat: sent %s (%s) scheduled at %s, task id %s%s", entry.name, entry.task,
                        _iso(plan.slot), getattr(result, "id", None), missed)
        else:
            logger.info("beat: skipped %s scheduled at %s: %s%s", entry.name, _iso(plan.slot), plan.why_not,
                        missed)
        return result

    def sync(self):
        """Nothing to do: the state is written with each tick."""

    def close(self):
        """Resign the leadership (a standby takes over at once) and close the connection."""
        if not self._closed:
            self._closed = True
            super().close()
        if not self._busy:  # not from a signal handler interrupting a pass: that one ends first
            self._release()

    @property
    def info(self):
        return (f"    . db -> PostgreSQL, schema {self.schema} (leader lease {self.lease:g}s, "
                f"refresh {self.refresh:g}s)")

    # -- one pass ---------------------------------------------------------------------------

    def _tick(self) -> float:
        if monotonic() >= self._next_refresh or (self._leader and monotonic() >= self._lease_deadline):
            self._next_refresh = monotonic() + self.refresh
            self._refresh()
        if not self._leader:
            return max(self._next_refresh - monotonic(), 0.01)
        if monotonic() >= self._next_prune:
            self._next_prune = monotonic() + PRUNE_EVERY
            pruned = self.store.prune_ticks(self._conn, self.tick_retention)
            if pruned:
                logger.debug("beat: pruned %d old tick record(s)", pruned)
        now = self.app.now()
        for entry in sorted(self.data.values(), key=lambda e: e.name):
            name = entry.name
            if entry.paused or max(self._retry_at.get(name, 0.0), self._check_at.get(name, 0.0)) > monotonic():
                continue
            due = self._next_at.get(name)
            if due is not None and due > now:
                continue
            if monotonic() >= self._lease_deadline or self._next_refresh == 0.0:
                return 0.0  # renew the lease (or reload) first
            try:
                plan = self._plan(entry, now)
            except Exception:  # one entry whose times cannot be computed must not stop the others
                delay = min(float(self.max_interval), 60.0)
                logger.exception("beat: cannot compute the next run of %s: trying again in %gs", name, delay)
                self._retry_at[name] = monotonic() + delay
                continue
            if plan.slot is None:
                self._remember(name, plan)
            else:
                self._send(entry, plan, producer=self.producer)
        return self._sleep_time()

    def _remember(self, name: str, plan: Plan) -> None:
        """When to look at an entry again."""
        if plan.next_at is not None:
            self._next_at[name] = plan.next_at
            self._check_at.pop(name, None)
        else:
            self._next_at.pop(name, None)
            self._check_at[name] = monotonic() + min(plan.check_in or self.refresh, float(self.max_interval))

    def _sleep_time(self) -> float:
        now, mono = self.app.now(), monotonic()
        wait = min(self._next_refresh - mono, self._lease_deadline - mono, float(self.max_interval))
        for entry in self.data.values():
            name = entry.name
            if entry.paused:
                continue
            if name in self._retry_at or name in self._check_at:
                wait = min(wait, max(self._retry_at.get(name, 0.0), self._check_at.get(name, 0.0)) - mono)
            elif self._next_at.get(name) is not None:
                wait = min(wait, (self._next_at[name] - now).total_seconds())
            else:
                wait = 0.0  # not planned yet
        return max(wait, 0.0)

    def _plan(self, entry, now: dt.datetime) -> Plan:
        sched, last = entry.schedule, _aware(entry.last_run_at).astimezone(dt.timezone.utc)
        now = _aware(now).astimezone(dt.timezone.utc)
        first = next_after(sched, last)
        if first is None:
            # A schedule that cannot tell its times in advance: ask it, and key the tick by the
            # current millisecond (the compare-and-set still makes it once only).
            due, check_in = sched.is_due(last)
            if not due:
                return Plan(None, None, check_in=max(float(check_in), 0.0))
            slot = max(now.replace(microsecond=now.microsecond // 1000 * 1000), last + dt.timedelta(milliseconds=1))
            return Plan(slot, None, check_in=max(float(check_in), 0.0))
        if first > now:
            return Plan(None, first)
        if type(sched) is interval:
            periods = (now - last) // sched.run_every
            slot = last + periods * sched.run_every
            skipped = periods - 1
        else:
            slot, skipped = first, 0
            while skipped < MAX_COALESCE:
                following = next_after(sched, slot)
                if following is None or following > now:
                    break
                slot, skipped = following, skipped + 1
        publish, why_not = True, ""
        deadline = self.app.conf.beat_cron_starting_deadline
        resumed_at = getattr(entry, "resumed_at", None)
        if resumed_at is not None and slot < resumed_at:
            publish, why_not = False, "it was paused then"
        elif isinstance(sched, crontab) and deadline is not None and (now - slot).total_seconds() > deadline:
            publish, why_not = False, "older than beat_cron_starting_deadline"
        return Plan(slot, next_after(sched, slot), skipped=skipped, publish=publish, why_not=why_not)

    def _publishable(self, entry):
        """A copy to send: no publish retries by Kombu, which could not help inside our
        transaction (an error aborts it; the tick is tried again on the next pass)."""
        clone = copy.copy(entry)
        clone.options = dict(entry.options or {}, retry=False)
        return clone

    # -- leadership and the schedule --------------------------------------------------------

    def _refresh(self) -> None:
        started = monotonic()
        if self._conn is None:
            self._connect()
        if not self._synced:
            self._sync_config()
        row = self.store.leader(self._conn)
        until = self.store.lead(self._conn, self.identity, self.lease) if row.free_for(self.identity) else None
        was_leader, self._leader = self._leader, until is not None
        if self._leader:
            # Measured from before the statement: the server's lease ends later than this.
            self._lease_deadline = started + self.lease - min(1.0, self.lease / 10)
            if not was_leader:
                previous = f" (took over from {row.holder})" if row.holder and row.holder != self.identity else ""
                logger.info("beat: %s is now the leader for schema %s%s", self.identity, self.schema, previous)
                self._seen_leader = self.identity
                self._load(row.revision)  # the last leader moved the entries on: read them afresh
                return
        elif was_leader:
            logger.warning("beat: %s lost the leadership to %s: not sending", self.identity, row.holder)
            self._seen_leader = row.holder
        elif row.holder != self._seen_leader:
            self._seen_leader = row.holder
            logger.info("beat: standby: %s leads schema %s (lease until %s)", row.holder or "nobody",
                        self.schema, _iso(row.leader_until) if row.leader_until else "-")
        if row.revision != self._revision:
            self._load(row.revision)

    def _load(self, revision: int) -> None:
        entries = {}
        for row in self.store.entries(self._conn):
            try:
                entries[row.name] = self._entry_from_row(row)
                self._load_errors.pop(row.name, None)
            except Exception as exc:  # one broken entry must not stop the others
                message = f"{type(exc).__name__}: {exc}"
                if self._load_errors.get(row.name) != message:
                    logger.error("beat: entry %s cannot be scheduled: %s", row.name, message)
                    self._load_errors[row.name] = message
        self.data = entries
        self._next_at, self._check_at = {}, {}
        self._retry_at = {name: at for name, at in self._retry_at.items() if name in entries}
        if revision != self._revision:
            logger.info("beat: schedule loaded (revision %s): %s", revision, ", ".join(
                f"{e.name}{' (paused)' if e.paused else ''}" for e in entries.values()) or "no entries")
        self._revision = revision

    def _entry_from_row(self, row: EntryRow) -> Entry:
        state = dict(name=row.name, last_run_at=row.last_run_at, total_run_count=row.total_run_count,
                     app=self.app, paused=row.paused, source=row.source, resumed_at=row.resumed_at)
        if row.from_config:
            local = self._config_entries.get(row.name)
            if local is None:
                raise EntryError("its definition is only in another beat process's beat_schedule "
                                 "(it cannot be stored in the table), not in this one's")
            return self.Entry(task=local.task, schedule=local.schedule, args=local.args, kwargs=local.kwargs,
                              options=local.options, **state)
        sched = (interval(dt.timedelta(seconds=row.every)) if row.every is not None
                 else crontab.from_string(row.crontab))
        return self.Entry(task=row.task, schedule=sched, args=kombu_loads(row.args), kwargs=kombu_loads(row.kwargs),
                          options=kombu_loads(row.options), **state)

    def _configured_entries(self) -> dict[str, Entry]:
        """beat_schedule, plus Celery's default entries (as install_default_entries)."""
        conf = self.app.conf
        data = dict(conf.beat_schedule or {})
        if (conf.result_expires and not self.app.backend.supports_autoexpire
                and "celery.backend_cleanup" not in data):
            data["celery.backend_cleanup"] = {"task": "celery.backend_cleanup", "schedule": crontab("0", "4", "*"),
                                              "options": {"expires": 12 * 3600}}
        return {name: self._maybe_entry(name, entry) for name, entry in data.items()}

    def _sync_config(self) -> None:
        definitions = [definition_of(entry) for entry in self._config_entries.values()]
        changes = self.store.sync_config(self._conn, definitions)
        self._synced = True
        summary = "; ".join(f"{what} {', '.join(names)}" for what, names in changes.items() if names)
        logger.info("beat: beat_schedule synced to schema %s: %s", self.schema, summary or "unchanged")

    # -- the connection ---------------------------------------------------------------------

    def _connect(self) -> None:
        given = conninfo_to_dict(self._session_conninfo)
        extra = {"keepalives": 1, "keepalives_idle": max(1, int(self.lease / 2)), "keepalives_interval": 1,
                 "keepalives_count": 3}
        conn = self._db.connect(self._session_conninfo, role="beat",
                                **{k: v for k, v in extra.items() if k not in given})
        # Nothing may outlast the lease: a statement, a lock wait, a transaction left open by a
        # leader that hangs (which would hold an entry's row lock against its successor).
        limit = f"{int(self.lease * 1000)}ms"
        conn.execute("SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false),"
                     " set_config('idle_in_transaction_session_timeout', %s, false)", (limit, limit, limit))
        self._conn = conn

    def _drop_connection(self, exc: BaseException) -> None:
        if self._leader:
            logger.warning("beat: %s lost its database session (%s): not sending until it leads again",
                           self.identity, self._scrub(exc))
        else:
            logger.warning("beat: database connection lost (%s): trying again in %gs", self._scrub(exc), self.refresh)
        self._leader = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                pass
        self._next_refresh = monotonic() + self.refresh

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._leader and not conn.closed and self.store.resign(conn, self.identity):
                logger.info("beat: %s resigned the leadership", self.identity)
        except Exception as exc:  # the session ends anyway: standbys notice
            logger.debug("beat: could not resign: %s", exc)
        finally:
            self._leader = False
            try:
                conn.close()
            except Exception:
                pass

    def _scrub(self, exc: BaseException) -> str:
        text = scrub(str(exc), self._session_conninfo or None)
        return scrub(text, self._db.conninfo if self._db else None)


def definition_of(entry: beat.ScheduleEntry) -> EntryDef:
    """How a configured entry is stored: its schedule as seconds or a crontab line, its
    arguments and options as Kombu JSON; what cannot be is marked ``from_config``."""
    sched = entry.schedule
    every = cron = None
    from_config = False
    if type(sched) is interval and not sched.relative and sched.nowfun is None and sched.run_every.total_seconds() > 0:
        every = sched.run_every.total_seconds()
    elif type(sched) is crontab and set(sched._orig_kwargs) <= {"app"}:
        fields = (sched._orig_minute, sched._orig_hour, sched._orig_day_of_month,
                  sched._orig_month_of_year, sched._orig_day_of_week)
        try:
            if not all(isinstance(f, (str, int)) for f in fields):
                raise EntryError("not plain fields")
            cron = check_crontab(" ".join(str(f) for f in fields))
        except EntryError:
            from_config = True
    else:
        from_config = True
    try:
        args = kombu_dumps(list(entry.args or ()))
        kwargs = kombu_dumps(dict(entry.kwargs or {}))
        options = kombu_dumps(dict(entry.options or {}))
    except (TypeError, ValueError):
        from_config = True
        args = json.dumps([repr(a) for a in entry.args or ()])
        kwargs = json.dumps({str(k): repr(v) for k, v in (entry.kwargs or {}).items()})
        options = json.dumps({str(k): repr(v) for k, v in (entry.options or {}).items()})
    text = (f"every {every:g}s" if every is not None and not from_config
            else f"crontab({cron})" if cron is not None and not from_config else repr(sched))
    return EntryDef(name=entry.name, task=entry.task, every=every, crontab=cron, args=args, kwargs=kwargs,
                    options=options, from_config=from_config, schedule_text=text)


def _iso(value: dt.datetime) -> str:
    return _aware(value).astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
