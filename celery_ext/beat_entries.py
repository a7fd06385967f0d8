"""The entries of the PostgreSQL beat scheduler (celery_ext.beat): how they are stored (a
configured entry as a table row, a row back as an entry) and when their ticks fall.

Scheduled times follow from the stored ``last_run_at`` and the schedule alone, never from when
a process happened to look, so that every beat process computes the same ones.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from celery import beat
from celery.schedules import crontab
from celery.schedules import schedule as interval
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from kombu_pg.beat_store import EntryDef, EntryError, EntryRow, check_crontab

#: Most missed crontab ticks walked through to find the latest one.
MAX_COALESCE = 100_000


class Entry(beat.ScheduleEntry):
    """A schedule entry with its state in the table."""

    def __init__(self, *args: Any, paused: bool = False, source: str = "config",
                 resumed_at: dt.datetime | None = None, **kwargs: Any):
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


def aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def iso(value: dt.datetime) -> str:
    return aware(value).astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def next_after(sched: Any, when: dt.datetime) -> dt.datetime | None:
    """The scheduled time following ``when``, from the schedule alone (no clock involved), so
    that every process computes the same one. None for schedules that cannot tell (solar,
    relative intervals, custom classes)."""
    # In UTC throughout: datetimes sharing a tzinfo compare by wall time, wrong across DST.
    when = aware(when).astimezone(dt.timezone.utc)
    if type(sched) is interval and not sched.relative and sched.run_every.total_seconds() > 0:
        return when + sched.run_every
    if isinstance(sched, crontab):
        start, delta, _now = sched.remaining_delta(when)
        following = aware(start + delta).astimezone(dt.timezone.utc)
        return following if following > when else None
    return None


def plan_tick(entry: beat.ScheduleEntry, now: dt.datetime, cron_starting_deadline: float | None) -> Plan:
    """The tick of ``entry`` to send at ``now``, if any: missed ones are coalesced into the
    latest, on the schedule's own grid."""
    sched, last = entry.schedule, aware(entry.last_run_at).astimezone(dt.timezone.utc)
    now = aware(now).astimezone(dt.timezone.utc)
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
    resumed_at = getattr(entry, "resumed_at", None)
    if resumed_at is not None and slot < resumed_at:
        publish, why_not = False, "it was paused then"
    elif (isinstance(sched, crontab) and cron_starting_deadline is not None
          and (now - slot).total_seconds() > cron_starting_deadline):
        publish, why_not = False, "older than beat_cron_starting_deadline"
    return Plan(slot, next_after(sched, slot), skipped=skipped, publish=publish, why_not=why_not)


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


def entry_from_row(entry_cls: type[Entry], app: Any, row: EntryRow, configured: Mapping[str, Entry]) -> Entry:
    """The entry a table row describes; one from beat_schedule takes its definition from
    ``configured`` (this process's beat_schedule), where what the table cannot hold is."""
    state = dict(name=row.name, last_run_at=row.last_run_at, total_run_count=row.total_run_count,
                 app=app, paused=row.paused, source=row.source, resumed_at=row.resumed_at)
    if row.from_config:
        local = configured.get(row.name)
        if local is None:
            raise EntryError("its definition is only in another beat process's beat_schedule "
                             "(it cannot be stored in the table), not in this one's")
        return entry_cls(task=local.task, schedule=local.schedule, args=local.args, kwargs=local.kwargs,
                         options=local.options, **state)
    sched = (interval(dt.timedelta(seconds=row.every)) if row.every is not None
             else crontab.from_string(row.crontab))
    return entry_cls(task=row.task, schedule=sched, args=kombu_loads(row.args), kwargs=kombu_loads(row.kwargs),
                     options=kombu_loads(row.options), **state)
