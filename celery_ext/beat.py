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

Code: the scheduler is here; its entries and their tick times in ``celery_ext.beat_entries``,
the leader lease and the session it is bound to in ``celery_ext.beat_leader``.

Settings (app.conf): ``kombu_pg_beat_lease`` (10), ``kombu_pg_beat_refresh`` (1),
``kombu_pg_beat_tick_retention`` (seconds ``beat_ticks`` rows are kept, 86400).
"""
from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import socket
import uuid
from time import monotonic

import psycopg
from celery import beat
from celery.exceptions import ImproperlyConfigured
from celery.schedules import crontab, schedstate

from kombu_pg import errors
from kombu_pg.atomic import enqueue_in
from kombu_pg.beat_store import BeatStore
from kombu_pg.config import ConfigurationError, Options
from kombu_pg.transport import Transport

from .beat_entries import Entry, Plan, definition_of, entry_from_row, iso, next_after, plan_tick
from .beat_leader import Leadership

__all__ = ["Entry", "Scheduler", "definition_of", "next_after"]

#: The module's Entry, for annotations inside Scheduler (whose class attribute Entry is Celery's hook).
StoredEntry = Entry

# Not __name__: beat logs as "kombu_pg.beat", under the "kombu_pg" logger the README documents
# (users filter on it), one name for all of beat's modules.
logger = logging.getLogger("kombu_pg.beat")

LEASE_SETTING = "kombu_pg_beat_lease"
REFRESH_SETTING = "kombu_pg_beat_refresh"
RETENTION_SETTING = "kombu_pg_beat_tick_retention"
DEFAULT_LEASE, DEFAULT_REFRESH, DEFAULT_RETENTION = 10.0, 1.0, 86400.0
#: Seconds before an entry whose task could not be sent is tried again.
RETRY_DELAY = 5.0
#: Seconds between prunings of old beat_ticks rows (by the leader).
PRUNE_EVERY = 60.0
#: A server that accepts no writes (a standby, a primary being demoted in a failover) counts
#: as a lost connection too (the leader's session raises ReadOnlySqlTransaction: it writes
#: without failover.writable): a new one lets libpq pick the read-write host.
CONNECTION_ERRORS = errors.CONNECTION_ERRORS + (psycopg.errors.ReadOnlySqlTransaction,)


class _Superseded(Exception):
    """The entry was not where we read it: another scheduler sent the tick, or it was paused,
    edited or removed, or we are no longer the leader. Rolls the transaction back."""


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
        self.leadership = Leadership(self.identity, self.lease)
        self._next_refresh = 0.0
        self._next_prune = 0.0
        self._revision: int | None = None
        self._synced = False
        self._config_entries: dict[str, StoredEntry] = {}
        self._next_at: dict[str, dt.datetime | None] = {}
        self._check_at: dict[str, float] = {}  # monotonic: schedules without next_after
        self._retry_at: dict[str, float] = {}  # monotonic: entries whose task could not be sent
        self._load_errors: dict[str, str] = {}
        self._busy = False
        self._closed = False
        super().__init__(app, *args, **kwargs)

    @property
    def _leader(self) -> bool:
        return self.leadership.leads

    @property
    def _conn(self) -> psycopg.Connection | None:
        """The leader election's session: ticks are sent in its transactions."""
        return self.leadership.conn

    # -- Celery's Scheduler interface -------------------------------------------------------

    def setup_schedule(self):
        connection = self.connection
        if not isinstance(connection.transport, Transport):
            raise ImproperlyConfigured(
                f"the kombu_pg beat scheduler needs the PostgreSQL broker (kombu_pg), "
                f"not {type(connection.transport).__module__}")
        self._ensure_connected()  # migrates the schema, as any client of the transport
        transport = connection.transport
        leadership = self.leadership
        leadership.db = transport.db
        if transport.options.schema != self.schema:
            self.schema = transport.options.schema
            self.store = BeatStore(self.schema)
        try:
            leadership.conninfo = transport.db.session_conninfo("celery beat -S kombu_pg (leader election)")
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
            logger.error("beat: database error: %s", self.leadership.scrub(exc))
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
        conn, slot = self._conn, plan.slot
        assert conn is not None and slot is not None, "only the leader sends, only due ticks"
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
                        entry.name, iso(slot))
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
                        iso(slot), getattr(result, "id", None), missed)
        else:
            logger.info("beat: skipped %s scheduled at %s: %s%s", entry.name, iso(slot), plan.why_not,
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
        if monotonic() >= self._next_refresh or (self._leader and monotonic() >= self.leadership.deadline):
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
            if monotonic() >= self.leadership.deadline or self._next_refresh == 0.0:
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
        wait = min(self._next_refresh - mono, self.leadership.deadline - mono, float(self.max_interval))
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
        return plan_tick(entry, now, self.app.conf.beat_cron_starting_deadline)

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
            self.leadership.connect()
        if not self._synced:
            self._sync_config()
        row, elected = self.leadership.elect(self.store, self.schema, started)
        if elected or row.revision != self._revision:
            self._load(row.revision)  # elected: the last leader moved the entries on, read them afresh

    def _load(self, revision: int) -> None:
        entries = {}
        for row in self.store.entries(self._conn):
            try:
                entries[row.name] = entry_from_row(self.Entry, self.app, row, self._config_entries)
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

    def _configured_entries(self) -> dict[str, StoredEntry]:
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

    def _drop_connection(self, exc: BaseException) -> None:
        self.leadership.drop(exc, retry_in=self.refresh)
        self._next_refresh = monotonic() + self.refresh

    def _release(self) -> None:
        self.leadership.release(self.store)
