"""``kombu-pg beat …`` (also ``celery -A app pg beat …``): the schedule of the PostgreSQL beat
scheduler (``celery beat -S kombu_pg``), changed while beat runs.

Database only, no Celery: the commands read and write the beat tables of the broker schema;
running schedulers pick changes up within about a second (``kombu_pg_beat_refresh``).
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

import click
import psycopg

from ..beat_store import BeatStore, EntryDef, EntryError
from .common import Duration, run, target, target_options


def _json_arg(kind: type, what: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    example = '[1, 2]' if kind is list else '{"x": 1}'

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}") from None
        if not isinstance(data, kind):
            raise click.BadParameter(f"must be a JSON {what}, e.g. {example}")
        return value
    return convert


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _store_and_connect(ctx: click.Context) -> tuple[BeatStore, psycopg.Connection]:
    where = target(ctx)
    store = BeatStore(where.schema)
    conn = run(where.admin().connect)
    if not run(store.tables_exist, conn):
        conn.close()
        raise click.ClickException(
            f"schema {where.schema!r} has no beat tables: run `kombu-pg migrate` "
            "(or start a worker or beat, which migrate on first connect)")
    return store, conn


@click.group(name="beat", help="The PostgreSQL beat schedule (celery beat -S kombu_pg): list "
                               "entries, add, pause, resume and remove them while beat runs.")
def beat() -> None:
    pass


@beat.command("list", help="Entries with their schedule, state and last tick; the leader.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@target_options
@click.pass_context
def beat_list(ctx: click.Context, as_json: bool) -> None:
    store, conn = _store_and_connect(ctx)
    with conn:
        rows = run(store.entries, conn)
        leader = run(store.leader, conn)
    if as_json:
        click.echo(json.dumps({
            "entries": [row.as_dict() for row in rows],
            "leader": {"holder": leader.holder, "backend_pid": leader.backend_pid,
                       "leader_until": leader.leader_until, "elected_at": leader.elected_at,
                       "active": bool(leader.holder) and not leader.expired and leader.session_alive},
        }, indent=2, default=str))
        return
    click.echo(f"{'NAME':<24} {'TASK':<32} {'SCHEDULE':<24} {'SOURCE':<6} {'STATE':<6} "
               f"{'LAST RUN':<19} {'NEXT RUN':<19} {'RUNS':>6}")
    for r in rows:
        next_run = r.next_run_at
        if next_run is None and r.every is not None:
            next_run = r.last_run_at + dt.timedelta(seconds=r.every)
        click.echo(f"{r.name[:24]:<24} {r.task[:32]:<32} {r.schedule_text[:24]:<24} {r.source:<6} "
                   f"{'paused' if r.paused else 'active':<6} "
                   f"{_when(r.last_run_at) if r.total_run_count else '-':<19} "
                   f"{'-' if r.paused else _when(next_run):<19} {r.total_run_count:>6}")
    if leader.holder and not leader.expired and leader.session_alive:
        click.echo(f"\nleader: {leader.holder} since {_when(leader.elected_at)} "
                   f"(lease until {_when(leader.leader_until)})")
    else:
        click.echo("\nleader: none (no beat running with -S kombu_pg)")


def _set_paused(ctx: click.Context, name: str, paused: bool) -> None:
    store, conn = _store_and_connect(ctx)
    with conn:
        if not run(store.set_paused, conn, name, paused):
            raise click.ClickException(f"no beat entry named {name!r}")
    click.echo(f"{'paused' if paused else 'resumed'} {name}")


@beat.command("pause", help="Stop an entry from firing (kept across beat restarts).")
@click.argument("name")
@target_options
@click.pass_context
def beat_pause(ctx: click.Context, name: str) -> None:
    _set_paused(ctx, name, True)


@beat.command("resume", help="Let a paused entry fire again, from its next scheduled time.")
@click.argument("name")
@target_options
@click.pass_context
def beat_resume(ctx: click.Context, name: str) -> None:
    _set_paused(ctx, name, False)


@beat.command("remove", help="Delete an entry. One from beat_schedule comes back when beat "
                             "restarts with it still configured: pause it instead.")
@click.argument("name")
@target_options
@click.pass_context
def beat_remove(ctx: click.Context, name: str) -> None:
    store, conn = _store_and_connect(ctx)
    with conn:
        source = run(store.remove, conn, name)
    if source is None:
        raise click.ClickException(f"no beat entry named {name!r}")
    click.echo(f"removed {name}")
    if source == "config":
        click.echo(f"note: {name} is in beat_schedule: it is added again when beat restarts "
                   "with that configuration", err=True)


@beat.command("add", help="Add an entry at run time (kept across beat restarts until removed).")
@click.argument("name")
@click.option("--task", required=True, help="Task name, e.g. proj.tasks.cleanup.")
@click.option("--every", type=Duration(), help="Run every this long (90, 30s, 15m, 2h).")
@click.option("--crontab", "crontab_line",
              help="Instead of --every: 'minute hour day-of-month month day-of-week', e.g. '*/15 * * * *' "
                   "(in the app's timezone).")
@click.option("--args", "args_json", callback=_json_arg(list, "array"), help="Positional arguments, a JSON array.")
@click.option("--kwargs", "kwargs_json", callback=_json_arg(dict, "object"),
              help="Keyword arguments, a JSON object.")
@click.option("--queue", help="Queue to send the task to (default: the task's routing).")
@click.option("--options", "options_json", callback=_json_arg(dict, "object"),
              help="More apply_async options, a JSON object (e.g. '{\"priority\": 5, \"expires\": 60}').")
@click.option("--replace", is_flag=True, help="Replace an existing entry's definition (its state is kept).")
@target_options
@click.pass_context
def beat_add(ctx: click.Context, name: str, task: str, every: float | None, crontab_line: str | None,
             args_json: str | None, kwargs_json: str | None, queue: str | None, options_json: str | None,
             replace: bool) -> None:
    if (every is None) == (crontab_line is None):
        raise click.UsageError("give one of --every or --crontab")
    options = json.loads(options_json) if options_json else {}
    if queue:
        options["queue"] = queue
    try:
        entry = EntryDef(name=name, task=task, every=every, crontab=crontab_line,
                         args=args_json or "[]", kwargs=kwargs_json or "{}", options=json.dumps(options))
    except EntryError as exc:
        raise click.UsageError(str(exc)) from None
    store, conn = _store_and_connect(ctx)
    with conn:
        outcome = run(store.add, conn, entry, replace=replace)
    if outcome == "exists":
        raise click.ClickException(f"a beat entry named {name!r} exists (--replace to change it)")
    click.echo(f"{outcome} {name}: {entry.task} {entry.schedule_text}")
